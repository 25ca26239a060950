"""Output-length predictors, registered by name in `PREDICTORS`.

A predictor gives each arriving request a predicted total number of output tokens, between 1 and
its `max_tokens`; the memory-aware policies plan with it. Predictors see plain arrays (request
ids, prompt lengths, max_tokens, and the true output length for the oracle: in a real engine, a
per-request hint), never the engine, and learn from finished requests through `observe`. When a
request outlives its prediction the engine revises it to min(2 × generated, max_tokens): as many
tokens again as so far.

* `oracle`  the true output length (an upper bound on what prediction can buy);
* `noisy`   the true length times exp(N(0, sigma²)), one draw per request, seeded;
* `history` a quantile of the output lengths of the last `window` finished requests in the
            same prompt-length bucket (powers of two), falling back to all buckets, then to
            max_tokens while fewer than `MIN_HISTORY_SAMPLES` requests have finished; the
            quantile is refreshed every `HISTORY_REFRESH` finished requests;
* `max`     the request's max_tokens.
"""

from __future__ import annotations

from collections import deque

import numpy as np

MIN_HISTORY_SAMPLES = 16
HISTORY_REFRESH = 16  # recompute a bucket's quantile after this many new finished requests
ALL_BUCKETS = -1


class OraclePredictor:
    def predict(self, ids: np.ndarray, prompt_tokens: np.ndarray, max_tokens: np.ndarray,
                output_tokens: np.ndarray) -> np.ndarray:
        return output_tokens

    def observe(self, prompt_tokens: np.ndarray, output_tokens: np.ndarray) -> None:
        """Oracle, noisy and max learn nothing from finished requests."""


class NoisyPredictor(OraclePredictor):
    """One log-normal factor per request id, drawn in id order from the seeded stream."""

    def __init__(self, seed: int = 0, noise_sigma: float = 0.5) -> None:
        self.rng = np.random.default_rng([seed, 1])
        self.sigma = noise_sigma
        self.factor = np.zeros(0)

    def predict(self, ids, prompt_tokens, max_tokens, output_tokens):
        needed = int(ids.max()) + 1 if ids.size else 0
        if needed > self.factor.size:  # draw on, at least doubling: the stream's values in
            # order, one draw of many being as many draws of one
            more = self.rng.normal(0.0, self.sigma, max(needed, 2 * self.factor.size)
                                   - self.factor.size)
            self.factor = np.concatenate([self.factor, np.exp(more)])
        guess = np.rint(output_tokens * self.factor[ids]).astype(np.int64)
        return np.minimum(np.maximum(guess, 1), max_tokens)


class MaxPredictor(OraclePredictor):
    def predict(self, ids, prompt_tokens, max_tokens, output_tokens):
        return max_tokens


class HistoryPredictor(OraclePredictor):
    def __init__(self, history_quantile: float = 0.5, history_window: int = 1000) -> None:
        self.quantile = history_quantile
        self.window = history_window
        self.outputs: dict[int, deque] = {}  # bucket (or ALL_BUCKETS) -> recent output lengths
        self.cached: dict[int, float] = {}
        self.new_samples: dict[int, int] = {}  # finished since the cached quantile

    @staticmethod
    def buckets(prompt_tokens: np.ndarray) -> list[int]:
        """floor(log2(prompt length)), exactly, of a few requests (arrivals or finishes)."""
        return [max(tokens, 1).bit_length() - 1 for tokens in prompt_tokens.tolist()]

    def _quantile(self, bucket: int) -> float | None:
        recent = self.outputs.get(bucket, ())
        if len(recent) < MIN_HISTORY_SAMPLES:
            return self._quantile(ALL_BUCKETS) if bucket != ALL_BUCKETS else None
        if bucket not in self.cached or self.new_samples[bucket] >= HISTORY_REFRESH:
            self.cached[bucket] = float(np.quantile(np.fromiter(recent, np.int64),
                                                    self.quantile))
            self.new_samples[bucket] = 0
        return self.cached[bucket]

    def predict(self, ids, prompt_tokens, max_tokens, output_tokens):
        # Arrivals come a few at a time: plain floats (round() rounds half to even, as np.rint).
        guess = [self._quantile(b) for b in self.buckets(prompt_tokens)]
        return np.array([min(max(round(g), 1), m) if g else m
                         for g, m in zip(guess, max_tokens.tolist())], dtype=np.int64)

    def observe(self, prompt_tokens, output_tokens):
        for bucket, output in zip(self.buckets(prompt_tokens), output_tokens.tolist()):
            for key in (bucket, ALL_BUCKETS):
                self.outputs.setdefault(key, deque(maxlen=self.window)).append(output)
                self.new_samples[key] = self.new_samples.get(key, 0) + 1


PREDICTORS = {"oracle": OraclePredictor, "noisy": NoisyPredictor, "history": HistoryPredictor,
              "max": MaxPredictor}
