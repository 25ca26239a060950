"""Fits: non-negative least squares weighted by relative error, with held-out lengths.

Each model is linear in its coefficients, y ≈ X·β with β ≥ 0, where the columns of X are the
basis functions of the token count (swap-out and swap-in, each fitted on its own: 1, n,
ceil(n/block_size); recompute: 1, n, n²; decode: 1, B, B·T). Dividing each row by its measured
y turns plain NNLS into a fit of relative error, so the 16-token point counts as much as the
32k-token point. R² is reported for that weighted problem (residuals over y), and unweighted
beside it.

Each coefficient is named after the field of the model it fits (`Design.names`): a fit's
`coefficients` build a `CostModel` or `DecodeModel` by name.

Held-out points (every `holdout_every`-th length, never the two ends) are left out of the fit;
`heldout_mape` is the mean absolute percentage error (as a fraction) of the fitted model on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from kvbench.errors import KvbenchError


@dataclass(frozen=True)
class Design:
    """A model's basis functions at the measured points: column j is what the coefficient
    `names[j]` multiplies, named as the model that uses it names it (`CostModel`'s swap_out_*,
    swap_in_* and recompute_* fields, `DecodeModel`'s)."""

    names: tuple[str, ...]
    matrix: np.ndarray  # [points, len(names)]

    def without(self, name: str) -> Design:
        """The design less the term `name` (its coefficient left to the caller)."""
        keep = [i for i, n in enumerate(self.names) if n != name]
        return Design(tuple(self.names[i] for i in keep), self.matrix[:, keep])


@dataclass(frozen=True)
class Fit:
    coefficients: dict[str, float]  # by the design's names: `CostModel(**out, **in, ...)`
    r2: float  # of the weighted (relative-error) problem the fit solves
    r2_unweighted: float  # plain R² on the latencies: dominated by the largest points
    heldout_mape: float | None
    heldout: np.ndarray  # bool mask over the points

    def predict(self, design: Design) -> np.ndarray:
        return design.matrix @ np.array([self.coefficients[name] for name in design.names])


SWAP_PHASES = ("swap_out", "swap_in")


def swap_design(num_tokens, block_size: int, phase: str) -> Design:
    """One direction of a swap (`phase`: "swap_out" or "swap_in"), named by its CostModel
    fields: `{phase}_fixed_ms`, `{phase}_ms_per_token`, `{phase}_ms_per_block`."""
    if phase not in SWAP_PHASES:
        raise ValueError(f"swap phase must be one of {SWAP_PHASES}, got {phase!r}")
    n = np.asarray(num_tokens, dtype=np.float64)
    return Design((f"{phase}_fixed_ms", f"{phase}_ms_per_token", f"{phase}_ms_per_block"),
                  np.column_stack([np.ones_like(n), n, np.ceil(n / block_size)]))


def recompute_design(num_tokens) -> Design:
    n = np.asarray(num_tokens, dtype=np.float64)
    return Design(("recompute_fixed_ms", "recompute_ms_per_token", "recompute_ms_per_token_sq"),
                  np.column_stack([np.ones_like(n), n, n * n]))


def decode_design(batch_size, context_tokens) -> Design:
    b = np.asarray(batch_size, dtype=np.float64)
    t = np.asarray(context_tokens, dtype=np.float64)
    return Design(("d0_ms", "d1_ms_per_seq", "d2_ms_per_seq_token"),
                  np.column_stack([np.ones_like(b), b, b * t]))


def holdout_mask(num_points: int, every: int = 4) -> np.ndarray:
    """Every `every`-th interior point, starting at the second; none if too few points."""
    mask = np.zeros(num_points, dtype=bool)
    if num_points >= 5:
        mask[1:num_points - 1:every] = True
    return mask


def r_squared(y: np.ndarray, predicted: np.ndarray, weights: np.ndarray | None = None) -> float:
    """1 - SS_res/SS_tot, with each residual scaled by `weights` (weighted least squares).

    Sums below rounding noise (1e-20 of the sum of squares, i.e. relative deviations under 1e-10)
    count as zero: constant latencies give 1 when the fit reproduces them, else 0."""
    w = np.ones_like(y) if weights is None else weights
    mean = np.sum(w**2 * y) / np.sum(w**2)
    ss_res = float(np.sum((w * (y - predicted)) ** 2))
    ss_tot = float(np.sum((w * (y - mean)) ** 2))
    noise = 1e-20 * float(np.sum((w * y) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > noise else float(ss_res <= noise)


def mape(y, predicted) -> float:
    """Mean absolute percentage error of `predicted` against measured `y`, as a fraction."""
    y, predicted = np.asarray(y, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    return float(np.mean(np.abs(predicted - y) / y))


def fit_nnls(design: Design, latency_ms, heldout: np.ndarray | None = None) -> Fit:
    """Relative-error NNLS on the points not held out; R² on those, MAPE on the held-out ones."""
    x = design.matrix
    y = np.asarray(latency_ms, dtype=np.float64)
    if y.ndim != 1 or len(y) != len(x):
        raise KvbenchError(f"fit: {len(x)} design rows but {y.size} latencies")
    if np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise KvbenchError("fit: latencies must be finite and positive")
    heldout = np.zeros(len(y), dtype=bool) if heldout is None else heldout
    train = ~heldout
    if train.sum() < x.shape[1]:
        raise KvbenchError(f"fit: need at least {x.shape[1]} points, got {int(train.sum())}")
    weights = 1.0 / y[train]
    beta, _ = nnls(x[train] * weights[:, None], y[train] * weights)
    predicted = x @ beta
    return Fit(
        coefficients=dict(zip(design.names, beta.tolist(), strict=True)),
        r2=r_squared(y[train], predicted[train], weights),
        r2_unweighted=r_squared(y[train], predicted[train]),
        heldout_mape=mape(y[heldout], predicted[heldout]) if heldout.any() else None,
        heldout=heldout,
    )
