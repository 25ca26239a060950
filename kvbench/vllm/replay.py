"""`kvbench replay`: a trace through a real vLLM engine, under vLLM's scheduler and kvbench's.

For vLLM's own scheduler and then for each kvbench policy (`kvbench.vllm.scheduler`), a fresh
vLLM engine (`LLMEngine`, its engine core in this process) runs a model from a local
`config.json` with dummy weights (default: kvbench's tiny Llama; nothing is downloaded), and the
trace is fed to it on a wall clock: request i is added once `arrival_s[i]` seconds (the trace's
times divided by `rate_scale`) have passed since the start, between engine steps, as vLLM's
engine core adds requests. Prompts are the seeded random token ids the simulator uses
(`kvbench.sim.tokens`); each request generates exactly its trace output (`max_tokens`,
`ignore_eos`) and carries that length as the oracle predictor's hint.

Measured in this process, per request: TTFT (first output token - arrival), TPOT, E2E. Measured
by an executor subclass that sees every batch vLLM runs (`ObservedExecutor`), not by any
scheduler's bookkeeping: the step log (`kvbench.sim.steplog`), preemptions, and the tokens
recomputed (positions a request computes again below the furthest it had reached) and their
FLOPs. The plugin's own per-request records (JSON lines) are kept beside them and must agree.

Then the simulator runs the same trace, engine settings (vLLM 0.32's rules, async scheduling
off as on vLLM's CPU platform) and policies, with a step time fitted to every step the engines
ran (`linear:<a>ms+<b>ms/token`, see `fit_step_time`), so the two can be set side by side.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local config.json: never ask the hub
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the result's
# The engine core in this process: its executor's log is read here, and no second process
# competes for the cores.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from rich.table import Table  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.v1.engine.llm_engine import LLMEngine  # noqa: E402
from vllm.v1.executor.uniproc_executor import UniProcExecutor  # noqa: E402

from kvbench.errors import KvbenchError  # noqa: E402
from kvbench.hardware import slugify  # noqa: E402
from kvbench.io import write_atomic  # noqa: E402
from kvbench.models import ModelSpec, from_hf_config  # noqa: E402
from kvbench.sim.config import SimConfig  # noqa: E402
from kvbench.sim.engine import Simulator  # noqa: E402
from kvbench.sim.engines import ReplicaSpec  # noqa: E402
from kvbench.sim.metrics import METRICS, latency_stats, summarize  # noqa: E402
from kvbench.sim.policies import Knobs, PolicySpec  # noqa: E402
from kvbench.sim.steplog import (  # noqa: E402
    EVENTS,
    TOKEN_EVENTS,
    StepLog,
    StepLogBuilder,
    first_difference,
)
from kvbench.sim.study import summary_table, table_cells  # noqa: E402
from kvbench.sim.tokens import workload_token_ids  # noqa: E402
from kvbench.sim.workloads import TokenIds, Workload  # noqa: E402
from kvbench.vllm.differential import same_requests  # noqa: E402
from kvbench.vllm.drive import TINY_MODEL, check_replica, log_admissions  # noqa: E402
from kvbench.vllm.instrument import summarize_records  # noqa: E402
from kvbench.vllm.options import (  # noqa: E402
    ENV_PREFIX,
    OUTPUT_TOKENS_HINT,
    PluginOptions,
)
from kvbench.vllm.replay_table import replay_markdown, replay_title  # noqa: E402
from kvbench.vllm.scheduler import KvbenchScheduler, preemption_costs  # noqa: E402

VLLM_ROW = "vllm"  # vLLM's own scheduler class, no plugin
REPLAY_POLICIES = (
    "fcfs/lifo/recompute/history",  # the plugin with vLLM's decisions: records only
    "future-kv/lifo/recompute/oracle",
    "future-kv/lifo/recompute/history",
    "fcfs/cost-aware/recompute/history",
    "future-kv/cost-aware/recompute/history",
)
LATENCIES = ("ttft_s", "tpot_ms", "e2e_s")
HUBER_SCALE_MS = 1.0  # step times within this of the fit count as squares (fit_step_time)


@dataclass(frozen=True)
class ReplayEngine:
    """The vLLM engine a replay starts: the replica (its `num_gpu_blocks` given: vLLM's
    --num-gpu-blocks-override, one of them the null block), the model and the seed."""

    replica: ReplicaSpec
    model: Path = TINY_MODEL  # a folder with a config.json; the weights are dummy
    seed: int = 0

    def __post_init__(self) -> None:
        model = Path(self.model)
        if model.name == "config.json":  # the file itself: vLLM takes its folder
            model = model.parent
        if not (model / "config.json").is_file():
            raise KvbenchError(f"model {self.model}: no config.json there; give the folder of "
                               "a Hugging Face config.json")
        object.__setattr__(self, "model", model)
        check_replica(self.replica, step_s=1.0)

    def model_spec(self) -> ModelSpec:
        return from_hf_config(self.model / "config.json")

    def max_model_len(self, workload: Workload) -> int:
        """The longest request; every request must fit the cache alone (or vLLM would preempt
        it forever), and vLLM refuses a max_model_len the cache cannot hold."""
        total = workload.prompt_tokens + workload.output_tokens
        replica = self.replica
        capacity = replica.usable_blocks * replica.block_size
        too_big = np.flatnonzero(total > capacity)
        if too_big.size:
            i = int(too_big[0])
            raise KvbenchError(f"request {i}: {total[i]} tokens (prompt + output) exceed the KV "
                               f"cache's {capacity} ({replica.num_gpu_blocks} blocks of "
                               f"{replica.block_size}, one of them vLLM's null block); give "
                               "more --num-gpu-blocks or --num-requests")
        return int(total.max())

    def engine_args(self, max_model_len: int, options: PluginOptions | None,
                    kv_transfer: dict | None = None) -> EngineArgs:
        """vLLM's engine arguments: the kvbench scheduler with `options` (None: vLLM's own),
        and a KV connector (`kv_transfer`, vLLM's --kv-transfer-config) if given. The engine
        runs in the config's dtype, so that the KV bytes the records price are the engine's."""
        plugin = options is not None
        settings = self.replica.vllm_settings(max_model_len)
        return EngineArgs(
            model=str(self.model), load_format="dummy", skip_tokenizer_init=True,
            dtype=self.model_spec().dtype, kv_transfer_config=kv_transfer,
            seed=self.seed, enforce_eager=True, **settings["cache"], **settings["scheduler"],
            num_gpu_blocks_override=self.replica.num_gpu_blocks,
            gpu_memory_utilization=self.replica.gpu_memory_utilization,
            distributed_executor_backend=ObservedExecutor,
            scheduler_cls=KvbenchScheduler if plugin else None,
            additional_config=options.to_config() if plugin else {})

    def sim_config(self, max_model_len: int, step_time: str, policy: PolicySpec,
                   knobs: Knobs) -> SimConfig:
        """The simulator as this engine schedules, under `policy` and `knobs`."""
        return SimConfig(policy=policy, knobs=dataclasses.replace(knobs, seed=self.seed),
                         replica=dataclasses.replace(self.replica, max_model_len=max_model_len),
                         step_time=step_time)

    def document(self) -> dict:
        return {**dataclasses.asdict(self.replica), "model": str(self.model), "seed": self.seed}


class BatchObserver:
    """Every batch one engine runs: the step log, and per request the tokens computed again
    below the furthest position it had reached (a preemption dropped them) and the FLOPs
    (`ModelSpec.chunk_flops`) of all and of those. Request i is vLLM's "i-<suffix>"."""

    def __init__(self, model: ModelSpec, num_requests: int, engine: str) -> None:
        self.model = model
        self.log = StepLogBuilder(engine=engine)
        self.start = time.perf_counter()
        self.reached = np.zeros(num_requests, dtype=np.int64)
        self.recompute_tokens = np.zeros(num_requests, dtype=np.int64)
        self.wasted_flops = np.zeros(num_requests)
        self.flops = np.zeros(num_requests)
        self.last_batch_tokens = 0

    def batch(self, scheduler_output) -> None:
        scheduled = scheduler_output.num_scheduled_tokens
        preempted = sorted(_index(r) for r in scheduler_output.preempted_req_ids or ())
        if not scheduled and not preempted:
            return
        new, cached = scheduler_output.scheduled_new_reqs, scheduler_output.scheduled_cached_reqs
        start_of = {r.req_id: r.num_computed_tokens for r in new}
        start_of.update(zip(cached.req_ids, cached.num_computed_tokens))
        ids = np.array([_index(r) for r in scheduled], dtype=np.int64)
        tokens = np.fromiter(scheduled.values(), np.int64, ids.size)
        start = np.array([start_of[r] for r in scheduled], dtype=np.int64)
        end = start + tokens
        redo, redo_tokens, redo_flops = self.model.recomputation(start, end, self.reached[ids])
        self.recompute_tokens[ids[redo]] += redo_tokens
        self.wasted_flops[ids[redo]] += redo_flops
        self.flops[ids] += self.model.chunk_flops(start, end)
        self.reached[ids] = np.maximum(self.reached[ids], end)
        self.last_batch_tokens = int(tokens.sum())
        step = self.log.add_step(time.perf_counter() - self.start, ids.tolist(), tokens.tolist())
        if preempted:
            self.log.add_events("preempted", step, preempted)
        log_admissions(self.log, step, scheduler_output, _index)


def _index(request_id: str) -> int:
    """vLLM's internal id "17-5e0f6a1b" of replayed request "17" -> 17."""
    return int(request_id.rsplit("-", 1)[0])


class ObservedExecutor(UniProcExecutor):
    """vLLM's one-process executor, showing each batch to `observer` before running it."""

    observer: BatchObserver | None = None

    def execute_model(self, scheduler_output, non_block: bool = False):
        if self.observer is not None:
            self.observer.batch(scheduler_output)
        return super().execute_model(scheduler_output, non_block)


@dataclass
class EngineRun:
    """One replay through one engine (times in seconds from its start)."""

    label: str
    log: StepLog
    first_token_s: np.ndarray
    finish_s: np.ndarray
    observer: BatchObserver
    step_s: np.ndarray  # wall time of each engine step that ran one batch ...
    step_tokens: np.ndarray  # ... and that batch's tokens
    records: Path | None
    wall_s: float
    load_average: tuple[float, float]  # this machine's 1-minute load at the start and end


def run_engine(workload: Workload, tokens: TokenIds, settings: ReplayEngine, label: str,
               options: PluginOptions | None, progress: Callable[[int], None] | None = None,
               kv_transfer: dict | None = None) -> EngineRun:
    """Replay `workload` through a fresh engine: vLLM's scheduler (`options` None) or the
    kvbench scheduler with `options`; `kv_transfer`: a KV connector's configuration."""
    max_model_len = settings.max_model_len(workload)
    load_start = os.getloadavg()[0]
    engine = LLMEngine.from_engine_args(settings.engine_args(max_model_len, options,
                                                             kv_transfer))
    try:
        executor = engine.engine_core.engine_core.model_executor
        n = workload.num_requests
        observer = executor.observer = BatchObserver(settings.model_spec(), n, label)
        arrival_s, output_tokens = workload.arrival_s - workload.arrival_s[0], \
            workload.output_tokens
        first_token_s, finish_s = np.full(n, np.nan), np.full(n, np.nan)
        step_s, step_tokens = [], []
        added = done = 0
        start = observer.start
        while done < n:
            now = time.perf_counter() - start
            while added < n and arrival_s[added] <= now:
                size = int(output_tokens[added])
                engine.add_request(str(added), TokensPrompt(
                    prompt_token_ids=tokens.prompt(added).tolist()), SamplingParams(
                    max_tokens=size, ignore_eos=True, output_kind=RequestOutputKind.DELTA,
                    extra_args={OUTPUT_TOKENS_HINT: size}))
                added += 1
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, float(arrival_s[added]) - now))
                continue
            steps_before = observer.log.num_steps
            outputs = engine.step()
            end = time.perf_counter() - start
            if observer.log.num_steps == steps_before + 1:
                step_s.append(end - now)
                step_tokens.append(observer.last_batch_tokens)
            for output in outputs:
                i = int(output.request_id)
                if output.outputs[0].token_ids and np.isnan(first_token_s[i]):
                    first_token_s[i] = end
                if output.finished:
                    finish_s[i] = end
                    observer.log.add_events("finished", observer.log.num_steps - 1, [i])
                    done += 1
            if progress:
                progress(done)
        wall_s = time.perf_counter() - start
    finally:
        engine.engine_core.shutdown()  # the kvbench scheduler writes its summary
        del engine
        gc.collect()
    return EngineRun(label, observer.log.build(), first_token_s, finish_s, observer,
                     np.array(step_s), np.array(step_tokens, dtype=np.int64),
                     options.records if options is not None else None, wall_s,
                     (load_start, os.getloadavg()[0]))


