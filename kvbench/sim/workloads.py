"""Workloads for the simulator: seeded synthetic mixes and trace replay from CSV.

A `Workload` is four arrays indexed by request id, sorted by arrival: `arrival_s` (seconds from
the first arrival), `prompt_tokens`, `output_tokens` (what the request will generate) and
`max_tokens` (its generation limit, never below `output_tokens`; the `max` predictor and the
`reserve-max` admission use it).

Traces that carry their prompts' content, so that requests share prefixes (Mooncake's JSONL,
token ids inline), are read by `kvbench.sim.jsonl_traces`; their workloads hold the prompts'
token ids (`tokens`). Two CSV schemas are read, recognised by their header:

* Azure LLM inference trace 2023: `TIMESTAMP, ContextTokens, GeneratedTokens` (wall-clock
  timestamps such as `2023-11-16 18:15:46.6805900`);
* plain: `arrival_s, prompt_tokens, output_tokens` and optionally `max_tokens`.

Any other column is named: a near-miss of a column the schema reads (`max_token`) is an error,
any other a warning. A trace is a CSV path, or the name of one shipped with kvbench
(`BUNDLED_TRACES`, e.g. `azure-conv-2023`); `resolve_trace` is where names become files.

`rate_scale` divides the time axis (2.0 replays the trace twice as fast: twice the load).
Token counts lie between 1 and `kvbench.limits.MAX_TOKENS`, arrival times are finite (a NaN
time would pass every ordering check and stall the simulator's clock) and span at most
`MAX_DURATION_S`: float64 seconds still resolve 0.12 µs there, while at 1e15 s a 10 ms step
would be lost in rounding. A span is checked in Python floats before numpy subtracts or divides
arrival times, so a trace beyond it is one error naming its rows, not an overflow warning.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvbench.console import stderr_warning
from kvbench.errors import KvbenchError
from kvbench.limits import MAX_TOKENS, check_finite

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
PLAIN_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")
# Shipped with the package (CC BY 4.0, see kvbench/data/traces/README.md), so an installed
# kvbench finds it wherever it runs.
AZURE_CONV_TRACE = (Path(__file__).resolve().parents[1] / "data" / "traces"
                    / "azure_llm_2023_conv.csv")
# Mooncake's synthetic trace (Apache 2.0): requests that share prefixes (kvbench.sim.jsonl_traces).
MOONCAKE_SYNTHETIC_TRACE = AZURE_CONV_TRACE.parent / "mooncake_synthetic_trace.jsonl"
# Traces shipped with the package, by the name a user may give instead of a path.
BUNDLED_TRACES = {"azure-conv-2023": AZURE_CONV_TRACE,
                  "mooncake-synthetic": MOONCAKE_SYNTHETIC_TRACE}
MAX_SYNTHETIC_REQUESTS = 10_000_000  # ~2 GB of per-request state in the simulator
MIN_CV, MAX_CV = 1e-3, 100.0  # gamma shape 1/cv² from 1e6 (a metronome) to 1e-4 (one burst)
MAX_DURATION_S = 1e9  # about 32 years from the first arrival to the last
# Lengths are drawn up to 3/2 of their mean: means up to 2/3 of MAX_TOKENS keep them within it.
SPEC_MAXIMA = {"num_requests": MAX_SYNTHETIC_REQUESTS, "max_tokens": MAX_TOKENS}


class WorkloadError(KvbenchError):
    """A workload that cannot be built; the message names the file, row and column."""


@dataclass(frozen=True)
class TokenIds:
    """Request i's prompt is `flat[offsets[i]:offsets[i + 1]]`; it generates `output_token[i]`."""

    offsets: np.ndarray
    flat: np.ndarray
    output_token: np.ndarray

    def prompt(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def subset(self, keep: np.ndarray) -> TokenIds:
        """The requests where `keep` (a boolean mask) is true, in order."""
        lengths = np.diff(self.offsets)
        owner = np.repeat(keep, lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths[keep])])
        return TokenIds(offsets, self.flat[owner], self.output_token[keep])

    def check(self, workload: Workload) -> None:
        """Raise WorkloadError naming the first request whose prompt length disagrees."""
        lengths = np.diff(self.offsets)
        if lengths.size != workload.num_requests or self.output_token.size != lengths.size:
            raise WorkloadError(f"token ids for {lengths.size} requests, workload "
                                f"{workload.name} has {workload.num_requests}")
        bad = np.flatnonzero(lengths != workload.prompt_tokens)
        if bad.size:
            i = int(bad[0])
            raise WorkloadError(f"request {i}: {lengths[i]} prompt token ids, the workload says "
                                f"{workload.prompt_tokens[i]} prompt tokens")


