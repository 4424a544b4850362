"""resultity_kernels: Triton kernels for attention and sampling, each beside its PyTorch reference.

Imports only torch (and triton, lazily, where a kernel is launched), so that it runs on a GPU
machine with nothing else installed: ``PYTHONPATH=.`` from the repository root. Every kernel
``name`` has a ``name_ref`` PyTorch twin with the same contract; the Triton versions run on CUDA
tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from ._decode_attention import paged_decode_attention, paged_decode_attention_ref
from ._kv_cache_write import write_kv_cache, write_kv_cache_ref
from ._prefill_attention import prefill_attention, prefill_attention_ref
from ._rms_norm import rms_norm, rms_norm_ref
from ._rotary import apply_rotary, apply_rotary_ref
from ._sampling import sample, sample_ref, sampling_probs_ref
from ._triton_compat import HAS_TRITON, KernelUnavailableError

__all__ = [
    "HAS_TRITON",
    "KernelUnavailableError",
    "apply_rotary",
    "apply_rotary_ref",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "prefill_attention",
    "prefill_attention_ref",
    "rms_norm",
    "rms_norm_ref",
    "sample",
    "sample_ref",
    "sampling_probs_ref",
    "write_kv_cache",
    "write_kv_cache_ref",
]