def run_summary(run: EngineRun, workload: Workload, model: ModelSpec) -> dict:
    """A replay's numbers under the simulator's summary names (`kvbench.sim.metrics`)."""
    arrival_s = workload.arrival_s - workload.arrival_s[0]
    n = workload.output_tokens
    done = np.isfinite(run.finish_s)
    ttft_s, e2e_s = run.first_token_s - arrival_s, run.finish_s - arrival_s
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot_ms = np.where(n > 1, (e2e_s - ttft_s) * 1e3 / (n - 1), np.nan)
    makespan_s = float(np.nanmax(run.finish_s)) if done.any() else 0.0
    observer = run.observer
    flops = float(observer.flops.sum() + model.lm_head_flops * n[done].sum())
    summary = {
        "policy": run.label, "requests": int(n.size), "completed": int(done.sum()),
        "preemptions": run.log.num_preemptions,
        "preempted_requests": int(np.unique(run.log.preempted_request).size),
        "recompute_tokens": int(observer.recompute_tokens.sum()),
        "recompute_fraction": float(observer.wasted_flops.sum()) / flops if flops else 0.0,
        "throughput_tokens_per_s": float(n[done].sum()) / makespan_s if makespan_s else 0.0,
        "useful_utilization": None,  # a real engine's busy time is not split by cause
        "steps": run.log.num_steps, "makespan_s": makespan_s, "wall_s": run.wall_s,
        "step_ms_median": float(np.median(run.step_s)) * 1e3 if run.step_s.size else None,
        "step_ms_mean": float(np.mean(run.step_s)) * 1e3 if run.step_s.size else None,
        "load_average": run.load_average,
    }
    for name, values in zip(LATENCIES, (ttft_s, tpot_ms, e2e_s)):
        summary.update(latency_stats(name, values[done]))
    if run.records is not None:
        summary["records"] = str(run.records)
        summary["records_summary"] = summarize_records(run.records)
    return summary


