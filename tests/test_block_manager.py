"""Block pool accounting and prefix caching, without a model."""
from fastdeploy.engine.block_manager import BlockManager
from fastdeploy.engine.sampling_params import SamplingParams
from fastdeploy.engine.sequence import Sequence


def make_seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(), max_tokens=16)


def admit(bm: BlockManager, seq: Sequence) -> None:
    hits = bm.match_prefix(seq)
    assert bm.can_allocate(seq, hits, seq.num_tokens)
    bm.allocate(seq, hits, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_full_blocks(seq)


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq("a", list(range(10)))
    admit(bm, seq)
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 5
    bm.free(seq)
    assert bm.num_free_blocks == 8
    assert bm.usage() == 0.0


def test_prefix_hit_shares_full_blocks_but_never_the_last_token_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq("a", list(range(12)))
    admit(bm, a)
    b = make_seq("b", list(range(12)))
    hits = bm.match_prefix(b)
    # 12 tokens = 3 full blocks, but the block holding the last token must be recomputed.
    assert hits == a.block_table[:2]
    bm.allocate(b, hits, b.num_tokens)
    assert b.num_computed_tokens == 8
    assert bm.ref_counts[a.block_table[0]] == 2
    c = make_seq("c", list(range(8)) + [99, 98, 97, 96, 95])
    assert bm.match_prefix(c) == a.block_table[:2]
    d = make_seq("d", [7] + list(range(1, 12)))
    assert bm.match_prefix(d) == []


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])
    admit(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    again = make_seq("again", [1, 2, 3, 4, 5])
    assert len(bm.match_prefix(again)) == 2
    # A different request needing every block evicts the cached ones.
    other = make_seq("o", [9] * 8)
    admit(bm, other)
    assert bm.num_free_blocks == 0
    assert bm.match_prefix(make_seq("x", [1, 2, 3, 4, 5])) == []
    bm.free(other)
    assert bm.num_free_blocks == 4


def test_can_allocate_counts_reclaimable_hits():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])
    admit(bm, a)
    bm.free(a)
    b = make_seq("b", [1, 2, 3, 4, 5, 6])
    hits = bm.match_prefix(b)
    assert len(hits) == 2
    assert bm.can_allocate(b, hits, 6)
    assert not bm.can_allocate(b, hits, 8)


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_seq("a", [1, 2, 3, 4, 5])
    admit(bm, a)
    assert bm.match_prefix(make_seq("b", [1, 2, 3, 4, 5])) == []
