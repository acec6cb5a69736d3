"""Scheduling policy: token budget, chunked prefill, seq cap and preemption, without a model."""
from fastdeploy.config import SchedulerConfig
from fastdeploy.engine.block_manager import BlockManager
from fastdeploy.engine.sampling_params import SamplingParams
from fastdeploy.engine.scheduler import Scheduler
from fastdeploy.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=16, block_size=4, budget=32, max_seqs=8):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), bm), bm


def seq(rid, n):
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(), max_tokens=64)


def run_step(sched):
    """Pretend the model ran: advance computed tokens and append one token when a prompt completes."""
    items = sched.schedule()
    for it in items:
        done = it.completes_prompt
        it.seq.num_computed_tokens += it.num_new_tokens
        if done:
            it.seq.append_token(7)
    return items


def test_chunked_prefill_respects_budget():
    sched, _ = make(budget=10)
    s = seq("a", 25)
    sched.add(s)
    sizes = [it.num_new_tokens for it in run_step(sched)]
    assert sizes == [10]
    assert [it.num_new_tokens for it in run_step(sched)] == [10]
    assert s.num_output_tokens == 0
    assert [it.num_new_tokens for it in run_step(sched)] == [5]
    assert s.num_output_tokens == 1
    assert [it.num_new_tokens for it in run_step(sched)] == [1]


def test_running_first_then_waiting_fifo_and_seq_cap():
    sched, _ = make(budget=100, max_seqs=2)
    for rid in "abc":
        sched.add(seq(rid, 4))
    first = run_step(sched)
    assert [it.seq.request_id for it in first] == ["a", "b"]
    second = run_step(sched)
    assert [it.seq.request_id for it in second] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_preemption_frees_newest_and_requeues_it_first():
    sched, bm = make(num_blocks=4, block_size=4, budget=64)
    a, b = seq("a", 7), seq("b", 7)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 2 blocks each, pool full
    assert bm.num_free_blocks == 0
    # a now has 8 tokens (7 + 1 generated) and needs... still fits block 2; grow b until it overflows.
    for _ in range(3):
        run_step(sched)
    assert sched.num_preemptions >= 1
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert sched.waiting[0] is b
    # After a finishes, b is recomputed from scratch including its generated tokens.
    sched.remove(a)
    tokens_before = b.num_tokens
    hits = len(bm.match_prefix(b)) * 4
    items = run_step(sched)
    assert items[0].seq is b and items[0].num_new_tokens == tokens_before - hits
    assert b.status == SequenceStatus.RUNNING and b.num_tokens == tokens_before + 1


def test_nothing_lost_under_pressure():
    sched, bm = make(num_blocks=6, block_size=4, budget=16, max_seqs=4)
    seqs = [seq(str(i), 5 + i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    for _ in range(200):
        run_step(sched)
        for s in list(sched.running):
            if s.num_output_tokens >= 6:
                sched.remove(s)
        if not sched.has_work():
            break
    assert not sched.has_work()
    assert all(s.num_output_tokens >= 6 for s in seqs)
    assert bm.num_free_blocks == 6


def test_prompt_scoring_chunks_are_capped_and_leave_the_budget_to_others():
    """A prompt-logprobs request computes at most max_prompt_scoring_tokens a step (each row pays
    the lm_head); the rest of the budget goes to other requests."""
    bm = BlockManager(32, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_prompt_scoring_tokens=8), bm)
    scoring = Sequence("s", list(range(1, 21)), SamplingParams(prompt_logprobs=1), max_tokens=64)
    plain = seq("p", 20)
    sched.add(scoring)
    sched.add(plain)
    sizes = []
    while scoring.num_output_tokens == 0:
        items = run_step(sched)
        sizes.append([(it.seq.request_id, it.num_new_tokens) for it in items])
        # What EngineCore does: the first token's entry, then one per token whose predecessor is computed.
        done = min(scoring.num_computed_tokens + 1, scoring.num_prompt_tokens)
        scoring.prompt_logprobs.extend([None] * (done - len(scoring.prompt_logprobs)))
    assert sizes == [[("s", 8), ("p", 20)], [("s", 8), ("p", 1)], [("s", 4), ("p", 1)]]
    assert not scoring.prompt_logprobs_pending
    assert [it.num_new_tokens for it in run_step(sched)] == [1, 1]  # decode as usual


def test_prompt_scoring_cap_needs_chunked_prefill():
    bm = BlockManager(32, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_prompt_scoring_tokens=8,
                                      enable_chunked_prefill=False), bm)
    scoring = Sequence("s", list(range(1, 21)), SamplingParams(prompt_logprobs=1), max_tokens=64)
    sched.add(scoring)
    assert [it.num_new_tokens for it in run_step(sched)] == [20]
