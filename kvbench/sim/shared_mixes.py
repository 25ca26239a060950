"""Synthetic workloads whose requests share prefixes, from parameters.

* `multi-turn`: conversations. Sessions start as a Poisson process (`rate` sessions a second);
  each has `turns` turns, the next arriving an exponential think time (`think-s` on average)
  after the one before. A turn's prompt is the conversation so far: the shared system prompt
  (`system-prompt-tokens`, 0 for none), every earlier turn's input and output, then its new
  input. An earlier output enters the prompt as the tokens that turn generates in the simulator
  and the vLLM drive (its request's `output_token`, repeated), so a turn finds the previous
  turns' KV in the prefix cache, as a chat server would.
* `system-prompt`: independent requests (Poisson, `rate` a second) whose prompts start with one
  of `prompts` system prompts of `system-prompt-tokens` tokens, picked with Zipf weights
  1/rank^`skew` (0: uniformly), then a user input of their own.

Input and output lengths are drawn uniformly in [mean/2, 3·mean/2] (`input-tokens`,
`output-tokens`), as the synthetic mixes of `kvbench.sim.workloads` are. A spec is written
`multi-turn:sessions=200,turns=4,rate=1` or `system-prompt:requests=2000,prompts=8`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from kvbench.limits import MAX_TOKENS, check_finite
from kvbench.sim.tokens import VOCAB_SIZE
from kvbench.sim.workloads import MAX_SYNTHETIC_REQUESTS, TokenIds, Workload, WorkloadError

MAX_MIX_TOKENS = 500_000_000  # the prompts' token ids: 2 GB


@dataclass(frozen=True)
class MultiTurnSpec:
    sessions: int = 200
    turns: int = 4
    rate_per_s: float = 1.0
    think_s: float = 10.0
    system_prompt_tokens: int = 512
    input_tokens: int = 256
    output_tokens: int = 128
    max_tokens: int = 512


@dataclass(frozen=True)
class SystemPromptSpec:
    requests: int = 1000
    rate_per_s: float = 10.0
    prompts: int = 8
    skew: float = 1.0
    system_prompt_tokens: int = 1024
    input_tokens: int = 256
    output_tokens: int = 128
    max_tokens: int = 512


SPECS = {"multi-turn": MultiTurnSpec, "system-prompt": SystemPromptSpec}
KEYS = {"rate": "rate_per_s", "think-s": "think_s"}  # spec keys whose field is named otherwise
COUNTS = {"sessions": MAX_SYNTHETIC_REQUESTS, "turns": 10_000, "requests": MAX_SYNTHETIC_REQUESTS,
          "prompts": 1_000_000}


def _key(field: str) -> str:
    return next((k for k, f in KEYS.items() if f == field), field.replace("_", "-"))


def parse_mix(text: str) -> MultiTurnSpec | SystemPromptSpec:
    """'multi-turn:sessions=100,turns=6' -> MultiTurnSpec; every value checked, one error line."""
    mix, _, items = text.partition(":")
    kind = SPECS[mix.strip()]
    fields = {f.name: f.type for f in dataclasses.fields(kind)}
    names = ", ".join(_key(f) for f in fields)
    values = {}
    for item in filter(None, (part.strip() for part in items.split(","))):
        key, sep, value = item.partition("=")
        field = KEYS.get(key.strip(), key.strip().replace("-", "_"))
        if not sep or field not in fields:
            raise WorkloadError(f"{mix} spec: {item!r} is not KEY=VALUE with KEY one of {names}")
        number = float if fields[field] == "float" else int
        try:
            values[field] = number(value.strip())
        except ValueError:
            raise WorkloadError(f"{mix} spec: {key.strip()}={value.strip()!r} is not a valid "
                                f"{number.__name__}") from None
    spec = kind(**values)
    for field, kind_name in fields.items():
        value = getattr(spec, field)
        if kind_name == "float":
            low = 0.0 if field == "skew" else None
            check_finite(f"{mix} spec: {_key(field)}", value, positive=low is None, low=low,
                         high=100.0 if field == "skew" else None, error=WorkloadError)
        else:
            low = 0 if field == "system_prompt_tokens" else 1
            high = COUNTS.get(field, MAX_TOKENS * 2 // 3)
            if not low <= value <= high:
                raise WorkloadError(f"{mix} spec: {_key(field)} must be an integer from {low} "
                                    f"to {high}, got {value}")
    longest = (3 * spec.output_tokens + 1) // 2
    if spec.max_tokens < longest:
        raise WorkloadError(f"{mix} spec: max-tokens ({spec.max_tokens}) must be at least the "
                            f"longest possible output ({longest})")
    # Prompt tokens in all (at most): a turn's prompt holds every turn before it.
    longest_input = (3 * spec.input_tokens + 1) // 2
    if isinstance(spec, MultiTurnSpec):
        t = spec.turns
        total = spec.sessions * (t * spec.system_prompt_tokens
                                 + (longest_input + longest) * t * (t + 1) // 2)
    else:
        total = spec.requests * (spec.system_prompt_tokens + longest_input)
    if total > MAX_MIX_TOKENS:
        raise WorkloadError(f"{mix} spec: its prompts may hold {total} tokens in all, above "
                            f"{MAX_MIX_TOKENS:,}: fewer requests or turns, or shorter inputs")
    return spec


def _lengths(rng: np.random.Generator, n: int, mean: int) -> np.ndarray:
    return np.maximum(1, np.rint(mean * rng.uniform(0.5, 1.5, n))).astype(np.int64)


def _gather(stream: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """stream[starts[i]:starts[i] + lengths[i]] for every i, concatenated."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    within = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], lengths)
    return stream[np.repeat(starts, lengths) + within]


