"""Kernel tests: CPU interpreter in float32 without CUDA, compiled fp16/bf16 kernels with it.

TRITON_INTERPRET must be set before triton decorates anything; resultity_kernels defers the
decoration to the first launch, and this file sets the variable before any test imports triton.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# triton binds its library (tl.philox, ...) to interpreted or compiled mode when imported:
# note whether something imported it before the variable below could take effect
_TRITON_PREIMPORTED = (
    not HAS_CUDA and sys.modules.get("triton") is not None
    and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "on", "yes")
)
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
# triton 3.9 warns on every compile while this is unset, and warnings are errors here;
# "1" keeps today's default (FP fusion on)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - the test extra installs triton
    HAS_TRITON = False

# (device, dtype, relative tolerance against the float32 reference)
_TARGETS = [
    pytest.param(
        ("cpu", torch.float32, 2e-5),
        id="cpu-fp32-interpreter",
        marks=pytest.mark.skipif(HAS_CUDA, reason="CUDA present: kernels run compiled on it"),
    ),
    pytest.param(
        ("cuda", torch.float16, 1e-2),
        id="cuda-fp16",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")],
    ),
    pytest.param(
        ("cuda", torch.bfloat16, 2.5e-2),
        id="cuda-bf16",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")],
    ),
]


@pytest.fixture(params=_TARGETS)
def target(request: pytest.FixtureRequest) -> tuple[torch.device, torch.dtype, float]:
    """Where and in which precision a kernel test runs, with its error tolerance."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    device, dtype, tol = request.param
    if device == "cpu" and _TRITON_PREIMPORTED:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run with "
                    "TRITON_INTERPRET=1 in the environment or run tests/kernels on its own")
    return torch.device(device), dtype, tol
