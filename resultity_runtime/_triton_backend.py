"""Triton attention backend: the resultity_kernels kernels behind the AttentionBackend protocol.

Per layer and step: one kernel scatters the new K/V into the paged cache; then a decode-only
step (every sequence brings one token) runs the split-K paged decode kernel, and any other step
(prefill, chunked prefill over a cached prefix) runs the prefill kernel, which reads each
sequence's cached prefix through its block table and the new tokens from the packed k/v. In a
mixed step the single-token rows go to the decode kernel and the rest to the prefill kernel
(a 128-row query tile would mostly idle on a single token). Inputs the kernels do not cover
(a CPU tensor outside the Triton interpreter, or float32 on CUDA, where tl.dot would round
through TF32) go to the torch reference backend.
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import Tensor

from resultity_kernels import paged_decode_attention, prefill_attention, write_kv_cache
from resultity_kernels._triton_compat import HAS_TRITON, interpreting

from ._attention import AttentionMetadata, TorchAttentionBackend

__all__ = ["TritonAttentionBackend"]

if not HAS_TRITON:  # the engine falls back to the torch backend on this ImportError
    raise ImportError("resultity_runtime._triton_backend needs triton")

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


class TritonAttentionBackend:
    """AttentionBackend on Triton kernels (CUDA fp16/bf16; CPU float32 under TRITON_INTERPRET)."""

    name = "triton"

    def __init__(self) -> None:
        self._fallback = TorchAttentionBackend()
        self._last_meta: AttentionMetadata | None = None
        self._last_query_lens: list[int] | None = None
        self._split: tuple[Tensor, Tensor, int] | None = None

    def _plan(self, meta: AttentionMetadata) -> tuple[Tensor, Tensor, int] | None:
        # (sequence rows, token rows, longest context) of the single-token sequences of a mixed
        # step, or None; built once per step from the python copies of the lengths
        q_lens, s_lens = meta.query_lens, meta.seq_lens_list
        if q_lens is None or s_lens is None:
            return None
        rows = [i for i, q in enumerate(q_lens) if q == 1]
        if not rows or len(rows) == len(q_lens):
            return None
        starts = list(accumulate(q_lens, initial=0))
        dev = meta.seq_lens.device
        return (torch.tensor(rows, dtype=torch.int64, device=dev),
                torch.tensor([starts[i] for i in rows], dtype=torch.int64, device=dev),
                max(s_lens[i] for i in rows))

    def _covered(self, q: Tensor, k_cache: Tensor) -> bool:
        if q.device.type == "cuda":
            return q.dtype in _KERNEL_DTYPES and k_cache.dtype == q.dtype
        return q.device.type == "cpu" and interpreting()

    def forward(  # noqa: PLR0917 - the AttentionBackend protocol
        self,
        q: Tensor,  # [N, Hq, D]
        k: Tensor,  # [N, Hkv, D], rotary already applied
        v: Tensor,  # [N, Hkv, D]
        k_cache: Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> Tensor:  # [N, Hq, D]
        """Return the attention output ``[N, Hq, D]`` after writing k/v at meta.slot_mapping.

        Raises ValueError (from the kernel wrappers) when the tensors do not fit the layout.
        """
        if not self._covered(q, k_cache):
            return self._fallback.forward(q, k, v, k_cache, v_cache, meta, scale)
        # every layer of a step shares one metadata and one layout: check the first layer only,
        # since the Python checks would cost about as much as a small decode kernel (a new step
        # brings a new metadata object, or at least new python lengths)
        check = meta is not self._last_meta or meta.query_lens is not self._last_query_lens
        if check:
            self._last_meta, self._last_query_lens = meta, meta.query_lens
            self._split = self._plan(meta) if meta.max_query_len > 1 else None
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, validate=check)
        if meta.max_query_len == 1:
            return paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale,
                validate=check,
            )
        split = self._split
        out = prefill_attention(
            q, k, v, meta.query_start_loc, meta.max_query_len, scale,
            k_cache=k_cache, v_cache=v_cache, block_tables=meta.block_tables,
            seq_lens=meta.seq_lens, validate=check, skip_single_token=split is not None,
        )
        if split is not None:
            rows, tok, max_len = split
            out[tok] = paged_decode_attention(
                q[tok], k_cache, v_cache, meta.block_tables[rows], meta.seq_lens[rows], max_len,
                scale, validate=check,
            )
        return out
