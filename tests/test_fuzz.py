"""Issue 13: a hypothesis fuzz of the command line and the library entry points.

For every generated command line, through the console entry point (`run_cli`, in process):
no traceback, no RuntimeWarning (made an error here: pytest would capture what a user sees
above the output); each call ends within `CALL_LIMIT_S` (an alarm interrupts a hang); exit 0
with output (strict JSON for --json: no NaN or Infinity) or exit 2 with exactly one `error:`
line and nothing on stdout. The library entry points return or raise ValueError/TypeError with a
one-line message, nothing else. Inputs mix good values with the hostile ones that broke these
promises before (inf, nan, 1e-320, 2**63, empty names, nested or binary files) and stay small
enough that a valid run takes well under a second: the fuzz is about inputs, not scale.

Examples are derandomized (the same on every CI run). To explore: FUZZ_EXAMPLES=500
FUZZ_RANDOM=1 pytest tests/test_fuzz.py (random examples, more of them).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbench.calibration import pipeline
from kvbench.calibration import validate as validate_module
from kvbench.hardware import HARDWARE, get_hardware
from kvbench.limits import MAX_TOKENS
from kvbench.models import MODELS, get_model
from kvbench.profile import ProfileError, analytic_profile, parse, save
from kvbench.selector import select_preemption_strategy
from kvbench.sim.config import SimConfig
from kvbench.sim.engine import simulate
from kvbench.sim.workloads import WorkloadError, load_workload

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
CALL_LIMIT_S = 20
NOT_A_NUMBER = re.compile(r"\b(inf|infinity|nan)\b", re.IGNORECASE)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="FUZZ_RANDOM" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

HOSTILE_NUMBERS = ["0", "-1", "inf", "-inf", "nan", "1e308", "1e-320", "-0", str(2**63),
                   str(2**63 - 1), str(MAX_TOKENS), str(MAX_TOKENS + 1), str(2**70), "", " ",
                   "abc", "1.5", "0x10", "1_000", "1e3", "--", "9" * 30, "9" * 400]


def numbers(low: float, high: float, real: bool = False) -> st.SearchStrategy[str]:
    """A number as typed on a command line: in [low, high] (an integer unless `real`) five
    times in six, else hostile."""
    valid = (st.floats(min_value=low, max_value=high).map(repr) if real
             else st.integers(low, high).map(str))
    return st.one_of(*[valid] * 5, st.sampled_from(HOSTILE_NUMBERS))


def names(good) -> st.SearchStrategy[str]:
    """A name: one of `good` three times in four, else a near miss."""
    valid = st.sampled_from(sorted(good))
    return st.one_of(valid, valid, valid,
                     st.sampled_from(["", "x", "LLAMA-3-8B", "tiny ", "h100", "../etc"]))


class Hang(Exception):
    """A call ran past its limit (not an OSError, which the CLI would print as a user error)."""


@contextmanager
def time_limit(seconds: int):
    """Interrupt a call that runs longer than `seconds`: a hang fails the test, it does not
    stall it."""
    def expired(signum, frame):
        raise Hang(f"call ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def reject_constant(name: str):
    raise ValueError(f"{name} in JSON output")


def check_outcome(args: list[str], code, out: str, err: str) -> None:
    where = f"kvbench {' '.join(map(repr, args))}"
    assert "Traceback" not in err and "Traceback" not in out, f"{where}\n{err}"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if code == 2:
        assert out == "", f"{where}: output beside an error\n{out}"
        assert err.strip().count("\n") == 0 and len(errors) == 1, f"{where}\n{err}"
        return
    assert code == 0, f"{where}: exit {code}\n{err}"
    assert not errors and out, f"{where}\n{err}"
    assert not NOT_A_NUMBER.search(out), f"{where}: a non-finite number in\n{out}"
    if "--json" in args:
        json.loads(out, parse_constant=reject_constant)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad inputs on disk: profiles, traces, model configs, output places."""
    root = tmp_path_factory.mktemp("fuzz")
    good = analytic_profile(get_model("tiny"), get_hardware(), block_size=16)
    data = json.loads(good.to_json())
    huge = json.loads(good.to_json())
    huge["recompute"]["ms_per_token_sq"] = 1e305  # finite; n² of 40 tokens overflows
    measured = {**data, "source": "measured",
                "environment": {"device": "cuda", "device_name": "NVIDIA H100"}}
    paths = {
        "profile": save(good, root / "tiny.json"),
        "huge_profile": save(parse(huge), root / "huge.json"),
        "cuda_profile": save(parse(measured), root / "cuda.json"),
        "missing": root / "missing.json",
        "folder": root,
    }
    for name, content in {"nested.json": "[" * 50_000 + "]" * 50_000,
                          "garbage.json": "{not json", "list.json": "[1, 2]",
                          "empty.json": ""}.items():
        (root / name).write_text(content)
        paths[name] = root / name
    (root / "binary.json").write_bytes(b"\xff\xfe\x00{")
    paths["binary.json"] = root / "binary.json"
    traces = {"trace.csv": "arrival_s,prompt_tokens,output_tokens\n0,40,5\n0.5,300,20\n1,17,3\n",
              "infinite-arrival.csv": "arrival_s,prompt_tokens,output_tokens\n0,40,5\ninf,3,3\n",
              "big.csv": f"arrival_s,prompt_tokens,output_tokens\n0,{2**63 - 1},5\n",
              "far.csv": "arrival_s,prompt_tokens,output_tokens\n0,40,5\n1e308,10,5\n",
              "span.csv": "arrival_s,prompt_tokens,output_tokens\n-1e308,40,5\n1e308,10,5\n",
              "header.csv": "a,b,c\n1,2,3\n"}
    for name, content in traces.items():
        (root / name).write_text(content)
        paths[name] = root / name
    hf = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
          "intermediate_size": 128, "vocab_size": 256}
    for name, changes in {"config.json": {}, "zero-heads.json": {"num_attention_heads": 0},
                          "floored.json": {"num_attention_heads": 5},
                          "float-layers.json": {"num_hidden_layers": 2.5},
                          "huge-model.json": {"hidden_size": 65536, "num_attention_heads": 64,
                                              "num_hidden_layers": 200,
                                              "intermediate_size": 262144},
                          "list-name.json": {"_name_or_path": [1]}}.items():
        (root / name).write_text(json.dumps({**hf, **changes}))
        paths[name] = root / name
    return paths


