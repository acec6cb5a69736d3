"""Sampler logic on synthetic logits (the model-level sampling tests live in test_llm_sampling.py)."""
import numpy as np
import pytest

from fastdeploy.engine.sampler import Sampler, reference_draw
from fastdeploy.engine.sampling_params import SamplingParams, SamplingParamsError
from fastdeploy.engine.sequence import Sequence

VOCAB = 50
EOS = 0


def make_seq(params: SamplingParams, prompt=(1, 2, 3), outputs=()) -> Sequence:
    s = Sequence("r", list(prompt), params, max_tokens=100)
    for t in outputs:
        s.append_token(t)
    return s


def logits_row(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, VOCAB)).astype(np.float32) * 3


def sample(params, row=None, outputs=(), sampler=None):
    sampler = sampler or Sampler([EOS])
    row = logits_row() if row is None else row
    tokens, lps = sampler.sample(row.copy(), [make_seq(params, outputs=outputs)])
    return tokens[0], lps[0]


def test_greedy_and_top_k_1_pick_the_argmax():
    row = logits_row()
    best = int(np.argmax(row))
    assert sample(SamplingParams(temperature=0.0), row)[0] == best
    for seed in range(5):
        assert sample(SamplingParams(temperature=1.0, top_k=1, seed=seed), row)[0] == best


def test_seed_reproducible_and_seeds_differ():
    row = logits_row(1) / 3  # flatter, so different seeds give different draws
    draws = {s: [sample(SamplingParams(seed=s), row)[0] for _ in range(3)] for s in range(8)}
    assert all(len(set(v)) == 1 for v in draws.values())  # fresh sequence, same seed -> same first draw
    assert len({v[0] for v in draws.values()}) > 1


def test_top_p_restricts_to_nucleus():
    row = np.full((1, VOCAB), -10.0, dtype=np.float32)
    row[0, 5], row[0, 6] = 10.0, 9.0
    seen = {sample(SamplingParams(top_p=0.5, seed=s), row)[0] for s in range(30)}
    assert seen == {5}


def test_min_p_filters_relative_to_top():
    row = np.full((1, VOCAB), -5.0, dtype=np.float32)
    row[0, 3] = 5.0
    row[0, 4] = 4.9
    seen = {sample(SamplingParams(min_p=0.5, seed=s), row)[0] for s in range(40)}
    assert seen == {3, 4}


def test_repetition_penalty_lowers_seen_tokens():
    row = np.zeros((1, VOCAB), dtype=np.float32)
    row[0, 1] = 2.0  # token 1 is in the prompt
    row[0, 9] = 1.5
    assert sample(SamplingParams(temperature=0.0), row)[0] == 1
    assert sample(SamplingParams(temperature=0.0, repetition_penalty=2.0), row)[0] == 9


def test_presence_and_frequency_penalties_use_output_counts():
    row = np.zeros((1, VOCAB), dtype=np.float32)
    row[0, 20] = 1.0
    row[0, 21] = 0.5
    assert sample(SamplingParams(temperature=0.0, presence_penalty=1.0), row, outputs=[20])[0] == 21
    assert sample(SamplingParams(temperature=0.0, frequency_penalty=0.3), row, outputs=[20])[0] == 20
    assert sample(SamplingParams(temperature=0.0, frequency_penalty=0.3), row, outputs=[20, 20])[0] == 21
    assert sample(SamplingParams(temperature=0.0, presence_penalty=-1.0), row, outputs=[21])[0] == 21


def test_bad_words_single_and_multi_token():
    row = np.zeros((1, VOCAB), dtype=np.float32)
    row[0, 30] = 5.0
    assert sample(SamplingParams(temperature=0.0, bad_words_token_ids=[[30]]), row)[0] != 30
    # Multi-token word [11, 30]: 30 is banned only right after 11.
    p = SamplingParams(temperature=0.0, bad_words_token_ids=[[11, 30]])
    assert sample(p, row, outputs=[12])[0] == 30
    assert sample(p, row, outputs=[11])[0] != 30


def test_min_tokens_suppresses_eos_and_stop_ids():
    row = np.zeros((1, VOCAB), dtype=np.float32)
    row[0, EOS] = 10.0
    row[0, 7] = 9.0
    assert sample(SamplingParams(temperature=0.0), row)[0] == EOS
    assert sample(SamplingParams(temperature=0.0, min_tokens=2), row, outputs=[4])[0] == 7
    assert sample(SamplingParams(temperature=0.0, min_tokens=2), row, outputs=[4, 4])[0] == EOS
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7])
    assert sample(p, row, outputs=[4])[0] not in (EOS, 7)