@dataclass(frozen=True)
class Workload:
    name: str
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    max_tokens: np.ndarray
    # The prompts' token ids, when the workload defines them (a trace whose requests share
    # prefixes); otherwise the simulator and the vLLM drive draw random ones (seeded).
    tokens: TokenIds | None = None

    def __post_init__(self) -> None:
        n = self.arrival_s.size
        for field in ("prompt_tokens", "output_tokens", "max_tokens"):
            if getattr(self, field).size != n:
                raise WorkloadError(f"workload {self.name}: {field} has "
                                    f"{getattr(self, field).size} entries, arrival_s has {n}")
        if n == 0:
            raise WorkloadError(f"workload {self.name}: no requests")
        if not np.isfinite(self.arrival_s).all():
            raise WorkloadError(f"workload {self.name}: arrival times must be finite (request "
                                f"{np.flatnonzero(~np.isfinite(self.arrival_s))[0]})")
        if np.any(np.diff(self.arrival_s) < 0):
            raise WorkloadError(f"workload {self.name}: arrivals must be sorted")
        if self.duration_s > MAX_DURATION_S:
            raise WorkloadError(f"workload {self.name}: arrivals span more than "
                                f"{MAX_DURATION_S:g} s (about 32 years)")
        if np.any(self.prompt_tokens < 1) or np.any(self.output_tokens < 1):
            raise WorkloadError(f"workload {self.name}: every request needs at least one prompt "
                                "and one output token")
        if np.any(self.max_tokens < self.output_tokens):
            raise WorkloadError(f"workload {self.name}: max_tokens below output_tokens")
        for field in ("prompt_tokens", "max_tokens"):
            if np.any(getattr(self, field) > MAX_TOKENS):
                raise WorkloadError(f"workload {self.name}: {field} above {MAX_TOKENS}")
        if self.tokens is not None:
            self.tokens.check(self)

    @property
    def num_requests(self) -> int:
        return int(self.arrival_s.size)

    @property
    def duration_s(self) -> float:
        """From the first arrival to the last (in Python floats: inf, not a numpy overflow)."""
        return float(self.arrival_s[-1]) - float(self.arrival_s[0])

    def subset(self, keep: np.ndarray) -> Workload:
        """The requests where `keep` is true, in order."""
        return dataclasses.replace(self, arrival_s=self.arrival_s[keep],
                                   prompt_tokens=self.prompt_tokens[keep],
                                   output_tokens=self.output_tokens[keep],
                                   max_tokens=self.max_tokens[keep],
                                   tokens=None if self.tokens is None
                                   else self.tokens.subset(keep))

    def describe(self) -> dict:
        rate_per_s = self.num_requests / self.duration_s if self.duration_s else math.inf
        return {"name": self.name, "num_requests": self.num_requests,
                "duration_s": self.duration_s,
                "arrival_rate_per_s": rate_per_s if math.isfinite(rate_per_s) else None,
                "mean_prompt_tokens": float(self.prompt_tokens.mean()),
                "mean_output_tokens": float(self.output_tokens.mean())}


