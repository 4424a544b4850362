"""Deferred Triton import and the shared checks every kernel wrapper runs before a launch.

``import resultity_kernels`` must work on a machine with only torch installed, and does not
import triton at all. Kernels are declared with :func:`lazy_jit`, which keeps the plain Python
function and hands it to ``triton.jit`` on the first launch; ``TRITON_INTERPRET`` is read then.
Triton itself must first be imported with the interpreter setting it will run under: its own
library functions are bound to interpreted or compiled mode when triton is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, overload

import torch

__all__ = [
    "HAS_TRITON",
    "KernelUnavailableError",
    "cdiv",
    "check_device",
    "check_tensor",
    "interpreting",
    "lazy_jit",
    "next_pow2",
    "tl",
]

# triton.language, bound into each kernel module on the first launch: importing triton is
# deferred too, because triton decides at import time whether its own library functions
# (tl.philox, ...) are interpreted, and TRITON_INTERPRET may be set after this package loads
tl: Any = None


def _has_triton() -> bool:
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


HAS_TRITON = _has_triton()


class KernelUnavailableError(RuntimeError):
    """A Triton kernel was called where it cannot run (triton missing, or no GPU to run on)."""


def interpreting() -> bool:
    """Return True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cdiv(a: int, b: int) -> int:
    """Return ceil(a / b) for positive b."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Return the smallest power of two that is >= n (and >= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_JITTED_HELPERS: dict[tuple[Callable[..., Any], bool], Any] = {}


class _LazyKernel:
    """A kernel function that becomes a ``triton.jit`` kernel on its first launch.

    ``helpers`` are plain functions the kernel calls; binding makes each a ``triton.jit``
    device function under its own name in the kernel's module (Triton inlines them).
    """

    def __init__(self, fn: Callable[..., None], helpers: Sequence[Callable[..., Any]] = ()) -> None:
        self.fn = fn
        self.helpers = tuple(helpers)
        self._jitted: Any = None
        self._interpret: bool | None = None

    def bind_triton(self) -> Any:
        """Import triton, bind ``tl`` and the jitted helpers in the kernel's module, and return
        the triton module.

        Raises KernelUnavailableError when triton cannot be imported.
        """
        try:
            import triton
            import triton.language as language
        except ImportError as exc:
            raise KernelUnavailableError(
                f"{self.fn.__name__} needs triton, which is not installed; "
                "use the *_ref PyTorch function instead"
            ) from exc
        self.fn.__globals__["tl"] = language
        mode = interpreting()
        for helper in self.helpers:
            # one jitted object per helper and mode (triton.jit reads TRITON_INTERPRET when it
            # decorates), so every kernel of a module sees the same global
            helper.__globals__["tl"] = language  # a helper may live in another module
            key = (helper, mode)
            if key not in _JITTED_HELPERS:
                _JITTED_HELPERS[key] = triton.jit(helper)
            self.fn.__globals__[helper.__name__] = _JITTED_HELPERS[key]
        return triton

    def _get(self) -> Any:
        triton = self.bind_triton()
        mode = interpreting()
        if self._jitted is None or self._interpret != mode:
            self._jitted = triton.jit(self.fn)
            self._interpret = mode
        return self._jitted

    def __getitem__(self, grid: Any) -> Any:
        return self._get()[grid]


@overload
def lazy_jit(fn: Callable[..., None]) -> _LazyKernel: ...
@overload
def lazy_jit(
    *, helpers: Sequence[Callable[..., Any]]
) -> Callable[[Callable[..., None]], _LazyKernel]: ...


def lazy_jit(
    fn: Callable[..., None] | None = None, *, helpers: Sequence[Callable[..., Any]] = ()
) -> _LazyKernel | Callable[[Callable[..., None]], _LazyKernel]:
    """Declare a Triton kernel; it is compiled (or interpreted) on the first launch.

    ``@lazy_jit`` returns the kernel; ``@lazy_jit(helpers=(f, ...))`` declares a kernel that
    calls the plain functions ``f`` (jitted as device functions when it is bound).
    """
    if fn is None:
        return lambda kernel: _LazyKernel(kernel, helpers)
    return _LazyKernel(fn, helpers)


def check_device(name: str, t: torch.Tensor) -> None:
    """Raise unless ``t`` lives where a Triton kernel can read it (CUDA, or CPU when interpreting).

    Raises:
        KernelUnavailableError: triton is missing.
        ValueError: the tensor is on a device the kernel cannot use.
    """
    if not HAS_TRITON:
        raise KernelUnavailableError("triton is not installed; use the *_ref PyTorch functions")
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise ValueError(
        f"{name} is on {t.device}; Triton kernels need a CUDA tensor "
        "(or a CPU tensor with TRITON_INTERPRET=1)"
    )


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    shape: Sequence[int | None] | None = None,
    last_contiguous: bool = False,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check one kernel argument and return it typed as a tensor.

    Raises:
        ValueError: naming ``name`` when the type, rank, dtype, device, shape or strides are wrong.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {allowed}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape, strict=True)):
            if want is not None and got != want:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}; dimension {i} must be {want}"
                )
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()})")
    if last_contiguous and t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride in its last dimension ({t.stride()})")
    return t