def paths_from(files, *keys) -> st.SearchStrategy[str]:
    return st.sampled_from(keys).map(lambda key: str(files[key]))


def options(pairs: dict) -> st.SearchStrategy[list[str]]:
    """Some of these flags, each with a value from its strategy (None: a bare flag)."""
    flags = sorted(pairs)
    return st.lists(st.sampled_from(flags), unique=True, max_size=4).flatmap(
        lambda chosen: st.tuples(*[st.just([f]) if pairs[f] is None else
                                   pairs[f].map(lambda v, f=f: [f, v]) for f in chosen])
    ).map(lambda groups: [x for group in groups for x in group])


def run_checked(run_cli, args: list[str]) -> tuple[int, str, str]:
    with time_limit(CALL_LIMIT_S):
        code, out, err = run_cli(*args)
    check_outcome(args, code, out, err)
    return code, out, err


# --- the command line ------------------------------------------------------------------------

PROFILE_FILES = ("profile", "huge_profile", "cuda_profile", "missing", "folder", "nested.json",
                 "garbage.json", "list.json", "binary.json", "empty.json")


def select_args(files, source: str):
    """`source`: analytic costs (--model and hardware figures), or that profile file."""
    analytic = {"--hardware": names(HARDWARE), "--block-size": numbers(1, 64),
                "--tp": numbers(1, 8), "--dtype": names(["bf16", "float16", "fp8", "float32"]),
                "--h2d-gbps": numbers(1, 100, real=True), "--d2h-gbps": numbers(1, 100, real=True),
                "--transfer-latency-ms": numbers(0, 1, real=True),
                "--peak-tflops": numbers(1, 1000, real=True),
                "--achieved-fraction": numbers(0, 1, real=True), "--json": None}
    with_profile = {"--model": names(MODELS), "--force": None, "--json": None,
                    "--tp": numbers(1, 8)}
    flags = (st.tuples(names(MODELS).map(lambda m: ["--model", m]), options(analytic))
             if source == "analytic" else
             st.tuples(st.just(["--profile", str(files[source])]), options(with_profile)))
    tokens = st.one_of(st.lists(st.integers(0, 5000).map(str), min_size=1, max_size=4),
                       st.lists(numbers(0, 5000), min_size=1, max_size=4))
    return st.tuples(tokens, flags).map(lambda t: ["select", *t[0], *t[1][0], *t[1][1]])