def fit_step_time(runs: list[EngineRun]) -> str:
    """The steps of all `runs` as the simulator's `linear:<a>ms+<b>ms/token`: each step's wall
    time on its batch's tokens, non-negative, with a Huber loss (residuals beyond
    `HUBER_SCALE_MS` count linearly), so that the few steps another process on the machine
    stalled do not set the typical step."""
    from scipy.optimize import least_squares

    tokens = np.concatenate([run.step_tokens for run in runs])
    step_ms = np.concatenate([run.step_s for run in runs]) * 1e3
    if np.unique(tokens).size < 2:
        raise KvbenchError(f"{tokens.size} steps of one batch size; a step time needs at least "
                         "two sizes (more requests)")
    fit = least_squares(lambda p: p[0] + p[1] * tokens - step_ms, x0=[np.median(step_ms), 0.0],
                        bounds=([0.0, 0.0], [np.inf, np.inf]), loss="huber",
                        f_scale=HUBER_SCALE_MS)
    fixed_ms, per_token_ms = fit.x
    return f"linear:{fixed_ms:.6g}ms+{per_token_ms:.6g}ms/token"


def _canonical(log: StepLog) -> StepLog:
    """Events in request order within a step (the executor sees preemptions as a set)."""
    columns = {}
    for name in EVENTS:
        step, request = getattr(log, f"{name}_step"), getattr(log, f"{name}_request")
        order = np.lexsort((request, step))
        columns |= {f"{name}_step": step[order], f"{name}_request": request[order]}
        if name in TOKEN_EVENTS:
            columns[f"{name}_tokens"] = getattr(log, f"{name}_tokens")[order]
    return dataclasses.replace(log, **columns)


