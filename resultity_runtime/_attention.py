"""Paged attention: AttentionMetadata, the backend protocol and the PyTorch reference backend.

KV cache layout per layer: ``k_cache`` and ``v_cache`` are ``[num_blocks, block_size, Hkv, D]``;
a token's slot is ``block_id * block_size + offset_in_block``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchAttentionBackend", "build_metadata"]


@dataclass
class AttentionMetadata:
    """One forward step over N new tokens from B sequences (see RUNTIME.md).

    ``seq_lens`` is each sequence's context length after this step; its new tokens are the last
    ``q_len_i`` of them. ``query_lens`` / ``seq_lens_list`` are optional python copies.
    """

    slot_mapping: Tensor  # int64 [N]
    query_start_loc: Tensor  # int32 [B+1]
    seq_lens: Tensor  # int32 [B]
    block_tables: Tensor  # int32 [B, max_blocks_per_seq], padded with 0
    max_query_len: int
    max_seq_len: int
    query_lens: list[int] | None = None
    seq_lens_list: list[int] | None = None

    def python_lens(self) -> tuple[list[int], list[int]]:
        """Return (query_lens, seq_lens) as python lists, from the copies when present."""
        if self.query_lens is not None and self.seq_lens_list is not None:
            return self.query_lens, self.seq_lens_list
        starts = self.query_start_loc.tolist()
        q_lens = [b - a for a, b in pairwise(starts)]
        return q_lens, self.seq_lens.tolist()


def build_metadata(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Return the AttentionMetadata of one step from per-sequence python lists.

    ``block_tables[i]`` lists sequence i's block ids (at least ceil(seq_len/block_size) of
    them). Raises ValueError naming the argument when the lists are inconsistent.
    """
    if not (len(query_lens) == len(seq_lens) == len(block_tables)) or not query_lens:
        raise ValueError("query_lens, seq_lens, block_tables: need the same non-zero length")
    slots: list[int] = []
    starts = [0]
    for q_len, s_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
        if not 1 <= q_len <= s_len:
            raise ValueError(f"query_lens: need 1 <= q_len <= seq_len, got {q_len}, {s_len}")
        if len(table) * block_size < s_len:
            raise ValueError(f"block_tables: {len(table)} blocks cannot hold {s_len} tokens")
        for pos in range(s_len - q_len, s_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + q_len)
    width = max(len(t) for t in block_tables)
    padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens=list(query_lens),
        seq_lens_list=list(seq_lens),
    )