SPEC_VALUES = {"requests": numbers(1, 40), "rate": numbers(0, 50, real=True),
               "arrivals": st.sampled_from(["poisson", "gamma", "uniform", ""]),
               "cv": numbers(0, 5, real=True), "long-prompt": numbers(0, 1, real=True),
               "long-output": numbers(0, 1, real=True),
               "short-prompt-tokens": numbers(1, 300), "long-prompt-tokens": numbers(1, 2000),
               "short-output-tokens": numbers(1, 50), "long-output-tokens": numbers(1, 200),
               "max-tokens": numbers(1500, 4000), "speed": numbers(0, 3, real=True)}
SYNTHETIC = st.dictionaries(st.sampled_from(sorted(SPEC_VALUES)), st.just(None),
                            max_size=3).flatmap(
    lambda keys: st.tuples(*[SPEC_VALUES[k].map(lambda v, k=k: f"{k}={v}") for k in keys])
).map(lambda items: ",".join(("requests=20",) + items))


TRACE_FILES = ("trace.csv", "infinite-arrival.csv", "big.csv", "far.csv", "span.csv", "header.csv",
               "missing", "binary.json")


def sim_args(files, command: str, out_dir, source: str | None = None,
             ) -> st.SearchStrategy[list[str]]:
    """simulate or compare-policies: a workload (`source`: "synthetic", a trace file, "none",
    or None for any of them) and some of the options. compare-policies without a workload
    replays 20 requests of the shipped trace."""
    flags = {"--profile": paths_from(files, "profile", "huge_profile", "missing", "nested.json"),
             "--model": names(MODELS), "--hardware": names(HARDWARE),
             "--rate-scale": numbers(0, 10, real=True), "--num-requests": numbers(1, 40),
             "--max-tokens": numbers(1, 500), "--num-gpu-blocks": numbers(1, 5000),
             "--gpu-memory-gib": numbers(1, 160, real=True),
             "--swap-space": numbers(0, 16, real=True), "--seed": numbers(0, 100),
             "--json": None}
    if command == "compare-policies":
        # its fixed `--num-requests 20` stands: a drawn one would replay the whole shipped trace
        # under every study policy, minutes of honest work (simulate draws it)
        del flags["--num-requests"]
        flags["--policies"] = st.lists(
            st.tuples(names(["fcfs", "reserve-max", "future-kv"]), names(["lifo", "cost-aware"]),
                      names(["recompute", "swap", "selector"]), names(["oracle", "max"])
                      ).map("/".join), min_size=0, max_size=2).map(",".join)
    else:
        flags.update({"--admission": names(["fcfs", "reserve-max", "future-kv"]),
                      "--victim": names(["lifo", "lcf", "cost-aware"]),
                      "--preemption": names(["recompute", "swap", "selector"]),
                      "--predictor": names(["oracle", "noisy", "history", "max"]),
                      "--headroom-fraction": numbers(0, 1, real=True),
                      "--max-long-requests": numbers(0, 5),
                      "--noise-sigma": numbers(0, 2, real=True),
                      "--history-quantile": numbers(0, 1, real=True)})
    workloads = {"synthetic": SYNTHETIC.map(lambda spec: ["--synthetic", spec]),
                 "none": st.just([]),
                 **{name: st.just(["--trace", str(files[name])]) for name in TRACE_FILES}}
    workload = st.one_of(*workloads.values()) if source is None else workloads[source]
    out = ["--out", str(out_dir)] if command == "compare-policies" else []
    fixed = ["--num-requests", "20"] if command == "compare-policies" else []
    return st.tuples(workload, options(flags)).map(
        lambda t: [command, *fixed, *t[0], *t[1], *out])