def _workload(name: str, arrival_s: np.ndarray, prompt: np.ndarray, output: np.ndarray,
              max_tokens: int, flat: np.ndarray, output_token: np.ndarray) -> Workload:
    """Requests sorted by arrival (stable), their prompts `flat` in the original order."""
    order = np.argsort(arrival_s, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(prompt)])
    flat = _gather(flat, offsets[:-1][order], prompt[order])
    tokens = TokenIds(np.concatenate([[0], np.cumsum(prompt[order])]), flat,
                      output_token[order])
    return Workload(name, arrival_s[order] - arrival_s[order][0], prompt[order], output[order],
                    np.maximum(output[order], max_tokens), tokens)


def multi_turn(spec: MultiTurnSpec, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    s, t = spec.sessions, spec.turns
    n = s * t  # request (session i, turn k) is i·t + k
    start = np.cumsum(rng.exponential(1.0 / spec.rate_per_s, s))
    think = rng.exponential(spec.think_s, (s, t))
    think[:, 0] = 0.0
    arrival_s = (start[:, None] + np.cumsum(think, axis=1)).ravel()
    inputs, output = _lengths(rng, n, spec.input_tokens), _lengths(rng, n, spec.output_tokens)
    output_token = rng.integers(1, VOCAB_SIZE, n, dtype=np.int32)
    system = rng.integers(1, VOCAB_SIZE, spec.system_prompt_tokens, dtype=np.int32)
    # Each session's conversation: system prompt, then input and output of every turn.
    segments = np.column_stack([inputs, output]).reshape(s, 2 * t)
    lengths = np.column_stack([np.full(s, system.size), segments]).ravel()
    seg_offsets = np.concatenate([[0], np.cumsum(lengths)])
    stream = rng.integers(1, VOCAB_SIZE, int(seg_offsets[-1]), dtype=np.int32)  # the inputs
    seg = np.repeat(np.arange(lengths.size), lengths)
    place = seg % (2 * t + 1)  # 0: system prompt, odd: an input, even: an output
    within = np.arange(stream.size) - seg_offsets[seg]
    stream[place == 0] = system[within[place == 0]]
    is_output = (place > 0) & (place % 2 == 0)
    request_of_seg = (seg // (2 * t + 1)) * t + (place - 2) // 2
    stream[is_output] = output_token[request_of_seg[is_output]]
    # Turn k's prompt: its session's conversation up to the end of its own input.
    session_start = seg_offsets[::2 * t + 1][:s]
    input_end = seg_offsets[1:].reshape(s, 2 * t + 1)[:, 1::2].ravel()
    prompt = input_end - np.repeat(session_start, t)
    flat = _gather(stream, np.repeat(session_start, t), prompt)
    name = (f"multi-turn({s} sessions x {t} turns at {spec.rate_per_s:g}/s, seed {seed})")
    return _workload(name, arrival_s, prompt, output, spec.max_tokens, flat, output_token)


def system_prompt(spec: SystemPromptSpec, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    n, size = spec.requests, spec.system_prompt_tokens
    arrival_s = np.cumsum(rng.exponential(1.0 / spec.rate_per_s, n))
    weights = 1.0 / np.arange(1, spec.prompts + 1) ** spec.skew
    which = rng.choice(spec.prompts, n, p=weights / weights.sum())
    systems = rng.integers(1, VOCAB_SIZE, (spec.prompts, size), dtype=np.int32)
    inputs, output = _lengths(rng, n, spec.input_tokens), _lengths(rng, n, spec.output_tokens)
    prompt = inputs + size
    offsets = np.concatenate([[0], np.cumsum(prompt)])
    flat = rng.integers(1, VOCAB_SIZE, int(offsets[-1]), dtype=np.int32)
    within = np.arange(flat.size) - np.repeat(offsets[:-1], prompt)
    owner = np.repeat(np.arange(n), prompt)
    head = within < size
    flat[head] = systems[which[owner[head]], within[head]]
    output_token = rng.integers(1, VOCAB_SIZE, n, dtype=np.int32)
    name = (f"system-prompt({n} requests at {spec.rate_per_s:g}/s, {spec.prompts} prompts of "
            f"{size} tokens, seed {seed})")
    return _workload(name, arrival_s, prompt, output, spec.max_tokens, flat, output_token)


def mix_workload(text: str, seed: int = 0, rate_scale: float = 1.0,
                 num_requests: int | None = None, max_tokens: int | None = None) -> Workload:
    """The mix a spec names (`parse_mix`), its rate scaled, cut to its first `num_requests`
    arrivals, every generation limit `max_tokens` (never below the output) when given."""
    spec = parse_mix(text)
    if rate_scale != 1.0:
        spec = dataclasses.replace(spec, rate_per_s=spec.rate_per_s * rate_scale)
    workload = (multi_turn if isinstance(spec, MultiTurnSpec) else system_prompt)(spec, seed)
    if num_requests is not None:
        if num_requests < 1:
            raise WorkloadError(f"number of requests must be at least 1, got {num_requests}")
        workload = workload.subset(np.arange(workload.num_requests) < num_requests)
    if max_tokens is not None:
        workload = dataclasses.replace(workload, max_tokens=np.maximum(workload.output_tokens,
                                                                       max_tokens))
    return workload
