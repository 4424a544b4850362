"""resultity_kernels: Triton kernels for attention and sampling, each beside its PyTorch reference.

Imports only torch (and triton, lazily, where a kernel is launched), so that it runs on a GPU
machine with nothing else installed: ``PYTHONPATH=.`` from the repository root.
"""

from __future__ import annotations

__all__: list[str] = []
