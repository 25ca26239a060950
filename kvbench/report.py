"""`kvbench report`: regenerate results/README.md from the committed baselines and profiles,
and the blocks of README.md and of the docs/*.md pages that quote results (`update_readme`).

Inputs: `results/benchmarks/<machine-slug>/**/NNNN_*.json` (pytest-benchmark saves; the latest
per slug is reported) and `results/profiles/*.json` (from `kvbench calibrate`). One section per
device: headline tables and the profile plots. Nothing here measures; it only reads files.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from kvbench.calibration import stability
from kvbench.errors import KvbenchError
from kvbench.hardware import fingerprint_slug
from kvbench.io import write_atomic
from kvbench.profile import Profile, ProfileError, load, round_trip_ceiling_gbps
from kvbench.sim.metrics import METRICS


def latest_baselines(bench_dir: Path) -> dict[str, dict]:
    """slug -> the newest pytest-benchmark JSON saved under results/benchmarks/<slug>/."""
    found = {}
    for slug_dir in sorted(p for p in bench_dir.glob("*") if p.is_dir()):
        runs = sorted(slug_dir.rglob("*.json"), key=lambda p: p.name)
        if runs:
            data = json.loads(runs[-1].read_text())
            data["_path"] = runs[-1]
            found[slug_dir.name] = data
    return found


def load_profiles(profile_dir: Path) -> dict[str, list[tuple[Path, Profile]]]:
    """slug -> measured profiles (samples files, unreadable files and profiles that missed
    their quality bar are skipped)."""
    by_slug = defaultdict(list)
    for path in sorted(profile_dir.glob("*.json")):
        if path.name.endswith(".samples.json"):
            continue
        try:
            prof = load(path)
        except ProfileError:
            continue
        if prof.extra.get("quality", {}).get("passed") is False:
            continue  # missed its quality bar (`kvbench calibrate` wrote it as .rejected.json)
        by_slug[fingerprint_slug(prof.environment)].append((path, prof))
    return by_slug


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _fmt(value, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def profile_section(profiles: list[tuple[Path, Profile]], out_dir: Path) -> list[str]:
    rows, plots = [], []
    for path, p in profiles:
        r, fits = p.recompute, p.fits().values()
        out_in = [" / ".join(_fmt(getattr(s, key)) for s in (p.swap_out, p.swap_in))
                  for key in ("fixed_ms", "ms_per_token", "ms_per_block")]
        rows.append([
            f"[{p.model.name}]({path.relative_to(out_dir).as_posix()})", p.dtype,
            p.environment.get("commit") or "n/a", p.created_at[:10], p.swap.impl or "n/a",
            *out_in,
            _fmt(r.fixed_ms), _fmt(r.ms_per_token), _fmt(r.ms_per_token_sq),
            " / ".join(_fmt(fit.r2, ".4f") for fit in fits),
            " / ".join(f"{_fmt(100 * (fit.heldout_mape or 0), '.1f')}%" for fit in fits),
            p.crossover_tokens or "none"])
        png = path.with_suffix(".png")
        if png.exists():
            plots.append(f"![{p.model.name}]({png.relative_to(out_dir).as_posix()})")
    copy_rows = []
    for _, p in profiles:
        both_ways = round_trip_ceiling_gbps(p)
        for impl, data in p.extra.get("swap_impls", {}).items():
            gbps = data["round_trip_bandwidth_gbps"]
            best = max(gbps)
            copy_rows.append([p.model.name, impl, p.swap.block_size,
                              f"{data['num_tokens'][0]}-{data['num_tokens'][-1]}",
                              f"{best:.2f}", f"{gbps[-1]:.2f}",
                              f"{100 * best / both_ways:.0f}%" if both_ways else "n/a"])
    header = ["model", "dtype", "commit", "date", "swap impl", "swap fixed ms (out / in)",
              "swap ms/token (out / in)", "swap ms/block (out / in)", "recompute fixed ms",
              "recompute ms/token", "recompute ms/token²", "R² swap out / in / recompute",
              "held-out swap out / in / recompute", "crossover tokens"]
    copies = ["Swap copies during calibration (round trip: both directions' bytes over the sum "
              "of their times; ceiling: one contiguous copy of the swap space each way):", ""]
    copies += _table(["model", "impl", "block_size", "tokens", "peak bandwidth_gbps",
                      "at largest bandwidth_gbps", "peak of ceiling"], copy_rows)
    return (["### Calibrated profiles", ""] + _table(header, rows) + copies + plots + [""])


def benchmark_section(data: dict, out_dir: Path) -> list[str]:
    benches = data["benchmarks"]
    commit = data.get("commit_info", {}).get("id", "")[:7] or "n/a"
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "n/a")
    lines = [f"### Benchmarks ([{data['_path'].name}]"
             f"({data['_path'].relative_to(out_dir).as_posix()}))", "",
             f"Run {data.get('datetime', 'n/a')[:19]} at commit {commit}; CPU {cpu}.", ""]

    def median_ms(bench: dict) -> str:
        return f"{1e3 * bench['stats']['median']:.4g}"

    copies = [b for b in benches if b["name"].startswith("test_kv_copy")]
    if copies:
        lines += ["KV swap copy (bytes each way over median time; ceiling: one contiguous copy of "
                  "the same bytes):", ""]
        lines += _table(["direction", "num_tokens", "block_size", "impl", "median_ms",
                         "bandwidth_gbps", "of ceiling"], [
            [b["extra_info"]["direction"], b["extra_info"]["num_tokens"],
             b["extra_info"]["block_size"], b["extra_info"]["impl"], median_ms(b),
             f"{b['extra_info'].get('bandwidth_gbps', 0):.2f}",
             f"{100 * b['extra_info'].get('fraction_of_ceiling', 0):.0f}%"] for b in copies])
    attn = [b for b in benches if b["name"].startswith("test_prefill_attention")]
    if attn:
        lines += ["Causal prefill attention (FLOPs = 2·n²·Hq·d):", ""]
        lines += _table(["num_tokens", "impl", "median_ms", "tflop_per_s"], [
            [b["extra_info"]["num_tokens"], b["extra_info"]["impl"],
             median_ms(b), f"{b['extra_info'].get('tflop_per_s', 0):.3g}"] for b in attn])
    sel = [b for b in benches if b["group"] and b["group"].startswith("selector")]
    if sel:
        lines += ["Selector:", ""]
        lines += _table(["group", "name", "median_ms"], [
            [b["group"], b["name"], median_ms(b)] for b in sel])
    sim = [b for b in benches if b["name"].startswith("test_replay")]
    if sim:
        lines += ["Simulator (whole Azure conversation trace):", ""]
        lines += _table(["policy", "wall_s", "simulated requests per wall s", "preemptions"], [
            [b["param"], f"{b['extra_info'].get('wall_s', 0):.2f}",
             f"{b['extra_info'].get('requests_per_wall_s', 0):,.0f}",
             b["extra_info"].get("preemptions", "n/a")] for b in sim])
    fits = [b for b in benches if b["group"] == "calibration fits"]
    if fits:
        lines += ["Calibration fits:", ""]
        lines += _table(["name", "median_us"], [
            [b["name"], f"{1e6 * b['stats']['median']:.3g}"] for b in fits])
    return lines


def build_report(results_dir: Path) -> str:
    baselines = latest_baselines(results_dir / "benchmarks")
    profiles = load_profiles(results_dir / "profiles")
    lines = ["# kvbench results", "",
             "Generated by `kvbench report` from the committed baselines "
             "(`results/benchmarks/<machine>/`) and profiles (`results/profiles/`); do not edit "
             "by hand. Every number below was measured on the machine its section names.", ""]
    for slug in sorted(set(baselines) | set(profiles)):
        lines += [f"## {slug}", ""]
        if slug in profiles:
            env = profiles[slug][0][1].environment
            lines += [f"{env.get('device_name')}; torch {env.get('torch')}, triton "
                      f"{env.get('triton')}, CUDA {env.get('cuda') or 'n/a'}.", ""]
            lines += profile_section(profiles[slug], results_dir)
        if slug in baselines:
            lines += benchmark_section(baselines[slug], results_dir)
    if not baselines and not profiles:
        lines += ["Nothing measured yet: run `make calibrate` and `make bench-save`.", ""]
    return "\n".join(lines)


def write_report(results_dir: str | Path = "results") -> Path:
    results_dir = Path(results_dir)
    return write_atomic(results_dir / "README.md", build_report(results_dir))


# ---------------------------------------------------------------------------------------------
# README.md and docs/*.md blocks: the numbers the pages quote, rendered from committed results

README_BLOCK = re.compile(r"(<!-- report: (?P<source>\S+) -->\n).*?(<!-- /report -->)", re.S)
COMPARE_COLUMNS = ("policy", "preemptions", "preempted_requests", "preemptions_removed_pct",
                   "recompute_fraction_pct", "throughput_tokens_per_s", "ttft_p50_s",
                   "ttft_p99_s", "tpot_p50_ms")
SWEEP_METRICS = ("preemptions", "recompute_fraction", "ttft_p99_s", "throughput_tokens_per_s")


def compare_markdown(path: Path) -> list[str]:
    """A `kvbench compare-policies` compare.json as a markdown table (each policy against the
    first row, the baseline)."""
    data = json.loads(path.read_text())
    body = [[METRICS[key].format(row[key]) for key in COMPARE_COLUMNS] for row in data["table"]]
    header = [METRICS[key].label for key in COMPARE_COLUMNS]
    hits = [summary.get("prefix_hit_rate") for summary in data["summaries"]]
    if any(hit is not None for hit in hits):  # results that report prefix-cache hits
        header.append("prefix hit %")  # (none where prefix caching is off)
        body = [row + ["–" if hit is None else f"{100 * hit:.1f}"]
                for row, hit in zip(body, hits)]
    return _table(header, body)[:-1]


def sweep_markdown(path: Path) -> list[str]:
    """A sweep.csv (policies x rate scales, one cell each or the mean over seeds and cache
    sizes) as one markdown table per metric: a row per policy, a column per rate scale."""
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    scales = sorted({float(r["rate_scale"]) for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    lines = []
    for metric in SWEEP_METRICS:
        cells = defaultdict(list)
        for r in rows:
            cells[r["policy"], float(r["rate_scale"])].append(float(r[metric]))
        label = METRICS[metric].label
        header = [f"{label} at rate"] + [f"{s:g}x" for s in scales]
        body = [[p] + [METRICS[metric].format(sum(v) / len(v)) if (v := cells.get((p, s)))
                       else "–" for s in scales] for p in policies]
        lines += [f"**{label}**", ""] + _table(header, body)
    return lines[:-1]


def scale_markdown(report: dict) -> str:
    """A sweep-scale benchmark report (benchmarks/bench_sweep_scale.py) as a Markdown table:
    the same sweep with --jobs 1, --jobs 2 and on Ray (README's Fleet section)."""
    env = report["environment"]
    lines = [f"{report['cells']} cells on {env['device_name']}, Ray {report['ray']}, kvbench "
             f"{env['kvbench']} ({env['commit']})", "",
             "| mode | wall s | speed-up | simulating s | overhead ms/cell | load avg |",
             "|---|---|---|---|---|---|"]
    for m in report["modes"]:
        lines.append(f"| {m['mode']} | {m['wall_s']:.2f} | {m['speedup']:.2f}x | "
                     f"{m['compute_s']:.2f} | {m['overhead_per_cell_ms']:.0f} | "
                     f"{m['load_average_1min_before']:.1f} |")
    ray = report["modes"][-1]
    lines += ["", f"Ray alone: start {ray['start_s']:.1f} s, an empty task "
                  f"{ray['empty_task_ms']:.2f} ms at full throughput, "
                  f"{ray['empty_round_trip_ms']:.2f} ms one at a time (median)."]
    return "\n".join(lines)


def stability_markdown(data: dict) -> list[str]:
    """benchmarks/stability.py's runs (`--save`): each number's min, median, max and spread over
    the runs, then the verdicts of `kvbench.calibration.stability.judge`, one per criterion."""
    runs, goal = data["runs"], f"{100 * stability.GOAL:.0f}%"
    numbers = [k for k, v in runs[0].items()
               if k not in ("exit", "wall_s", "load_before") and not isinstance(v, dict)]
    body = [[f"`{k}`", *(_fmt(f(np.array([r[k] for r in runs]))) for f in (np.min, np.median,
                                                                        np.max)),
             f"{100 * stability.spread([r[k] for r in runs]):.1f}%"] for k in numbers]
    judged = stability.judge(runs)
    machine = data["machine"]
    met = {True: "met", False: "**not met**"}
    walls = ", ".join(f"{r['wall_s']:.0f}" for r in runs)
    loads = ", ".join(f"{r['load_before']:.2f}" for r in runs)
    worst_heldout = ", ".join(f"{phase.replace('_', ' ')} {100 * worst:.1f}%"
                              for phase, worst in judged.heldout_worst.items())
    lines = [f"{len(runs)} runs of `{data['command']}` on {machine['cpu_model']} "
             f"({machine['cpu_count']} cores), kvbench {machine.get('kvbench')} "
             f"({machine.get('commit')}); wall time {walls} s; load average before each {loads}",
             "",
             *_table(["number", "min", "median", "max", "spread"], body)[:-1], "",
             f"- (a) held-out error at most {goal} in every run: {met[judged.heldout_ok]} "
             f"(worst: {worst_heldout})"]
    if judged.lengths is None:
        return lines + ["- (b) decisions and (c) costs per machine speed: not judged, these runs "
                        "predate them (no `costs` per run); re-run `benchmarks/stability.py "
                        "--save` to judge them"]
    lengths, differ_at = judged.lengths, judged.differ_at
    differ = f"; they differ at {', '.join(map(str, differ_at))} tokens" if differ_at else ""
    per_speed, raw = judged.spread_per_speed, judged.spread_raw
    return lines + [
        f"- (b) the selector's decision the same in every run at {len(lengths)} log-spaced "
        f"lengths from {lengths[0]} to {lengths[-1]} tokens (inside every run's measured range): "
        f"{met[judged.decisions_ok]} ({len(lengths) - len(differ_at)} of {len(lengths)} "
        f"agree{differ})",
        f"- (c) predicted costs at those lengths within {goal} across runs, each divided by its "
        f"run's reference workload (mean of before and after): {met[judged.costs_ok]} (worst "
        f"spread over lengths: swap {100 * per_speed['swap']:.1f}%, recompute "
        f"{100 * per_speed['recompute']:.1f}%; undivided: swap {100 * raw['swap']:.1f}%, "
        f"recompute {100 * raw['recompute']:.1f}%)"]


BENCH_COLUMNS = {  # extra_info key: (column, format); a row shows the ones it has
    "wall_s": ("wall s", ".1f"), "num_steps": ("steps", "d"), "steps": ("steps", "d"),
    "steps_per_wall_s": ("steps/s", ".0f"), "num_preemptions": ("preemptions", "d"),
    "preemptions": ("preemptions", "d"), "speedup": ("simulator speed-up", ".2f"),
    "vllm_ms_per_step_median": ("vLLM ms/step", ".4f"),
    "kvbench_us_per_step_median": ("kvbench µs/step", ".2f"),
    "overhead_pct": ("overhead %", ".2f"),
}


def bench_extra_markdown(data: dict) -> list[str]:
    """A pytest-benchmark JSON (`--benchmark-json`) as a table of its rows' extra_info numbers
    (`BENCH_COLUMNS`): the benchmarks that record what they measured there."""
    rows = [(b["name"], b["extra_info"]) for b in data["benchmarks"]]
    keys = [k for k in BENCH_COLUMNS if any(k in extra for _, extra in rows)]
    labels = list(dict.fromkeys(BENCH_COLUMNS[k][0] for k in keys))
    body = []
    for name, extra in rows:
        cells = dict.fromkeys(labels, "–")
        for k in keys:
            if k in extra:
                label, spec = BENCH_COLUMNS[k]
                cells[label] = format(extra[k], spec)
        body.append([f"`{name}`", *cells.values()])
    commit = data.get("commit_info", {}).get("id", "")[:7]
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")
    return [f"{cpu}, commit {commit}, {data.get('datetime', '')[:16]}", "",
            *_table(["benchmark", *labels], body)[:-1]]


def before_after_markdown(folder: Path) -> list[str]:
    """A before/after comparison: pytest-benchmark JSONs `before-*.json` and `after-*.json` of
    the same benchmarks (rounds run interleaved on one machine), as one row per benchmark: the
    median wall time of each side over its rounds and the change."""
    sides = {side: [json.loads(p.read_text()) for p in sorted(folder.glob(f"{side}-*.json"))]
             for side in ("before", "after")}
    if not sides["before"] or not sides["after"]:
        raise KvbenchError(f"{folder}: needs before-*.json and after-*.json (pytest-benchmark)")
    walls = {side: defaultdict(list) for side in sides}
    for side, runs in sides.items():
        for run in runs:
            for b in run["benchmarks"]:
                walls[side][b["name"]].append(b["stats"]["median"])
    body = []
    for name, before in walls["before"].items():
        after = walls["after"].get(name)
        if after:
            b, a = float(np.median(before)), float(np.median(after))
            body.append([f"`{name}`", f"{b:.2f}", f"{a:.2f}", f"{100 * (a / b - 1):+.1f}%"])
    first = sides["after"][0]
    cpu = first.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")
    rounds = " + ".join(str(max(map(len, walls[side].values()))) for side in sides)
    rounds = f"{rounds} rounds, interleaved"
    return [f"{cpu}, {rounds}, {first.get('datetime', '')[:16]}", "",
            *_table(["benchmark", "before s", "after s", "change"], body)[:-1]]


def calibrate_time_markdown(data: dict) -> list[str]:
    """benchmarks/calibrate_time.py's runs: wall time against the target, the plan's estimate
    and each phase's measured seconds beside it, the dtype, the plain progress lines logged."""
    rows = []
    for r in data["runs"]:
        phases = ", ".join(f"{p} {r['measured_s'][p]:.0f} ({r['planned_s'][p]:.0f})"
                           for p in r["measured_s"])
        within = "yes" if r["wall_s"] <= r["budget_s"] else "**no**"
        rows.append([f"`{r['command']}`", r["dtype"], f"{sum(r['planned_s'].values()):.0f}",
                     phases, f"{r['wall_s']:.0f}", f"{r['budget_s']:.0f}", within,
                     r["progress_lines"]])
    cpu = data["machine"]
    return [f"{cpu['cpu_count']}-core {cpu['cpu_model']} ({fingerprint_slug(cpu)}), kvbench "
            f"{cpu['kvbench']} ({cpu['commit']})", "",
            *_table(["command (stderr to a file)", "dtype", "planned s", "phases: measured "
                     "(planned) s", "wall s", "target s", "within", "progress lines"], rows)[:-1]]


def ci_time_markdown(data: dict) -> list[str]:
    """benchmarks/ci_time.py's run: `.ci/run` on a fresh clone, each step's minutes."""
    cpu = data["machine"]
    rows = [[f"`{s['step']}`", f"{s['seconds'] / 60:.1f}"] for s in data["steps"]]
    return [f"`{data['command']}` on a fresh clone of {data['commit']}, {cpu['cpu_count']}-core "
            f"{cpu['cpu_model']} ({fingerprint_slug(cpu)}): **{data['total_s'] / 60:.1f} min** "
            "in all", "", *_table(["step", "minutes"], rows)[:-1]]


def profile_markdown(root: Path, source: str) -> list[str]:
    """What `kvbench calibrate` printed for the committed profile `source`, from the profile."""
    from kvbench.calibration.pipeline import calibration_summary, samples_path

    path = Path(source)
    profile = load(root / path)
    lines = calibration_summary(profile, [path, samples_path(path, profile),
                                          path.with_suffix(".png")])
    return ["```", *lines, "```"]


def validate_markdown(data: dict) -> list[str]:
    """`kvbench validate --json`'s report (its command recorded beside it) as a table."""
    from kvbench.calibration.validate import ValidationReport

    report = ValidationReport(**{k: data[k] for k in ValidationReport.__dataclass_fields__})
    return [f"`{data['command']}`", "", *_table(list(report.COLUMNS), report.rows()),
            report.summary_line()]


def render_source(root: Path, source: str) -> list[str]:
    path = root / source
    if path.is_dir() and path.parent.name == "before-after":
        return before_after_markdown(path)
    if path.parent.name == "ci-time":
        return ci_time_markdown(json.loads(path.read_text()))
    if path.parent.name == "calibrate-time":
        return calibrate_time_markdown(json.loads(path.read_text()))
    if path.name.endswith(".validate.json"):
        return validate_markdown(json.loads(path.read_text()))
    if path.parent.name == "profiles" and path.suffix == ".json":
        return profile_markdown(root, source)
    if path.name == "compare.json":
        return compare_markdown(path)
    if path.name == "sweep.csv":
        return sweep_markdown(path)
    if path.name.endswith("-sweep-scale.json"):
        return scale_markdown(json.loads(path.read_text())).split("\n")
    if path.name.endswith("-stability.json"):
        return stability_markdown(json.loads(path.read_text()))
    if path.name == "replay.json":
        from kvbench.vllm.replay_table import replay_markdown

        return replay_markdown(json.loads(path.read_text()))
    if path.name == "mechanisms.json":
        from kvbench.vllm.replay_table import mechanisms_markdown

        return mechanisms_markdown(json.loads(path.read_text()))
    if path.parent.name == "conformance":
        from kvbench.vllm.conformance.table import conformance_markdown

        return conformance_markdown(json.loads(path.read_text()))
    if path.suffix == ".json" and "benchmarks" in (data := json.loads(path.read_text())):
        return bench_extra_markdown(data)
    raise KvbenchError(f"README block names {source}: only profiles/*.json, *.validate.json, "
                       "calibrate-time/*.json, ci-time/*.json, compare.json, sweep.csv, "
                       "*-sweep-scale.json, *-stability.json, replay.json, mechanisms.json, "
                       "conformance/*.json, pytest-benchmark "
                       "JSON and before-after/*/ folders render")


def result_pages(readme: str | Path) -> list[Path]:
    """README.md and the docs/*.md pages beside it that hold a `<!-- report: ... -->` block:
    the pages `kvbench report` rewrites (none where README.md is absent)."""
    readme = Path(readme)
    if not readme.is_file():
        return []
    docs = sorted((readme.parent / "docs").glob("*.md"))
    return [readme, *(page for page in docs if README_BLOCK.search(page.read_text()))]


def update_readme(readme: str | Path, root: str | Path = ".") -> Path:
    """Rewrite every `<!-- report: SOURCE -->` ... `<!-- /report -->` block of a page (README.md
    or a docs/*.md page) with SOURCE rendered afresh (SOURCE relative to `root`)."""
    readme, root = Path(readme), Path(root)
    text = README_BLOCK.sub(lambda m: m.group(1) + "\n".join(render_source(root, m["source"]))
                            + "\n" + m.group(3), readme.read_text())
    return write_atomic(readme, text)
