"""Traces whose requests share prefixes, as JSONL (one JSON object a line).

Two formats, told apart by the first line's fields:

* **Mooncake** (the FAST'25 release's `traces/`): `timestamp` (milliseconds from the trace's
  start), `input_length`, `output_length`, `hash_ids` (one id per 512-token block of the
  prompt, the last block possibly partial; equal ids mean equal content). The prompt's token
  ids are generated from the hash ids: token j of a block with id h is a hash of (h, j)
  (`hashed_tokens`), so requests whose leading ids agree share those tokens exactly, whatever
  the KV cache's block size; the last block is cut to `input_length`.
* **Token ids inline**: `arrival_s`, `prompt_token_ids` (a list of integers in [0, 2**31)),
  `output_tokens`, optionally `max_tokens`.

A line that is not a JSON object, lacks a field, has one the format does not know, has a value of
the wrong type or range, a hash id list whose length is not ceil(input_length / 512), or a time
before the line above's is one error naming the file, the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from itertools import chain
from pathlib import Path

import numpy as np

from kvbench.limits import MAX_TOKENS
from kvbench.sim.tokens import hashed_tokens
from kvbench.sim.workloads import (
    MAX_DURATION_S,
    TokenIds,
    Workload,
    WorkloadError,
    check_max_tokens,
    check_rate_scale,
)

MOONCAKE_BLOCK_TOKENS = 512  # the tokens one Mooncake hash id stands for
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")
TOKEN_FIELDS = ("arrival_s", "prompt_token_ids", "output_tokens")
TOKEN_OPTIONAL = ("max_tokens",)
MAX_TOKEN_ID = 2**31 - 1
CHUNK_TOKENS = 1 << 22  # prompts are generated this many tokens at a time (memory)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Lines:
    """The JSON objects of a JSONL file, with their line numbers; errors name both."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = []
        self.lines: list[int] = []
        try:
            with path.open() as file:
                for number, text in enumerate(file, start=1):
                    if not text.strip():
                        continue
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as exc:
                        raise self.error(number, f"not JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise self.error(number, "not a JSON object")
                    self.rows.append(row)
                    self.lines.append(number)
        except OSError as exc:
            raise WorkloadError(f"cannot read trace {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise WorkloadError(f"{path}: not a text file ({exc.reason})") from None
        if not self.rows:
            raise WorkloadError(f"{path}: no requests in the trace")

    def error(self, line: int, message: str) -> WorkloadError:
        return WorkloadError(f"{self.path}: line {line}: {message}")

    def check_fields(self, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
        known = required + optional
        for row, line in zip(self.rows, self.lines):
            missing = [f for f in required if f not in row]
            if missing:
                raise self.error(line, f"no field {missing[0]!r} (fields: {', '.join(known)})")
            unknown = [f for f in row if f not in known]
            if unknown:
                raise self.error(line, f"unknown field {unknown[0]!r} (fields: "
                                       f"{', '.join(known)})")

    def column(self, field: str, ok: Callable[[object], bool], looks_like: str) -> list:
        values = [row[field] for row in self.rows]
        for value, line in zip(values, self.lines):
            if not ok(value):
                raise self.error(line, f"{field} is {value!r}, not {looks_like}")
        return values

    def times(self, field: str, unit_s: float) -> np.ndarray:
        """A time column in seconds from the first line: finite, not negative, not before the
        line above's, spanning at most MAX_DURATION_S."""
        values = self.column(field, lambda v: _is_number(v) and 0 <= v < float("inf"),
                             "a finite number, at least 0")
        seconds = np.array(values, dtype=np.float64) * unit_s
        back = np.flatnonzero(np.diff(seconds) < 0)
        if back.size:
            i = int(back[0]) + 1
            raise self.error(self.lines[i], f"{field} {values[i]!r} is before the line above's "
                                            f"({values[i - 1]!r}): requests must be in order")
        if seconds[-1] - seconds[0] > MAX_DURATION_S:
            raise self.error(self.lines[-1], f"{field}: the trace spans more than "
                                             f"{MAX_DURATION_S:g} s (about 32 years)")
        return seconds - seconds[0]

    def lengths(self, field: str) -> np.ndarray:
        return np.array(self.column(field, lambda v: _is_int(v) and 1 <= v <= MAX_TOKENS,
                                    f"an integer from 1 to {MAX_TOKENS}"), dtype=np.int64)


def _mooncake(rows: _Lines) -> tuple[np.ndarray, np.ndarray, np.ndarray, None, TokenIds]:
    rows.check_fields(MOONCAKE_FIELDS)
    arrival_s = rows.times("timestamp", 1e-3)
    prompt, output = rows.lengths("input_length"), rows.lengths("output_length")
    hash_ids = rows.column("hash_ids", lambda v: isinstance(v, list) and all(
        _is_int(h) and 0 <= h < 2**53 for h in v), "a list of integers from 0 to 2**53")
    counts = np.fromiter(map(len, hash_ids), np.int64, len(hash_ids))
    wrong = np.flatnonzero(counts != -(-prompt // MOONCAKE_BLOCK_TOKENS))
    if wrong.size:
        i = int(wrong[0])
        raise rows.error(rows.lines[i], f"hash_ids has {counts[i]} ids, but input_length "
                                        f"{prompt[i]} is {-(-prompt[i] // 512)} blocks of "
                                        f"{MOONCAKE_BLOCK_TOKENS} tokens")
    ids = np.fromiter(chain.from_iterable(hash_ids), np.uint64, int(counts.sum()))
    return arrival_s, prompt, output, None, mooncake_tokens(prompt, ids, counts)


def mooncake_tokens(prompt: np.ndarray, hash_ids: np.ndarray, counts: np.ndarray) -> TokenIds:
    """Prompts of `prompt` tokens from their hash ids (`counts` ids per request, flat in
    `hash_ids`): token j of a block with id h is `hashed_tokens(h·512 + j)`. Each request
    generates one token of its own, a hash of its index."""
    offsets = np.concatenate([[0], np.cumsum(prompt)])
    first_id = np.concatenate([[0], np.cumsum(counts)])[:-1]
    flat = np.empty(int(offsets[-1]), dtype=np.int32)
    start = 0
    while start < prompt.size:  # a few million tokens at a time
        stop = int(np.searchsorted(offsets, offsets[start] + CHUNK_TOKENS, side="right"))
        stop = max(stop - 1, start + 1)
        lengths = prompt[start:stop]
        position = np.arange(int(lengths.sum())) - np.repeat(offsets[start:stop] -
                                                              offsets[start], lengths)
        block = np.repeat(first_id[start:stop], lengths) + position // MOONCAKE_BLOCK_TOKENS
        keys = (hash_ids[block] * np.uint64(MOONCAKE_BLOCK_TOKENS)
                + (position % MOONCAKE_BLOCK_TOKENS).astype(np.uint64))
        flat[offsets[start]:offsets[stop]] = hashed_tokens(keys)
        start = stop
    output_token = hashed_tokens(np.arange(prompt.size, dtype=np.uint64) + np.uint64(2**63))
    return TokenIds(offsets, flat, output_token)


def _inline(rows: _Lines) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None,
                                   TokenIds]:
    rows.check_fields(TOKEN_FIELDS, TOKEN_OPTIONAL)
    arrival_s = rows.times("arrival_s", 1.0)
    prompts = rows.column("prompt_token_ids", lambda v: isinstance(v, list)
                          and 1 <= len(v) <= MAX_TOKENS
                          and all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in v),
                          f"a list of 1 to {MAX_TOKENS} integers from 0 to {MAX_TOKEN_ID}")
    output = rows.lengths("output_tokens")
    limit = None
    if any("max_tokens" in row for row in rows.rows):
        rows.check_fields(TOKEN_FIELDS + TOKEN_OPTIONAL)
        limit = rows.lengths("max_tokens")
        below = np.flatnonzero(limit < output)
        if below.size:
            i = int(below[0])
            raise rows.error(rows.lines[i], f"max_tokens {limit[i]} is below output_tokens "
                                            f"{output[i]}")
    prompt = np.fromiter(map(len, prompts), np.int64, len(prompts))
    offsets = np.concatenate([[0], np.cumsum(prompt)])
    flat = np.fromiter(chain.from_iterable(prompts), np.int32, int(offsets[-1]))
    output_token = hashed_tokens(np.arange(prompt.size, dtype=np.uint64) + np.uint64(2**63))
    return arrival_s, prompt, output, limit, TokenIds(offsets, flat, output_token)


def read_jsonl_trace(path: Path, rate_scale: float = 1.0, num_requests: int | None = None,
                     max_tokens: int | None = None) -> Workload:
    """A Mooncake or token-id JSONL trace (see the module docstring) as a `Workload` that
    carries its prompts' token ids."""
    check_rate_scale(rate_scale)
    check_max_tokens(max_tokens)
    rows = _Lines(path)
    if num_requests is not None:
        if num_requests < 1:
            raise WorkloadError(f"number of requests must be at least 1, got {num_requests}")
        rows.rows, rows.lines = rows.rows[:num_requests], rows.lines[:num_requests]
    first = rows.rows[0]
    if "hash_ids" in first:
        arrival_s, prompt, output, limit, tokens = _mooncake(rows)
    elif "prompt_token_ids" in first:
        arrival_s, prompt, output, limit, tokens = _inline(rows)
    else:
        raise rows.error(rows.lines[0], f"fields {', '.join(first) or '(none)'} are neither "
                                        f"Mooncake's ({', '.join(MOONCAKE_FIELDS)}) nor token "
                                        f"ids' ({', '.join(TOKEN_FIELDS)}[, max_tokens])")
    if max_tokens is not None:
        limit = np.maximum(output, max_tokens)
    elif limit is None:
        limit = np.full(output.size, output.max())
    scale = f", rate x{rate_scale:g}" if rate_scale != 1 else ""
    return Workload(f"{path.name}{scale}", arrival_s / rate_scale, prompt, output, limit,
                    tokens)