class AttentionBackend(Protocol):
    """Writes new k/v into the paged cache, then causal GQA attention over each context."""

    name: str

    def forward(  # noqa: PLR0917
        self,
        q: Tensor,  # [N, Hq, D]
        k: Tensor,  # [N, Hkv, D], rotary already applied
        v: Tensor,  # [N, Hkv, D]
        k_cache: Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> Tensor:  # [N, Hq, D]
        ...


class TorchAttentionBackend:
    """Reference backend in plain PyTorch (CPU and CUDA), built on scaled_dot_product_attention.

    Decode rows (q_len == 1) of a step are handled together: one gather of every sequence's
    blocks, padded to the longest context and masked. Longer queries (prefill chunks) are
    handled one sequence at a time. Slots never written must hold finite values (allocate the
    cache with zeros): masked positions get zero weight, but NaN times zero is still NaN.
    """

    name = "torch"

    def __init__(self) -> None:
        # gathered K/V of decode steps land in reused buffers: fresh multi-megabyte
        # allocations every layer cost page faults that rival the copy itself
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _buffer(self, like: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """Return two ``[rows, block numel]`` scratch views for gathered K and V blocks."""
        width = like[0].numel()
        key = (like.device, like.dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < 2 * rows * width:
            buf = torch.empty(2 * rows * width, dtype=like.dtype, device=like.device)
            self._scratch[key] = buf
        return buf[: rows * width].view(rows, width), buf[rows * width: 2 * rows * width].view(
            rows, width)

    def forward(  # noqa: PLR0917
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> Tensor:
        """Return the attention output ``[N, Hq, D]`` after writing k/v at meta.slot_mapping."""
        _, block_size, hkv, d = k_cache.shape
        k_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, v)
        if meta.max_query_len == 1:
            return self._decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                meta.max_seq_len, scale)
        out = torch.empty_like(q)
        q_lens, s_lens = meta.python_lens()
        decode_rows: list[int] = []
        start = 0
        for i, (q_len, s_len) in enumerate(zip(q_lens, s_lens, strict=True)):
            if q_len == 1:
                decode_rows.append(i)
            elif q_len == s_len:  # no cached prefix: attend over the new tokens directly
                out[start:start + q_len] = _prefill(q[start:start + q_len],
                                                    k[start:start + q_len],
                                                    v[start:start + q_len], None, scale)
            else:
                n_blocks = -(-s_len // block_size)
                table = meta.block_tables[i, :n_blocks]
                k_ctx = k_cache.index_select(0, table).view(-1, hkv, d)[:s_len]  # [S, Hkv, D]
                v_ctx = v_cache.index_select(0, table).view(-1, hkv, d)[:s_len]
                key_pos = torch.arange(s_len, device=q.device)
                q_pos = torch.arange(s_len - q_len, s_len, device=q.device)
                mask = key_pos[None, :] <= q_pos[:, None]  # [q_len, S]
                out[start:start + q_len] = _prefill(q[start:start + q_len], k_ctx, v_ctx,
                                                    mask, scale)
            start += q_len
        if decode_rows:
            starts = meta.query_start_loc[:-1]
            rows = torch.tensor(decode_rows, device=q.device)
            tok = starts[rows].long()
            max_len = max(s_lens[i] for i in decode_rows)
            out[tok] = self._decode(q[tok], k_cache, v_cache, meta.block_tables[rows],
                                    meta.seq_lens[rows], max_len, scale)
        return out

    def _decode(  # noqa: PLR0917
        self,
        q: Tensor,  # [B, Hq, D]
        k_cache: Tensor,
        v_cache: Tensor,
        block_tables: Tensor,  # [B, max_blocks]
        seq_lens: Tensor,  # [B]
        max_seq_len: int,
        scale: float,
    ) -> Tensor:  # [B, Hq, D]
        b, hq, d = q.shape
        _, block_size, hkv, _ = k_cache.shape
        n_blocks = -(-max_seq_len // block_size)
        table = block_tables[:, :n_blocks].reshape(-1)  # [B * n_blocks]
        length = n_blocks * block_size
        # one index_select over whole blocks: contiguous row copies, no per-sequence loop
        k_rows, v_rows = self._buffer(k_cache, table.shape[0])
        torch.index_select(k_cache.view(k_cache.shape[0], -1), 0, table, out=k_rows)
        torch.index_select(v_cache.view(v_cache.shape[0], -1), 0, table, out=v_rows)
        k = k_rows.view(b, length, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
        v = v_rows.view(b, length, hkv, d).transpose(1, 2)
        qg = q.view(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]: the G query heads of a KV head
        if b == 1:  # one sequence: its context is the first max_seq_len slots, no mask
            o = F.scaled_dot_product_attention(qg, k[:, :, :max_seq_len], v[:, :, :max_seq_len],
                                               scale=scale)
            return o.reshape(b, hq, d)
        # padded slots (tails of last blocks, table padding) hold finite stale values: masked
        mask = torch.arange(length, device=q.device)[None, :] < seq_lens[:, None]  # [B, L]
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :],
                                           scale=scale)
        return o.reshape(b, hq, d)


def _prefill(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    # q: [T, Hq, D], k/v: [S, Hkv, D], mask: [T, S] bool or None (plain causal, T == S).
    # 4-D inputs: with 3-D ones the CPU dispatcher falls back to the (4x slower) math kernel.
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
    )  # [1, Hq, T, D]
    return o[0].transpose(0, 1)