@dataclass
class ReplayResult:
    """The replayed rows (vLLM's scheduler first), the simulator's rows for the same runs,
    and where each pair's schedules first part."""

    workload: dict
    settings: ReplayEngine
    step_time: str
    replayed: list[dict]
    simulated: list[dict]
    differences: list[str | None]

    def gap_rows(self) -> list[dict]:
        rows = []
        for real, sim, difference in zip(self.replayed, self.simulated, self.differences):
            row = {"policy": real["policy"], "preemptions_replay": real["preemptions"],
                   "preemptions_sim": sim["preemptions"]}
            for key in ("ttft_p50_s", "ttft_p99_s"):
                row |= {f"{key}_replay": real[key], f"{key}_sim": sim[key]}
            rows.append(row | {"first_difference": difference or "none"})
        return rows

    def tables(self) -> list[Table]:
        gap = Table(title=f"replay vs simulator (step time {self.step_time})")
        for column in ["policy"] + [f"{METRICS[key].label} {side}" for key in (
                "preemptions", "ttft_p50_s", "ttft_p99_s") for side in ("replay", "sim")]:
            gap.add_column(column, justify="left" if column == "policy" else "right")
        for row in self.gap_rows():
            gap.add_row(*table_cells(list(row.values())[:-1]))
        title = replay_title(self.document())
        return [summary_table(self.replayed, f"replayed in vLLM · {title}"),
                summary_table(self.simulated, f"simulated · {title}"), gap]

    def document(self, command: str = "") -> dict:
        return {"command": command, "workload": self.workload,
                "settings": self.settings.document(),
                "step_time": self.step_time,
                "replayed": self.replayed, "simulated": self.simulated,
                "gap": self.gap_rows()}

    def write(self, out_dir: Path, command: str) -> list[Path]:
        document = self.document(command)
        return [write_atomic(out_dir / "replay.json", json.dumps(document, indent=1) + "\n"),
                write_atomic(out_dir / "replay.md", "\n".join(replay_markdown(document)) + "\n")]


