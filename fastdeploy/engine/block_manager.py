"""KV block pool with prefix caching.

Full blocks are identified by a chained hash (parent hash + the block's tokens), so two requests
with the same first k*block_size tokens share k blocks. Blocks nobody references stay cached in an
LRU and are evicted only when a fresh block is needed and no never-cached block is free.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from fastdeploy.engine.sequence import Sequence


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free_plain: list[int] = list(range(num_blocks - 1, -1, -1))
        """Unreferenced blocks holding nothing reusable; popped from the end."""
        self.free_cached: OrderedDict[int, None] = OrderedDict()
        """Unreferenced blocks that still hold a cached prefix, oldest first (evicted first)."""
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_plain) + len(self.free_cached)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        if self.free_plain:
            block = self.free_plain.pop()
        else:
            block, _ = self.free_cached.popitem(last=False)
            old = self.block_hash[block]
            if old is not None and self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self.free_cached.pop(block, None)
        self.ref_counts[block] += 1

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold seq's leading full blocks (never the block of its last token)."""
        if not self.enable_prefix_caching:
            return []
        tokens = seq.all_token_ids
        # The last token must be computed to produce logits, so its block is never a hit.
        max_full = (len(tokens) - 1) // self.block_size
        hits: list[int] = []
        parent = b""
        for i in range(max_full):
            h = chain_hash(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
            parent = h
        return hits

    def can_allocate(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        fresh = self.blocks_needed(num_tokens) - len(hits)
        reclaimable_hits = sum(1 for b in hits if self.ref_counts[b] == 0)
        return self.num_free_blocks - reclaimable_hits >= fresh

    def allocate(self, seq: Sequence, hits: list[int], num_tokens: int) -> None:
        """Give a waiting seq its prefix hits plus fresh blocks covering num_tokens tokens."""
        for block in hits:
            self._ref(block)
        seq.block_table = list(hits)
        seq.block_hashes = [self.block_hash[b] for b in hits]  # type: ignore[misc]
        seq.num_computed_tokens = len(hits) * self.block_size
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_computed_tokens
        self.grow(seq, num_tokens)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Append fresh blocks until seq's table covers num_tokens tokens."""
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self._take_free_block())

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so the most specific (least shareable) prefix blocks are evicted first.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is not None:
                    self.free_cached[block] = None
                else:
                    self.free_plain.append(block)
        seq.block_table = []
        seq.block_hashes = []

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish hashes of seq's newly completed (computed) full blocks for reuse."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        tokens = seq.all_token_ids
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            h = chain_hash(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
