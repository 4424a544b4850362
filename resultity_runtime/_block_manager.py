"""A pool of fixed-size KV cache blocks with per-sequence block tables.

Plain Python (no torch): the scheduler and its property tests use it alone.

A token at position ``p`` of a sequence lives in cache slot
``table[p // block_size] * block_size + p % block_size``.

Prefix caching (optional): once every token of a full block has been computed, the block is
registered under a digest of the whole token prefix up to its end (a sha256 chain, so equal
digests mean equal prefixes). A later sequence with the same prefix shares those blocks
(reference counted) and skips computing them. A shared block is never written again: only
whole, computed blocks are shared, and a sequence writes only positions past its cached prefix.
Freed blocks keep their registration until the pool hands them out again (evicted in order).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["BlockManager"]


def _block_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    """Owns ``num_blocks`` blocks of ``block_size`` token slots and the table of each sequence."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._block_digest: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        # free blocks, popped from the front; unregistered blocks sit in front of registered ones
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._tables: dict[int, list[int]] = {}
        # per sequence: digests of its leading full blocks that are registered or known
        self._digests: dict[int, list[bytes]] = {}
        self.hit_tokens = 0  # prompt tokens served from the prefix cache (a running total)

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        """Returns the live block table of ``seq_id`` (do not mutate it)."""
        return self._tables[seq_id]

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def tables(self) -> dict[int, list[int]]:
        """Returns every live table by sequence id (for checks and tests)."""
        return self._tables

    def is_registered(self, block_id: int) -> bool:
        return self._block_digest[block_id] is not None

    # ---- allocation ----------------------------------------------------------------------

    def _prefix_hits(self, token_ids: Sequence[int]) -> tuple[list[int], list[bytes]]:
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        # at least one token must stay uncached so the model produces logits for it
        max_blocks = (len(token_ids) - 1) // bs
        hits: list[int] = []
        digests: list[bytes] = []
        parent = b""
        for i in range(max_blocks):
            digest = _block_digest(parent, token_ids[i * bs : (i + 1) * bs])
            block = self._cached.get(digest)
            if block is None:
                break
            hits.append(block)
            digests.append(digest)
            parent = digest
        return hits, digests

    def _pop_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        digest = self._block_digest[block]
        if digest is not None:
            del self._cached[digest]
            self._block_digest[block] = None
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int | None:
        """Gives ``seq_id`` blocks for all of ``token_ids``, reusing cached prefix blocks.

        Returns the number of leading tokens whose KV is already cached (a multiple of
        block_size, always < len(token_ids)), or None (nothing changed) if the pool lacks room.
        Raises ValueError if the sequence already has blocks or ``token_ids`` is empty.
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        if not token_ids:
            raise ValueError("cannot allocate for an empty sequence")
        hits, digests = self._prefix_hits(token_ids)
        fresh = self.blocks_for(len(token_ids)) - len(hits)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)
        if fresh + revived > len(self._free):
            return None
        for block in hits:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
        table = hits + [self._pop_free() for _ in range(fresh)]
        self._tables[seq_id] = table
        self._digests[seq_id] = digests
        self.hit_tokens += len(hits) * self.block_size
        return len(hits) * self.block_size

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        """Returns whether ``seq_id`` can grow to hold ``num_tokens`` tokens in total."""
        need = self.blocks_for(num_tokens) - len(self._tables[seq_id])
        return need <= len(self._free)

    def append_slots(self, seq_id: int, num_tokens: int) -> None:
        """Grows the table of ``seq_id`` to hold ``num_tokens`` tokens in total.

        Raises RuntimeError if the pool lacks the blocks (check with can_append first).
        """
        table = self._tables[seq_id]
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            raise RuntimeError("KV block pool exhausted")
        for _ in range(need):
            table.append(self._pop_free())

    def mark_computed(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Registers the full blocks of ``seq_id`` whose tokens are all computed (prefix cache)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        table = self._tables[seq_id]
        digests = self._digests[seq_id]
        full = min(num_computed // bs, len(table))
        parent = digests[-1] if digests else b""
        for i in range(len(digests), full):
            digest = _block_digest(parent, token_ids[i * bs : (i + 1) * bs])
            digests.append(digest)
            block = table[i]
            if digest not in self._cached and self._block_digest[block] is None:
                self._cached[digest] = block
                self._block_digest[block] = digest
            parent = digest

    def free(self, seq_id: int) -> None:
        """Returns the blocks of ``seq_id`` to the pool at once (no-op if it has none)."""
        table = self._tables.pop(seq_id, None)
        self._digests.pop(seq_id, None)
        if table is None:
            return
        # tail first, so that the shared head of a prefix stays cached the longest
        for block in reversed(table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self._free[block] = None
                if self._block_digest[block] is None:
                    self._free.move_to_end(block, last=False)

    def check_invariants(self) -> None:
        """Raises AssertionError if the pool's bookkeeping is inconsistent (used by tests)."""
        owners = [0] * self.num_blocks
        for table in self._tables.values():
            assert len(set(table)) == len(table), "a table holds a block twice"
            for block in table:
                owners[block] += 1
        for block in range(self.num_blocks):
            assert owners[block] == self.ref_counts[block], f"ref count of block {block}"
            assert (block in self._free) == (owners[block] == 0), f"free state of block {block}"
            if owners[block] > 1:
                assert self._block_digest[block] is not None, f"unregistered shared {block}"
        for digest, block in self._cached.items():
            assert self._block_digest[block] == digest