def default_out_dir(settings: ReplayEngine) -> Path:
    """results/replay/<this machine's device>-<model folder>, e.g. cpu-amd-epyc-2c-tiny-llama."""
    from kvbench.hardware import device_slug, resolve_device

    device = device_slug(resolve_device())
    return Path("results/replay") / f"{device}-{slugify(settings.model.name)}"


def plugin_options(policy: str, profile: Path | None, hardware: str, records: Path
                   ) -> PluginOptions:
    """admission/victim/preemption/predictor as the kvbench scheduler's options."""
    config = PolicySpec.parse(policy)
    if config.preemption != "recompute":
        raise KvbenchError(f"policy {policy!r}: vLLM v1 can only recompute a preempted request; "
                         f"write {config.admission}/{config.victim}/recompute/"
                         f"{config.predictor}")
    return PluginOptions.parse({"admission": config.admission, "victim": config.victim,
                                "predictor": config.predictor, "profile": profile,
                                "hardware": hardware, "records": records})


def replay(workload: Workload, settings: ReplayEngine, policies: list[str] | tuple[str, ...],
           records_dir: Path, profile: Path | None = None, hardware: str = "h100-sxm",
           progress: Callable[[str, int], None] | None = None) -> ReplayResult:
    """vLLM's scheduler, then each policy, through real engines, and the simulator beside
    them (see the module docstring). Per-request records: `records_dir/<policy>.jsonl`.
    `progress(label, requests done)` while an engine runs."""
    given = sorted(k for k in os.environ if k.startswith(ENV_PREFIX))
    if given:
        raise KvbenchError(f"unset {given[0]}: replay gives each engine its own kvbench options")
    options = [plugin_options(p, profile, hardware, records_dir / f"{slugify(p)}.jsonl")
               for p in policies]
    model = settings.model_spec()
    max_model_len = settings.max_model_len(workload)
    tokens = workload_token_ids(workload, settings.seed, vocab_size=model.vocab_size)
    runs = []
    for label, option in [(VLLM_ROW, None), *zip(policies, options)]:
        report = (lambda done, label=label: progress(label, done)) if progress else None
        runs.append(run_engine(workload, tokens, settings, label, option, report))
    step_time = fit_step_time(runs)
    sim_costs, _ = preemption_costs(PluginOptions.parse(
        {"profile": profile, "hardware": hardware}), model, settings.replica.block_size)
    replayed, simulated, differences = [], [], []
    for run, option in zip(runs, [None, *options]):
        policy, knobs = ((option.policy, option.knobs) if option is not None
                         else (PolicySpec.parse(REPLAY_POLICIES[0]), Knobs()))
        config = settings.sim_config(max_model_len, step_time, policy, knobs)
        result = Simulator(same_requests(workload), config, sim_costs, tokens=tokens,
                           record=True).run()
        replayed.append(run_summary(run, workload, model))
        simulated.append(summarize(result) | {"policy": run.label})
        differences.append(first_difference(_canonical(run.log), _canonical(result.step_log),
                                            times=False))
    return ReplayResult(workload.describe(), settings, step_time, replayed, simulated,
                        differences)