def test_logprobs_are_normalised_and_sorted():
    token, lp = sample(SamplingParams(temperature=0.0, logprobs=5))
    assert lp.token_id == token
    values = [v for _, v in lp.top]
    assert values == sorted(values, reverse=True) and len(values) == 5
    assert lp.top[0][0] == token and abs(lp.top[0][1] - lp.logprob) < 1e-9
    row = logits_row()[0].astype(np.float64)
    expected = row - row.max() - np.log(np.exp(row - row.max()).sum())
    assert abs(lp.logprob - expected[token]) < 1e-6


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
                                          ("n", 0), ("max_tokens", 0), ("min_p", 2.0), ("repetition_penalty", 0.0),
                                          ("presence_penalty", 3.0), ("logprobs", 50), ("seed", -1)])
def test_invalid_params_name_the_parameter(field, value):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field


@pytest.mark.parametrize("shape", ["zipf", "peaked", "flat", "ties", "banned"])
@pytest.mark.parametrize("params", [dict(), dict(top_p=0.95), dict(top_p=0.5, temperature=0.7),
                                    dict(min_p=0.05), dict(top_k=40, top_p=0.9), dict(top_k=3000),
                                    dict(temperature=1.3, top_p=0.99, min_p=0.001)])
def test_draw_equals_full_sort_definition(shape, params):
    """The Sampler orders only the head of the vocabulary it needs, sorting values and mapping the
    drawn position back through its ties; every draw must still equal the full-sort definition's,
    on a real-sized vocabulary, from the same seed."""
    vocab = 49152
    gen = np.random.default_rng(7)
    mismatches = []
    for trial in range(25):
        scale = {"peaked": 4.0, "flat": 0.3}.get(shape, 2.0)
        row = (gen.normal(size=vocab) * scale).astype(np.float32)
        if shape == "zipf":  # like a language model's: a few hundred tokens hold most of the mass
            row = gen.permutation(-1.5 * np.log(np.arange(1, vocab + 1)) + row * 0.15).astype(np.float32)
        if shape == "ties":
            row = np.round(row)  # many equal logits at every cut
        if shape == "banned":
            row[gen.integers(0, vocab, size=vocab // 2)] = -np.inf
        p = SamplingParams(seed=trial, **params)
        got, _ = Sampler([EOS]).sample(row[None, :].copy(), [make_seq(p)])
        want = reference_draw(row, p, np.random.default_rng(trial))
        if got[0] != want:
            mismatches.append((trial, got[0], want))
    assert not mismatches


def test_nan_logits_count_as_banned():
    """A NaN logit is never drawn; the rest are sampled as if those tokens were banned (-inf)."""
    row = logits_row(3) / 3
    row[0, ::2] = np.nan
    banned = np.where(np.isnan(row), -np.inf, row).astype(np.float32)
    for s in range(20):
        p = SamplingParams(seed=s, top_p=0.9)
        assert sample(p, row)[0] == reference_draw(banned[0], p, np.random.default_rng(s))


def test_logit_bias_forces_bans_and_shows_in_logprobs():
    row = logits_row(2)
    order = np.argsort(-row[0])
    best, second, last = int(order[0]), int(order[1]), int(order[-1])
    assert sample(SamplingParams(temperature=0.0, logit_bias={last: 100.0}), row)[0] == last
    assert sample(SamplingParams(temperature=0.0, logit_bias={best: -100.0}), row)[0] == second
    for seed in range(10):  # a +100 bias outweighs every other token's share of the draw
        assert sample(SamplingParams(seed=seed, logit_bias={last: 100.0}), row)[0] == last
    token, lp = sample(SamplingParams(temperature=0.0, logprobs=1, logit_bias={last: 100.0}), row)
    assert token == last and lp.logprob > -1e-6 and lp.top[0][0] == last
    # The bias comes first and the repetition penalty then divides the biased logit: (4 + 5) / 2 =
    # 4.5 loses to token 11's 5.0, where penalty-then-bias would give 4 / 2 + 5 = 7.
    row = np.full((1, VOCAB), -10.0, dtype=np.float32)
    row[0, 10], row[0, 11] = 4.0, 5.0
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, logit_bias={10: 5.0})
    assert sample(params, row, outputs=(10,))[0] == 11
    assert sample(params.clone(repetition_penalty=1.0), row, outputs=(10,))[0] == 10

@pytest.mark.parametrize("bias", [{-1: 1.0}, {True: 1.0}, {"5": 1.0}, {5: 100.5}, {5: float("nan")}, {5: "x"}, [5]])
def test_logit_bias_validation_names_the_parameter(bias):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(logit_bias=bias)
    assert info.value.param == "logit_bias"