@pytest.mark.parametrize("source", ["analytic", *PROFILE_FILES])
@settings(FUZZ, max_examples=max(EXAMPLES // 3, 5))
@given(data=st.data())
def test_select_command_lines(files, run_cli, source, data):
    run_checked(run_cli, data.draw(select_args(files, source)))


@pytest.mark.parametrize("source", ["synthetic", *TRACE_FILES, "none"])
@settings(FUZZ, max_examples=max(EXAMPLES // 3, 5))
@given(data=st.data())
def test_simulate_command_lines(files, run_cli, source, data):
    run_checked(run_cli, data.draw(sim_args(files, "simulate", None, source)))


@FUZZ
@given(data=st.data())
def test_compare_policies_command_lines(files, run_cli, tmp_path_factory, data):
    run_checked(run_cli, data.draw(sim_args(files, "compare-policies",
                                            tmp_path_factory.getbasetemp() / "compare")))


@FUZZ
@given(data=st.data())
def test_other_command_lines(files, run_cli, data):
    """profile show, models, machine, --version, unknown commands and options."""
    run_checked(run_cli, data.draw(st.one_of(
        paths_from(files, "profile", "huge_profile", "missing", "folder", "nested.json",
                   "binary.json", "list.json").map(lambda p: ["profile", "show", p]),
        st.sampled_from([["models"], ["machine", "--slug"], ["--version"], ["frobnicate"],
                         ["select"], ["simulate", "--bogus"], ["profile", "show"]]))))


def test_calibrate_and_validate_check_before_measuring(files, run_cli, tmp_path_factory):
    """calibrate and validate with their measuring replaced: every input is checked first
    (model, config.json, output place, memory plan) and ends cleanly."""
    out = tmp_path_factory.mktemp("calibrate")

    class Measuring(Exception):
        pass

    def measuring(*args, **kwargs):
        raise Measuring

    calibrate_flags = {
        "--device": names(["cpu", "auto", "cuda"]), "--model": names(MODELS),
        "--config-json": paths_from(files, "config.json", "zero-heads.json", "floored.json",
                                    "float-layers.json", "huge-model.json", "list-name.json",
                                    "nested.json", "binary.json", "missing"),
        "--block-size": numbers(1, 64), "--dtype": names(["bf16", "float32", "fp8"]),
        "--quick": None, "--force": None,
        "--out": st.sampled_from([str(out / "p.json"), str(out), "/proc/kvbench/p.json",
                                  str(files["profile"]) + "/p.json"])}
    validate_flags = {"--profile": paths_from(files, "profile", "cuda_profile", "missing",
                                              "nested.json"),
                      "--device": names(["cpu", "cuda", "auto"]), "--count": numbers(2, 8),
                      "--force": None, "--json": None}
    commands = st.one_of(options(calibrate_flags).map(lambda a: ["calibrate", *a]),
                         options(validate_flags).map(lambda a: ["validate", *a]))

    @FUZZ
    @given(commands)
    def check(args):
        with mock.patch.object(pipeline, "calibrate", measuring), \
                mock.patch.object(validate_module, "validate", measuring):
            try:
                run_checked(run_cli, args)
            except Measuring:
                pass  # every check passed: measuring would start here

    check()


# --- the library -----------------------------------------------------------------------------

HOSTILE_VALUES = st.one_of(
    st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.none(), st.text(max_size=5), st.lists(st.integers(0, 5), max_size=2),
    st.sampled_from([np.int64(5), np.float32(2.5), np.uint64(2**64 - 1), np.nan]))


def one_line_error(call):
    """`call()` returns, or raises ValueError/TypeError with a one-line message."""
    with time_limit(CALL_LIMIT_S):
        try:
            return call()
        except (ValueError, TypeError) as exc:
            assert "\n" not in str(exc), f"{type(exc).__name__}: {exc}"
            return None


@FUZZ
@given(token_counts=st.one_of(st.lists(HOSTILE_VALUES, max_size=5),
                              st.lists(st.integers(0, MAX_TOKENS), max_size=5), HOSTILE_VALUES),
       config=st.one_of(
           st.fixed_dictionaries({key: st.one_of(st.floats(0, 1e308), HOSTILE_VALUES)
                                  for key in ("swap_fixed_ms", "swap_ms_per_token",
                                              "recompute_fixed_ms", "recompute_ms_per_token",
                                              "recompute_ms_per_token_sq")}),
           st.dictionaries(st.sampled_from(["swap_fixed_ms", "swap_ms_per_token",
                                            "recompute_fixed_ms", "recompute_ms_per_token",
                                            "recompute_ms_per_token_sq", "block_size",
                                            "swap_ms_per_block", "swap_out_fixed_ms",
                                            "swap_in_ms_per_token", "model", "hardware", "tp",
                                            "peak_tflops", "achieved_fraction", "dtype"]),
                           HOSTILE_VALUES, max_size=8),
           st.fixed_dictionaries({"model": names(MODELS)}, optional={
               "achieved_fraction": HOSTILE_VALUES, "tp": HOSTILE_VALUES,
               "hardware": HOSTILE_VALUES, "block_size": HOSTILE_VALUES})))
def test_selector_returns_finite_costs_or_one_line_errors(token_counts, config):
    result = one_line_error(lambda: select_preemption_strategy(token_counts, config))
    if result is not None:
        costs = result["swap_costs_ms"] + result["recompute_costs_ms"] + [result["total_cost_ms"]]
        assert all(math.isfinite(c) for c in costs)


@FUZZ
@given(field_values=st.dictionaries(
    st.sampled_from(["num_gpu_blocks", "swap_space", "num_cpu_blocks", "gpu_memory_gib",
                     "noise_sigma", "headroom_fraction", "history_quantile", "block_size",
                     "max_num_batched_tokens", "max_num_seqs", "livelock_steps", "step_time",
                     "protect_steps", "max_long_requests", "admission"]),
    HOSTILE_VALUES, max_size=4),
    spec=st.sampled_from(["requests=5", "requests=5,arrivals=gamma,cv=4",
                          "requests=8,long-prompt=1,long-prompt-tokens=900"]))
def test_simulator_runs_or_refuses_in_one_line(field_values, spec):
    """SimConfig refuses bad fields in one line; a config it accepts simulates to the end."""
    workload = load_workload(synthetic_spec=spec)
    config = one_line_error(lambda: SimConfig.build(**{"num_gpu_blocks": 300, **field_values}))
    if config is not None:
        result = one_line_error(lambda: simulate(workload, config))
        if result is not None:
            assert math.isfinite(result.end_s)


HOSTILE_SPEC = st.tuples(
    st.sampled_from(["poisson", "gamma"]),
    st.dictionaries(st.sampled_from(sorted(set(SPEC_VALUES) - {"arrivals"})),
                    st.sampled_from(HOSTILE_NUMBERS), min_size=1, max_size=2),
).map(lambda t: ",".join([f"requests=5,arrivals={t[0]}",
                          *(f"{k}={v}" for k, v in t[1].items())]))


@FUZZ
@given(spec=st.one_of(SYNTHETIC, HOSTILE_SPEC),
       rate_scale=st.one_of(st.just(1.0), st.floats(allow_nan=True, allow_infinity=True),
                            st.integers(-3, 10)))
def test_workloads_are_finite_or_refused(spec, rate_scale):
    try:
        with time_limit(CALL_LIMIT_S):
            work = load_workload(synthetic_spec=spec, rate_scale=rate_scale)
    except WorkloadError as exc:
        assert "\n" not in str(exc)
        return
    assert np.isfinite(work.arrival_s).all() and work.prompt_tokens.max() <= MAX_TOKENS


@FUZZ
@given(path=st.lists(st.sampled_from(["swap", "recompute", "model", "fit", "fixed_ms",
                                      "num_heads", "min_tokens", "block_size", "extra",
                                      "schema_version", "dtype"]), min_size=1, max_size=3),
       value=HOSTILE_VALUES)
def test_profile_parse_accepts_or_names_the_problem(path, value):
    """A valid profile with one field replaced: parsed, or ProfileError on one line."""
    data = json.loads(analytic_profile(get_model("tiny"), get_hardware()).to_json())
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
    node[path[-1]] = value
    try:
        parse(data)
    except ProfileError as exc:
        assert "\n" not in str(exc)
