"""Batched sampling with per-request parameters, on the host in float32 numpy.

Order per row: logits processors (repetition/presence/frequency penalties, bad words, min_tokens
EOS suppression) → logprobs of the processed distribution → greedy argmax, or temperature,
top-k, top-p, min-p and a draw from the row's own generator (seeded requests) or the shared one.
"""
from __future__ import annotations

import numpy as np

from fastdeploy.engine.protocol import TokenLogprobs
from fastdeploy.engine.sampling_params import SamplingParams
from fastdeploy.engine.sequence import Sequence

_NEG_INF = np.float32(-np.inf)


def _apply_penalties(row: np.ndarray, seq: Sequence) -> None:
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = np.fromiter(set(seq.all_token_ids), dtype=np.int64)
        seen = seen[seen < row.shape[0]]
        vals = row[seen]
        row[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_counts:
        ids = np.fromiter(seq.output_counts.keys(), dtype=np.int64)
        counts = np.fromiter(seq.output_counts.values(), dtype=np.float32)
        row[ids] -= p.frequency_penalty * counts + p.presence_penalty


def _apply_bans(row: np.ndarray, seq: Sequence, eos_token_ids: list[int]) -> None:
    p = seq.params
    if p.bad_words_token_ids:
        out = seq.output_token_ids
        for word in p.bad_words_token_ids:
            prefix = word[:-1]
            if not prefix or out[len(out) - len(prefix):] == prefix:
                row[word[-1]] = _NEG_INF
    if seq.num_output_tokens < p.min_tokens:
        banned = list(eos_token_ids) + list(p.stop_token_ids or [])
        row[[t for t in banned if t < row.shape[0]]] = _NEG_INF


def _log_softmax(row: np.ndarray) -> np.ndarray:
    m = row.max()
    shifted = row - m
    return shifted - np.log(np.exp(shifted).sum())


def _filter_and_draw(row: np.ndarray, seq: Sequence, rng: np.random.Generator) -> int:
    """Top-k, then top-p / min-p over the candidates ordered by logit (descending, ties by token
    id), then a draw of u * (kept mass) along that order.

    Only the values are sorted (numpy's vectorised float sort); the drawn position is mapped back to
    its token through the ties of its value, in id order. Arg-sorting the 49k vocabulary by (logit,
    id) as reference_draw does cost 8-10 ms per row on the AVX2 VM, 3-4x this
    (scripts/bench_sampler.py), against a batch-1 decode step of ~25 ms.
    """
    p = seq.params
    scaled = row / np.float32(p.temperature)
    if np.isnan(scaled).any():  # a NaN would match no tie below: such tokens are never drawn
        scaled = np.where(np.isnan(scaled), _NEG_INF, scaled)
    vocab = scaled.shape[0]
    k = p.top_k if 0 < p.top_k < vocab else vocab
    pool = np.sort(np.argpartition(-scaled, k - 1)[:k]) if k < vocab else None  # ids ascending
    logits = scaled[pool] if pool is not None else scaled
    desc = -np.sort(-logits)
    probs = np.exp(desc.astype(np.float64) - desc[0])
    probs /= probs.sum()
    cum = np.cumsum(probs)
    keep = probs.shape[0]
    if p.top_p < 1.0:
        keep = min(keep, int(np.searchsorted(cum, p.top_p, side="left")) + 1)
    if p.min_p > 0.0:
        keep = min(keep, max(1, int(np.count_nonzero(probs >= p.min_p * probs[0]))))
    cum = cum[:keep]
    pos = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), keep - 1)
    value = desc[pos]
    first = int(np.searchsorted(-desc, -value, side="left"))  # where this value's ties begin
    index = int(np.flatnonzero(logits == value)[pos - first])
    return int(pool[index]) if pool is not None else index


def reference_draw(row: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The definition _filter_and_draw implements, written the direct way: every candidate
    arg-sorted by (logit descending, token id), top-k, top-p / min-p, then u * (kept mass) along
    the order. Equal draws from the same generator state, several times slower (it sorts indices of
    the whole vocabulary); for tests and scripts/bench_sampler.py."""
    scaled = row / np.float32(params.temperature)
    vocab = scaled.shape[0]
    k = params.top_k if 0 < params.top_k < vocab else vocab
    cand = np.argpartition(-scaled, k - 1)[:k] if k < vocab else np.arange(vocab)
    cand = cand[np.lexsort((cand, -scaled[cand]))]
    probs = np.exp(scaled[cand].astype(np.float64) - scaled[cand[0]])
    probs /= probs.sum()
    keep = probs.shape[0]
    if params.top_p < 1.0:
        keep = min(keep, int(np.searchsorted(np.cumsum(probs), params.top_p, side="left")) + 1)
    if params.min_p > 0.0:
        keep = min(keep, max(1, int(np.count_nonzero(probs >= params.min_p * probs[0]))))
    cum = np.cumsum(probs[:keep])
    return int(cand[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), keep - 1)])


class Sampler:
    def __init__(self, eos_token_ids: list[int], seed: int | None = None) -> None:
        self.eos_token_ids = eos_token_ids
        self.shared_rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """One token per row of logits [len(seqs), vocab] (float32, modified in place)."""
        simple = all(s.params.greedy and s.params.logprobs is None and not _needs_processing(s) for s in seqs)
        if simple:
            return [int(t) for t in np.argmax(logits, axis=1)], [None] * len(seqs)
        tokens: list[int] = []
        logprobs: list[TokenLogprobs | None] = []
        for row, seq in zip(logits, seqs):
            _apply_penalties(row, seq)
            _apply_bans(row, seq, self.eos_token_ids)
            if seq.params.greedy:
                token = int(np.argmax(row))
            else:
                token = _filter_and_draw(row, seq, seq.rng or self.shared_rng)
            tokens.append(token)
            logprobs.append(self._logprobs(row, token, seq.params.logprobs))
        return tokens, logprobs

    @staticmethod
    def _logprobs(row: np.ndarray, token: int, num_top: int | None) -> TokenLogprobs | None:
        if num_top is None:
            return None
        lp = _log_softmax(row.astype(np.float64))
        top: list[tuple[int, float]] = []
        if num_top > 0:
            idx = np.argpartition(-lp, num_top - 1)[:num_top]
            idx = idx[np.argsort(-lp[idx], kind="stable")]
            top = [(int(i), float(lp[i])) for i in idx]
        return TokenLogprobs(token_id=token, logprob=float(lp[token]), top=top)


def _needs_processing(seq: Sequence) -> bool:
    p = seq.params
    return bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.bad_words_token_ids
                or seq.num_output_tokens < p.min_tokens)
