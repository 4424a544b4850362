"""The paged KV cache: one tensor allocated once from a memory budget.

Layout: ``[num_layers, 2, num_blocks, block_size, Hkv, D]`` in the model dtype; layer ``i``
gets the views ``(cache[i, 0], cache[i, 1])``, each ``[num_blocks, block_size, Hkv, D]``.
The tensor is zero-filled: attention over padded slots is masked, and zeros (unlike
uninitialised memory, which may hold NaN) keep masked products finite.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ._config import ModelConfig

__all__ = [
    "DEFAULT_CPU_FRACTION",
    "DEFAULT_CUDA_FRACTION",
    "KVCache",
    "available_memory_bytes",
    "bytes_per_block",
    "plan_num_blocks",
]

# on CPU the cache shares RAM with everything else on the machine; on CUDA it is the main user
DEFAULT_CPU_FRACTION = 0.25
DEFAULT_CUDA_FRACTION = 0.85


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Returns the bytes one block of ``block_size`` tokens takes over all layers, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * block_size * elem


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def available_memory_bytes(device: torch.device) -> int:
    """Returns free memory on ``device``: MemAvailable on CPU, cudaMemGetInfo's free on CUDA."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return _meminfo_available()


def plan_num_blocks(
    config: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    kv_cache_bytes: int | None = None,
    memory_fraction: float | None = None,
    max_useful_tokens: int | None = None,
) -> int:
    """Returns how many blocks fit the budget.

    The budget is ``kv_cache_bytes`` when given, else ``memory_fraction`` (default 0.25 on CPU,
    0.85 on CUDA) of the device's free memory, capped at ``max_useful_tokens`` worth of blocks
    (the most the engine can ever hold at once). Raises ValueError if not one block fits.
    """
    per_block = bytes_per_block(config, block_size, dtype)
    if kv_cache_bytes is not None:
        if kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {kv_cache_bytes}")
        budget = kv_cache_bytes
    else:
        if memory_fraction is None:
            memory_fraction = DEFAULT_CUDA_FRACTION if device.type == "cuda" else (
                DEFAULT_CPU_FRACTION
            )
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        budget = int(available_memory_bytes(device) * memory_fraction)
    num_blocks = budget // per_block
    if kv_cache_bytes is None and max_useful_tokens is not None:
        num_blocks = min(num_blocks, -(-max_useful_tokens // block_size))
    if num_blocks < 1:
        raise ValueError(
            f"KV cache budget of {budget} bytes is below one block ({per_block} bytes)"
        )
    return int(num_blocks)


class KVCache:
    """The allocated cache; ``layers[i]`` is layer i's ``(k_cache, v_cache)``."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (
            config.num_hidden_layers,
            2,
            num_blocks,
            block_size,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.tensor: Tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.layers: list[tuple[Tensor, Tensor]] = [
            (self.tensor[i, 0], self.tensor[i, 1]) for i in range(config.num_hidden_layers)
        ]

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()
