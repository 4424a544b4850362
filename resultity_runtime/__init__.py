"""resultity_runtime: the PyTorch inference engine (the Runtime role)."""

from __future__ import annotations

__all__: list[str] = []
