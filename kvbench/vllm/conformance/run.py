"""Run vLLM's unit tests per variant and judge the outcomes (see the package docstring)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

from kvbench.io import write_atomic
from kvbench.vllm.conformance import source

# vLLM's scheduler, async-scheduler and KV connector unit tests, and its priority-policy ones.
TESTS = ("tests/v1/core/test_scheduler.py", "tests/v1/core/test_async_scheduler.py",
         "tests/v1/core/test_priority_preemption_bug.py",
         "tests/v1/core/test_priority_scheduler_random.py", "tests/v1/kv_connector/unit")
# Mooncake's connector tests fail without its transfer engine on plain vLLM too, and one of
# them crashes pytest's own failure report (INTERNALERROR), ending the run.
IGNORED = ("*mooncake_connector*",)
# The variants: None is plain vLLM; a dict is kvbench's options (KVBENCH_* variables).
VARIANTS: dict[str, dict | None] = {
    "vllm": None,
    "kvbench": {},
    "lcf": {"victim": "lcf"},
    "cost-aware": {"victim": "cost-aware"},
    "future-kv": {"admission": "future-kv"},
    "reserve-max": {"admission": "reserve-max"},
}
DIFFERENCES = Path(__file__).resolve().parent / "differences.toml"


@dataclass(frozen=True)
class Outcome:
    outcome: str  # passed, failed, skipped, error
    exception: str | None
    problems: tuple[str, ...] = ()
    raised_in: str | None = None  # the file that raised the exception


@dataclass(frozen=True)
class Difference:
    """A listed policy difference: why the policy fails the test, what it raises and where (a
    test's assertion in the test's file, unless the test's fakes, scripted for vLLM's schedule,
    make vLLM's own code raise under the policy's: then both are named)."""

    reason: str
    raises: str = "AssertionError"
    raised_in: str = "tests/"


def run_variant(name: str, root: Path, logs: Path, python: str = sys.executable
                ) -> dict[str, Outcome]:
    """One pytest run of the tests under variant `name`; each test's outcome."""
    options = VARIANTS[name]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBENCH_")}
    redirect = source.model_redirect().resolve()
    env |= {"HF_HUB_OFFLINE": "1", "VLLM_MODEL_REDIRECT_PATH": str(redirect),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()),
                                                        env.get("PYTHONPATH")]))}
    env |= {f"KVBENCH_{k.upper()}": str(v) for k, v in (options or {}).items()}
    outcomes = logs / f"{name}.jsonl"
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--confcutdir=tests/v1",
               "--continue-on-collection-errors", "-p", "kvbench.vllm.conformance.plugin",
               f"--kvbench-outcomes={outcomes.resolve()}",
               *(["--kvbench"] if options is not None else []),
               *(f"--ignore-glob={g}" for g in IGNORED), *TESTS]
    with (logs / f"{name}.log").open("w") as log:
        subprocess.run(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=False)
    lines = [json.loads(line) for line in outcomes.read_text().splitlines()]
    return {line["test"]: Outcome(line["outcome"], line["exception"], tuple(line["problems"]),
                                  line["raised_in"]) for line in lines}


def matches(pattern: str, test: str) -> bool:
    """A test id against a listed one, where `*` matches anything (and `[`, as in test ids'
    parameters, is itself)."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), test) is not None


def differences(variant: str, path: Path = DIFFERENCES) -> dict[str, Difference]:
    """The listed differences of `variant`: test id (`*` a wildcard) -> `Difference` (a reason
    alone, or a table with `reason` and `raises`)."""
    listed = tomllib.loads(path.read_text()).get(variant, {})
    return {test: Difference(entry) if isinstance(entry, str) else Difference(**entry)
            for test, entry in listed.items()}


def listed(differ: dict[str, Difference], test: str) -> Difference | None:
    """The listed difference that covers `test`."""
    return next((d for pattern, d in differ.items() if matches(pattern, test)), None)


def judge(name: str, outcomes: dict[str, Outcome], plain: dict[str, Outcome],
          listing: dict[str, Difference]) -> dict:
    """A variant against plain vLLM: its counts, the tests it fails that vLLM passes (with the
    listed reason), and its problems (each one line)."""
    passing = sorted(t for t, o in plain.items() if o.outcome == "passed")
    problems, differ = [], []
    for test in passing:
        got = outcomes.get(test)
        if got is None:
            problems.append(f"{test}: not run")
        elif got.outcome != "passed":
            entry = listed(listing, test)
            differ.append({"test": test, "outcome": got.outcome, "exception": got.exception,
                           "raised_in": got.raised_in,
                           "reason": entry.reason if entry else None})
            if entry is None:
                problems.append(f"{test}: {got.outcome} ({got.exception}), passes on vLLM and "
                                "is not a listed policy difference")
            elif got.exception != entry.raises or not (got.raised_in or "").startswith(
                    entry.raised_in):
                problems.append(f"{test}: {got.exception} raised in {got.raised_in}, not the "
                                f"listed {entry.raises} in {entry.raised_in}")
    for test, got in outcomes.items():
        new = sorted(set(got.problems) - set(plain.get(test, got).problems))
        if new:
            problems.append(f"{test}: {new[0]}")
    failing = {d["test"] for d in differ}
    problems += [f"differences.toml [{name}] {pattern!r} matches no failing test"
                 for pattern in listing if not any(matches(pattern, t) for t in failing)]
    counts = {k: sum(o.outcome == k for o in outcomes.values())
              for k in ("passed", "failed", "skipped", "error")}
    return {"counts": counts, "fails_where_vllm_passes": differ, "problems": problems}


def run(variants: list[str], out: Path | None, python: str = sys.executable) -> dict:
    """Every variant (plain vLLM first), judged; written to `out` when given."""
    root = source.unpacked()
    logs = source.CACHE / "conformance"
    logs.mkdir(parents=True, exist_ok=True)
    results = {}
    started = time.time()
    plain = run_variant("vllm", root, logs, python)
    results["vllm"] = judge("vllm", plain, plain, {})
    for name in variants:
        if name != "vllm":
            print(f"conformance: {name} ...", flush=True)
            results[name] = judge(name, run_variant(name, root, logs, python), plain,
                                  differences(name))
    report = {"vllm_version": source.VERSION, "sdist_sha256": source.SHA256,
              "tests": list(TESTS), "ignored": list(IGNORED),
              "options": {name: VARIANTS[name] for name in results},
              "wall_s": round(time.time() - started, 1), "variants": results}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(report, indent=1) + "\n")
    return report