def _workload(name: str, arrival_s, prompt, output, max_tokens=None) -> Workload:
    """At least one request, sorted by arrival (stable), the first arriving at 0; max_tokens
    defaults to the longest output."""
    arrival_s = np.asarray(arrival_s, dtype=np.float64)
    order = np.argsort(arrival_s, kind="stable")
    arrival_s = arrival_s[order]
    output = np.asarray(output, dtype=np.int64)[order]
    max_tokens = (np.full(output.size, output.max()) if max_tokens is None
                  else np.asarray(max_tokens, dtype=np.int64)[order])
    return Workload(name, arrival_s - arrival_s[0], np.asarray(prompt, dtype=np.int64)[order],
                    output, max_tokens)


# ---------------------------------------------------------------------------------------------
# Synthetic mixes

@dataclass(frozen=True)
class SyntheticSpec:
    """Short and long prompts and outputs in given proportions, arriving at `rate_per_s`.

    Lengths are drawn uniformly in [mean/2, 3·mean/2]; prompt and output classes are drawn
    independently. Arrivals are Poisson, or gamma with coefficient of variation `cv` (burstier
    for cv > 1).
    """

    num_requests: int = 1000
    rate_per_s: float = 10.0
    arrivals: str = "poisson"
    cv: float = 1.0
    long_prompt_fraction: float = 0.2
    short_prompt_tokens: int = 256
    long_prompt_tokens: int = 2048
    long_output_fraction: float = 0.2
    short_output_tokens: int = 128
    long_output_tokens: int = 1024
    max_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.arrivals not in ("poisson", "gamma"):
            raise WorkloadError(f"synthetic: arrivals must be poisson or gamma, got "
                                f"{self.arrivals!r}")
        for field in ("num_requests", "short_prompt_tokens", "long_prompt_tokens",
                      "short_output_tokens", "long_output_tokens", "max_tokens"):
            value, high = getattr(self, field), SPEC_MAXIMA.get(field, MAX_TOKENS * 2 // 3)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or not 1 <= value <= high:
                raise WorkloadError(f"synthetic: {SPEC_KEYS_BY_FIELD[field]} must be an integer "
                                    f"from 1 to {high}, got {value!r}")
        check_finite("synthetic: rate", self.rate_per_s, positive=True, error=WorkloadError)
        check_finite("synthetic: cv", self.cv, low=MIN_CV, high=MAX_CV, error=WorkloadError)
        for field in ("long_prompt_fraction", "long_output_fraction"):
            check_finite(f"synthetic: {SPEC_KEYS_BY_FIELD[field]}", getattr(self, field), low=0,
                         high=1, error=WorkloadError)
        longest = (3 * max(self.short_output_tokens, self.long_output_tokens) + 1) // 2
        if self.max_tokens < longest:
            raise WorkloadError(f"synthetic: max-tokens ({self.max_tokens}) must be at least the "
                                f"longest possible output ({longest})")


SPEC_KEYS = {
    "requests": ("num_requests", int), "rate": ("rate_per_s", float),
    "arrivals": ("arrivals", str), "cv": ("cv", float),
    "long-prompt": ("long_prompt_fraction", float),
    "short-prompt-tokens": ("short_prompt_tokens", int),
    "long-prompt-tokens": ("long_prompt_tokens", int),
    "long-output": ("long_output_fraction", float),
    "short-output-tokens": ("short_output_tokens", int),
    "long-output-tokens": ("long_output_tokens", int),
    "max-tokens": ("max_tokens", int),
}
SPEC_KEYS_BY_FIELD = {field: key for key, (field, _) in SPEC_KEYS.items()}


def parse_synthetic_spec(text: str) -> SyntheticSpec:
    """'requests=500,rate=8,arrivals=gamma,cv=2,long-prompt=0.3' -> SyntheticSpec."""
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in SPEC_KEYS:
            raise WorkloadError(f"synthetic spec: {item!r} is not KEY=VALUE with KEY one of "
                                f"{', '.join(SPEC_KEYS)}")
        field, kind = SPEC_KEYS[key]
        try:
            values[field] = kind(value.strip())
        except ValueError:
            raise WorkloadError(f"synthetic spec: {key}={value!r} is not a valid "
                                f"{kind.__name__}") from None
    return SyntheticSpec(**values)


def _lengths(rng: np.random.Generator, n: int, long_fraction: float, short_mean: int,
             long_mean: int) -> np.ndarray:
    mean = np.where(rng.random(n) < long_fraction, long_mean, short_mean)
    return np.maximum(1, np.rint(mean * rng.uniform(0.5, 1.5, n))).astype(np.int64)


def synthetic(spec: SyntheticSpec, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    n = spec.num_requests
    if spec.arrivals == "poisson":
        gaps = rng.exponential(1.0 / spec.rate_per_s, n)
    else:  # gamma with mean 1/rate and coefficient of variation cv: shape 1/cv², scale cv²/rate
        gaps = rng.gamma(1.0 / spec.cv**2, spec.cv**2 / spec.rate_per_s, n)
    with np.errstate(over="ignore"):  # a sum beyond the float range is inf: refused below
        arrival_s = np.cumsum(gaps)
    if not arrival_s[-1] <= MAX_DURATION_S:
        raise WorkloadError(f"synthetic: rate {spec.rate_per_s:g}/s puts arrival times beyond "
                            f"{MAX_DURATION_S:g} s (about 32 years); give a higher rate")
    prompt = _lengths(rng, n, spec.long_prompt_fraction, spec.short_prompt_tokens,
                      spec.long_prompt_tokens)
    output = _lengths(rng, n, spec.long_output_fraction, spec.short_output_tokens,
                      spec.long_output_tokens)
    name = f"synthetic({spec.arrivals}, {n} requests at {spec.rate_per_s:g}/s, seed {seed})"
    return _workload(name, arrival_s, prompt, output, np.full(n, spec.max_tokens))


# ---------------------------------------------------------------------------------------------
# Trace replay

def _parse_seconds(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise KvbenchError(text)
    return value


def _parse_timestamp(text: str) -> float:
    stamp = np.datetime64(text.strip(), "ns")
    # NaT, or a year outside 1678-2261 (nanoseconds in int64), which numpy wraps around silently
    if np.isnat(stamp) or stamp.astype("datetime64[s]") != np.datetime64(text.strip(), "s"):
        raise KvbenchError(text)
    return stamp.astype(np.int64) / 1e9


COLUMN_KINDS = {  # column -> (fast numpy dtype, per-value parser, what a good value looks like)
    "TIMESTAMP": ("datetime64[ns]", _parse_timestamp,
                  "a timestamp like 2023-11-16 18:15:46.6805900 (years 1678 to 2261)"),
    "arrival_s": (np.float64, _parse_seconds, "a finite number of seconds"),
}
INT_KIND = (np.int64, int, f"an integer from 1 to {MAX_TOKENS}")


def _column(path: Path, rows: list[dict], lines: list[int], column: str) -> np.ndarray:
    """One column as numpy: a vectorized parse, or a row-by-row pass naming the first bad row."""
    dtype, parse, looks_like = COLUMN_KINDS.get(column, INT_KIND)
    values = [row[column] for row in rows]
    try:
        arr = np.array(values, dtype=dtype)
        if column == "TIMESTAMP":  # no NaT and no wrapped year (as in _parse_timestamp); then
            # ns from the first as uint64: a span over 292 years overflows int64, not uint64
            exact = (arr.astype("datetime64[s]") == np.array(values, "datetime64[s]")).all()
            arr = (arr - arr.min()).astype(np.int64).view(np.uint64) / 1e9 if exact else None
        if arr is not None and (np.isfinite(arr).all() if arr.dtype.kind == "f" else
                                ((arr >= 1) & (arr <= MAX_TOKENS)).all()):
            return arr
    except (ValueError, TypeError, OverflowError):
        pass
    parsed = []
    for text, line in zip(values, lines):
        try:
            value = parse(text)
            if dtype is np.int64 and not 1 <= value <= MAX_TOKENS:
                raise KvbenchError(text)
        except (ValueError, TypeError, OverflowError):
            raise WorkloadError(f"{path}: line {line}, column {column}: {text!r} is not "
                                f"{looks_like}") from None
        parsed.append(value)
    return np.array(parsed, dtype=np.float64 if dtype is not np.int64 else np.int64)


def resolve_trace(trace: str | Path) -> Path:
    """The file of a trace: `trace` where that file exists, else the bundled trace of that name
    (`BUNDLED_TRACES`); neither is one error listing the bundled names."""
    path = Path(trace)
    if path.exists():
        return path
    if str(trace) in BUNDLED_TRACES:
        return BUNDLED_TRACES[str(trace)]
    raise WorkloadError(f"cannot read trace {trace}: no such file, nor a bundled trace's name "
                        f"({', '.join(BUNDLED_TRACES)})")


def spec_trace(trace: str, folder: Path) -> str:
    """A trace as a file (a sweep spec) names it, relative to `folder`: that path, unless no
    such file exists and `trace` is a bundled trace's name, which stays a name."""
    path = folder / trace
    return trace if trace in BUNDLED_TRACES and not path.exists() else str(path)


def _check_columns(path: Path, header: list[str], read: tuple[str, ...],
                   warn: Callable[[str], None]) -> None:
    """Name the columns of `header` that `read` does not hold: a near-miss of a column read
    but absent (`max_token` for `max_tokens`) is an error, any other one `warn` line."""
    missing = [c for c in read if c not in header]
    for column in header:
        if column in read:
            continue
        near = difflib.get_close_matches(column, missing, n=1, cutoff=0.8)
        if near:
            raise WorkloadError(f"{path}: column {column!r} is not one kvbench reads: did you "
                                f"mean {near[0]!r}? (columns read: {', '.join(read)})")
        warn(f"{path}: column {column!r} is ignored (columns read: {', '.join(read)})")


def read_trace(path: str | Path, rate_scale: float = 1.0, num_requests: int | None = None,
               max_tokens: int | None = None,
               warn: Callable[[str], None] = stderr_warning) -> Workload:
    """Read a trace CSV (Azure 2023 or plain schema, see the module docstring), a JSONL trace
    whose requests carry their prompts' content (Mooncake's, or token ids inline:
    `kvbench.sim.jsonl_traces`), or a bundled trace by name (`resolve_trace`).

    `max_tokens` sets every request's generation limit (never below its output); without it the
    plain schema's `max_tokens` column is used if present, else the trace's longest output.
    `warn` gets a line for each column that is ignored.
    """
    path = resolve_trace(path)
    if path.suffix == ".jsonl":
        from kvbench.sim.jsonl_traces import read_jsonl_trace

        return read_jsonl_trace(path, rate_scale, num_requests, max_tokens)
    check_rate_scale(rate_scale)
    check_max_tokens(max_tokens)
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            rows, lines = [], []
            for row in reader:
                rows.append(row)
                lines.append(reader.line_num)
    except OSError as exc:
        raise WorkloadError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise WorkloadError(f"{path}: not a CSV file ({exc})") from None
    if all(c in header for c in AZURE_COLUMNS):
        columns = AZURE_COLUMNS
        _check_columns(path, header, AZURE_COLUMNS, warn)
    elif all(c in header for c in PLAIN_COLUMNS):
        columns = PLAIN_COLUMNS
        _check_columns(path, header, PLAIN_COLUMNS + ("max_tokens",), warn)
    else:
        raise WorkloadError(f"{path}: header {', '.join(header) or '(empty)'} matches neither "
                            f"schema: expected {', '.join(AZURE_COLUMNS)} (Azure 2023) or "
                            f"{', '.join(PLAIN_COLUMNS)}[, max_tokens]")
    for row, line in zip(rows, lines):
        num_fields = sum(row[c] is not None for c in header) + len(row.get(None, []))
        if num_fields != len(header):
            raise WorkloadError(f"{path}: line {line}: expected {len(header)} fields "
                                f"({', '.join(header)}), got {num_fields}")
    if num_requests is not None:
        if num_requests < 1:
            raise WorkloadError(f"number of requests must be at least 1, got {num_requests}")
        rows, lines = rows[:num_requests], lines[:num_requests]
    if not rows:
        raise WorkloadError(f"{path}: no requests in the trace")
    time_col, prompt_col, output_col = columns
    arrival_s = _arrivals(path, rows, lines, time_col, rate_scale)
    prompt = _column(path, rows, lines, prompt_col)
    output = _column(path, rows, lines, output_col)
    limit = None
    if max_tokens is not None:
        limit = np.maximum(output, max_tokens)
    elif columns == PLAIN_COLUMNS and "max_tokens" in header:
        limit = _column(path, rows, lines, "max_tokens")
        bad = np.flatnonzero(limit < output)
        if bad.size:
            raise WorkloadError(f"{path}: line {lines[bad[0]]}, column max_tokens: "
                                f"{limit[bad[0]]} is below output_tokens ({output[bad[0]]})")
    scale = f", rate x{rate_scale:g}" if rate_scale != 1 else ""
    return _workload(f"{path.name}{scale}", arrival_s, prompt, output, limit)


def _arrivals(path: Path, rows: list[dict], lines: list[int], column: str,
              rate_scale: float) -> np.ndarray:
    """The arrival column in seconds from the first arrival, divided by `rate_scale`; a span
    over MAX_DURATION_S is refused naming its first and last rows."""
    arrival_s = _column(path, rows, lines, column)
    first, last = int(arrival_s.argmin()), int(arrival_s.argmax())
    if not (float(arrival_s[last]) - float(arrival_s[first])) / rate_scale <= MAX_DURATION_S:
        scaled = f" once divided by the rate scale {rate_scale:g}" if rate_scale != 1 else ""
        raise WorkloadError(f"{path}: column {column}: arrivals from "
                            f"{rows[first][column].strip()!r} (line {lines[first]}) to "
                            f"{rows[last][column].strip()!r} (line {lines[last]}) span more "
                            f"than {MAX_DURATION_S:g} s (about 32 years){scaled}")
    return (arrival_s - arrival_s[first]) / rate_scale


def check_rate_scale(rate_scale: float) -> None:
    check_finite("rate scale", rate_scale, positive=True, error=WorkloadError)


def check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS:
        raise WorkloadError(f"max tokens must be an integer from 1 to {MAX_TOKENS}, got "
                            f"{max_tokens}")


def load_workload(trace: str | Path | None = None, synthetic_spec: str | None = None,
                  rate_scale: float = 1.0, num_requests: int | None = None,
                  max_tokens: int | None = None, seed: int = 0,
                  warn: Callable[[str], None] = stderr_warning) -> Workload:
    """A trace (`read_trace`, which sends `warn` its warnings) or a synthetic mix
    (`parse_synthetic_spec`; `multi-turn:...` and `system-prompt:...` are mixes whose requests
    share prefixes, `kvbench.sim.shared_mixes`), exactly one."""
    if (trace is None) == (synthetic_spec is None):
        raise WorkloadError("give either a trace CSV or a synthetic spec (exactly one)")
    check_rate_scale(rate_scale)
    if trace is not None:
        return read_trace(trace, rate_scale, num_requests, max_tokens, warn)
    mix = synthetic_spec.partition(":")[0].strip()
    if ":" in synthetic_spec and mix in ("multi-turn", "system-prompt"):
        from kvbench.sim.shared_mixes import mix_workload

        return mix_workload(synthetic_spec, seed, rate_scale, num_requests, max_tokens)
    spec = parse_synthetic_spec(synthetic_spec)
    if rate_scale != 1.0:
        if not 0 < spec.rate_per_s * rate_scale < math.inf:
            raise WorkloadError(f"synthetic: rate {spec.rate_per_s:g}/s scaled by "
                                f"{rate_scale:g} leaves the float range")
        spec = dataclasses.replace(spec, rate_per_s=spec.rate_per_s * rate_scale)
    if num_requests is not None:
        spec = dataclasses.replace(spec, num_requests=num_requests)
    if max_tokens is not None:
        spec = dataclasses.replace(spec, max_tokens=max_tokens)
    return synthetic(spec, seed)
