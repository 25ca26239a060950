"""Output-length predictors, registered by name in `PREDICTORS`.

A predictor gives each arriving request a predicted total number of output tokens, between 1 and
its `max_tokens`; the memory-aware policies plan with it. When a request outlives its prediction
the engine revises it to min(2 × generated, max_tokens): as many tokens again as so far.

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
from typing import TYPE_CHECKING

import numpy as np

from kvbench.sim.requests import RequestTable

if TYPE_CHECKING:
    from kvbench.sim.engine import SimConfig

MIN_HISTORY_SAMPLES = 16
HISTORY_REFRESH = 16  # recompute a bucket's quantile after this many new finished requests
ALL_BUCKETS = -1


class OraclePredictor:
    def __init__(self, requests: RequestTable, config: SimConfig) -> None:
        self.requests = requests

    def predict(self, ids: np.ndarray) -> np.ndarray:
        return self.requests.output_tokens[ids]

    def observe(self, ids: np.ndarray) -> None:
        """Oracle, noisy and max learn nothing from finished requests."""


class NoisyPredictor(OraclePredictor):
    def __init__(self, requests: RequestTable, config: SimConfig) -> None:
        super().__init__(requests, config)
        rng = np.random.default_rng([config.seed, 1])
        self.factor = np.exp(rng.normal(0.0, config.noise_sigma, requests.size))

    def predict(self, ids: np.ndarray) -> np.ndarray:
        req = self.requests
        guess = np.rint(req.output_tokens[ids] * self.factor[ids]).astype(np.int64)
        return np.clip(guess, 1, req.max_tokens[ids])


class MaxPredictor(OraclePredictor):
    def predict(self, ids: np.ndarray) -> np.ndarray:
        return self.requests.max_tokens[ids]


class HistoryPredictor(OraclePredictor):
    def __init__(self, requests: RequestTable, config: SimConfig) -> None:
        super().__init__(requests, config)
        self.quantile = config.history_quantile
        self.window = config.history_window
        self.outputs: dict[int, deque] = {}  # bucket (or ALL_BUCKETS) -> recent output lengths
        self.cached: dict[int, float] = {}
        self.new_samples: dict[int, int] = {}  # finished since the cached quantile

    @staticmethod
    def bucket(prompt_tokens: np.ndarray) -> np.ndarray:
        return np.floor(np.log2(np.maximum(prompt_tokens, 1))).astype(np.int64)

    def _quantile(self, bucket: int) -> float | None:
        recent = self.outputs.get(bucket, ())
        if len(recent) < MIN_HISTORY_SAMPLES:
            return self._quantile(ALL_BUCKETS) if bucket != ALL_BUCKETS else None
        if bucket not in self.cached or self.new_samples[bucket] >= HISTORY_REFRESH:
            self.cached[bucket] = float(np.quantile(np.fromiter(recent, np.int64),
                                                    self.quantile))
            self.new_samples[bucket] = 0
        return self.cached[bucket]

    def predict(self, ids: np.ndarray) -> np.ndarray:
        req = self.requests
        buckets = self.bucket(req.prompt_tokens[ids]).tolist()
        guess = np.array([self._quantile(b) or 0.0 for b in buckets], dtype=np.float64)
        limit = req.max_tokens[ids]
        return np.where(guess > 0, np.clip(np.rint(guess).astype(np.int64), 1, limit), limit)

    def observe(self, ids: np.ndarray) -> None:
        req = self.requests
        for bucket, output in zip(self.bucket(req.prompt_tokens[ids]).tolist(),
                                  req.output_tokens[ids].tolist()):
            for key in (bucket, ALL_BUCKETS):
                self.outputs.setdefault(key, deque(maxlen=self.window)).append(output)
                self.new_samples[key] = self.new_samples.get(key, 0) + 1


PREDICTORS = {"oracle": OraclePredictor, "noisy": NoisyPredictor, "history": HistoryPredictor,
              "max": MaxPredictor}
