"""Per-request preemption records of a vLLM engine under the kvbench scheduler.

The scheduler (`kvbench.vllm.scheduler`) tells a `Recorder` what happens to each request, in
plain numbers; the recorder keeps one `RequestRecord` per unfinished request and writes one JSON
line per finished request to the `records` file, then an aggregate summary beside it
(`<records stem>.summary.json`) when the engine shuts down. `summarize_records(path)` computes
the same summary from the lines at any time.

A line (units in the names; vLLM's own request id, e.g. "17-5e0f6a1b" for request "17"):

* `prompt_tokens`, `max_tokens`, `output_tokens`, `predicted_output_tokens` (the predictor's
  guess on arrival; null under vLLM's own policies, which predict nothing), `finish_reason`,
  `arrival_time`, `finish_time` (seconds since the epoch);
* `num_preemptions`, `preemption_frequency` (preemptions per output token, as the simulator);
* `recompute_tokens`: positions whose KV a preemption dropped and that were computed again
  (on re-admission the prefix cache may give some back: those are not recomputed), counted
  from the tokens scheduled after each preemption, not from vLLM's counters;
* `wasted_flops`: their FLOPs, `ModelSpec.chunk_flops` (the simulator's formula: linear·n +
  attention·(end² - start²)); `flops`: everything the request computed, recomputation and one
  LM head per output token included;
* `preempted_s`: time spent preempted, from each preemption to the re-admission;
* `prefix_hit_tokens`: tokens the prefix cache gave on the first admission;
* `preemptions`: per preemption, what the selector would choose from the profile's costs:
  `computed_tokens` dropped, `kv_bytes` a swap would move, `swap_ms` (round trip),
  `recompute_ms`, `selector` ("swap" when swap_ms <= recompute_ms, as `kvbench select`), and
  `saved_ms` = recompute_ms - swap_ms when the selector swaps, else 0. Without kvbench's swap
  connector vLLM v1 always recomputes: these say what swapping would have cost and saved.
  With the connector (`kvbench.vllm.swap_connector`) each preemption also says what happened:
  `decision` (swap or recompute), `reason` (policy, host-full: the policy would swap but the
  host pool has no room, no-kv), `host_blocks`, the profile's `predicted` swap_out_ms,
  swap_in_ms and recompute_ms of its tokens; `swap_out` {bytes, ms, ok} as the worker measured
  the copy; on resume `loaded_tokens` and `swap_in` {bytes, ms, predicted_ms} (the load of
  what the device's prefix cache no longer held), or `fallback` when a swapped victim
  recomputed after all (copy-not-done: resumed before the worker reported the copy;
  copy-failed; not-loaded) or null when its blocks were all still cached on the device.
  With kvbench's write-through connector (`kvbench.vllm.write_through`) a resumed victim's
  preemption has `resume` {device_tokens, host_tokens, load_ms, recompute_ms (predicted),
  decision load or recompute, loaded_tokens}, `decision` and `loaded_tokens`, and `swap_in`
  {bytes, ms, predicted_ms} for its load; stores are summed for the engine (`host_store_*`).
"""

from __future__ import annotations

import json
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvbench.costmodel import CostModel
from kvbench.io import write_atomic
from kvbench.models import ModelSpec
from kvbench.sim.requests import cdiv

PREDICTED = ("swap_out_ms", "swap_in_ms", "recompute_ms")
# Per finished request, what the summary adds up (kept as columns, not as records).
COLUMNS = ("output_tokens", "num_preemptions", "recompute_tokens", "wasted_flops", "flops",
           "preempted_s", "swap_choices", "swap_ms", "recompute_ms", "saved_ms",
           "swapped", "fallbacks", "loaded_tokens", "bytes_out", "bytes_in", "swap_out_ms",
           "swap_in_ms", "swap_out_predicted_ms", "swap_in_predicted_ms")


@dataclass(slots=True)
class RequestRecord:
    """One request's record while it runs (see the module docstring)."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    predicted_output_tokens: int | None
    arrival_time: float
    prediction: int  # the prediction the policies plan with, revised as the request outlives it
    prefix_hit_tokens: int | None = None  # None until first admitted
    num_preemptions: int = 0
    dropped_tokens: int = 0  # positions [0, dropped) lost their KV to a preemption
    recompute_tokens: int = 0
    wasted_flops: float = 0.0
    preempted_s: float = 0.0
    preempted_since: float | None = None  # monotonic clock
    preemptions: list[dict] = field(default_factory=list)


class Recorder:
    """Records of one engine's requests; see the module docstring."""

    def __init__(self, model: ModelSpec, costs: CostModel, block_size: int,
                 path: Path | None = None, about: dict | None = None) -> None:
        self.model, self.costs = model, costs
        self.block_bytes = block_size * model.kv_bytes_per_token
        self.block_size = block_size
        self.about = about or {}  # policy, model, costs: copied into the summary
        self.open: dict[str, RequestRecord] = {}
        # Preempted requests until they are re-admitted and past what they lost.
        self.catching_up: dict[str, RequestRecord] = {}
        self.columns = {name: array("d") for name in COLUMNS}
        # Host transfers of the write-through connector, by direction: bytes, ms, predicted ms
        self.host = {d: np.zeros(3) for d in ("store", "load")}
        self.path = path
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "w", buffering=1)  # noqa: SIM115 (closed by close())

    def add(self, request_id: str, prompt_tokens: int, max_tokens: int, predicted: int | None,
            arrival_time: float) -> RequestRecord:
        """A new request; `predicted` output tokens when a policy plans with predictions."""
        record = RequestRecord(request_id, prompt_tokens, max_tokens, predicted, arrival_time,
                               prediction=predicted or max_tokens)
        self.open[request_id] = record
        return record

    def admitted(self, request_id: str, hit_tokens: int) -> None:
        """First admission, with `hit_tokens` found in the prefix cache."""
        record = self.open.get(request_id)
        if record is not None and record.prefix_hit_tokens is None:
            record.prefix_hit_tokens = hit_tokens

    def computing(self, request_id: str, start: int, num_tokens: int) -> None:
        """A catching-up request computes positions [start, start + num_tokens) this step."""
        record = self.catching_up[request_id]
        if record.preempted_since is not None:  # re-admitted
            record.preempted_s += time.monotonic() - record.preempted_since
            record.preempted_since = None
        if start < record.dropped_tokens:  # (arrays only for a step that recomputes)
            redo, tokens, flops = self.model.recomputation(
                np.array([start]), np.array([start + num_tokens]),
                np.array([record.dropped_tokens]))
            if redo[0]:
                record.recompute_tokens += int(tokens[0])
                record.wasted_flops += float(flops[0])
        if start + num_tokens >= record.dropped_tokens:
            del self.catching_up[request_id]

    def preempted(self, request_id: str, computed_tokens: int) -> None:
        """Dropped with `computed_tokens` of KV; logs the selector's choice for it."""
        record = self.open[request_id]
        record.num_preemptions += 1
        record.dropped_tokens = max(record.dropped_tokens, computed_tokens)
        if record.preempted_since is None:
            record.preempted_since = time.monotonic()
        self.catching_up[request_id] = record
        swap_ms, recompute_ms, swap = (float(x) for x in self.costs.price(computed_tokens))
        record.preemptions.append({
            "time": time.time(), "computed_tokens": computed_tokens,
            "kv_bytes": cdiv(computed_tokens, self.block_size) * self.block_bytes,
            "swap_ms": swap_ms, "recompute_ms": recompute_ms,
            "selector": "swap" if swap else "recompute",
            "saved_ms": recompute_ms - swap_ms if swap else 0.0})

    def connector_event(self, request_id: str, event: str, **fields) -> None:
        """What the swap connector did for the request's last preemption (module docstring):
        `decided`, `copied_out`, `resumed`, `copied_in`."""
        record = self.open.get(request_id)
        if record is None or not record.preemptions:
            return
        entry = record.preemptions[-1]
        if event == "decided":
            entry.update(decision=fields["decision"], reason=fields["reason"],
                         host_blocks=fields["host_blocks"],
                         predicted={k: fields[k] for k in PREDICTED})
        elif event == "resumed":
            entry.update(loaded_tokens=fields["loaded_tokens"], fallback=fields["fallback"])
        elif event in ("copied_out", "copied_in"):
            copy = {"bytes": fields["bytes"], "ms": fields["ms"], "ok": fields["ok"]}
            if event == "copied_in":
                copy["predicted_ms"] = float(self.costs.swap_in_ms(
                    np.array([entry.get("loaded_tokens", 0)]))[0])
            entry["swap_out" if event == "copied_out" else "swap_in"] = copy

    def resume_decided(self, decision: dict) -> None:
        """The write-through connector's choice for a resumed victim (module docstring)."""
        record = self.open.get(decision["request_id"])
        if record is None or not record.preemptions:
            return
        resume = {k: v for k, v in decision.items() if k != "request_id"}
        record.preemptions[-1].update(resume=resume, decision=resume["decision"],
                                      loaded_tokens=resume["loaded_tokens"])

    def transferred(self, transfer: dict) -> None:
        """A host transfer the write-through connector's worker measured."""
        tokens = transfer["bytes"] / (self.block_bytes / self.block_size)
        direction = transfer["direction"]
        price = self.costs.swap_out_ms if direction == "store" else self.costs.swap_in_ms
        predicted = float(price(np.array([tokens]))[0])
        self.host[direction] += (transfer["bytes"], transfer["transfer_ms"], predicted)
        record = self.open.get(transfer["request_id"])
        if direction == "load" and record is not None and record.preemptions:
            record.preemptions[-1]["swap_in"] = {
                "bytes": transfer["bytes"], "ms": transfer["transfer_ms"], "ok": True,
                "predicted_ms": predicted}

    def finished(self, request_id: str, output_tokens: int, computed_tokens: int,
                 finish_reason: str) -> dict | None:
        """Close a record (finished or aborted): its JSON line is written and returned."""
        record = self.open.pop(request_id, None)
        if record is None:
            return None
        self.catching_up.pop(request_id, None)
        if record.preempted_since is not None:
            record.preempted_s += time.monotonic() - record.preempted_since
        hits = record.prefix_hit_tokens
        # Positions computed once (from the first admission's hits to the furthest reached),
        # plus the recomputed ones, plus one LM head per output token.
        reached = max(computed_tokens, record.dropped_tokens)
        flops = (float(self.model.chunk_flops(hits, reached)) + record.wasted_flops
                 + self.model.lm_head_flops * output_tokens) if hits is not None else 0.0
        line = {
            "request_id": request_id, "prompt_tokens": record.prompt_tokens,
            "max_tokens": record.max_tokens, "output_tokens": output_tokens,
            "predicted_output_tokens": record.predicted_output_tokens,
            "finish_reason": finish_reason, "arrival_time": record.arrival_time,
            "finish_time": time.time(), "num_preemptions": record.num_preemptions,
            "preemption_frequency": (record.num_preemptions / output_tokens
                                     if output_tokens else None),
            "recompute_tokens": record.recompute_tokens, "wasted_flops": record.wasted_flops,
            "flops": flops, "preempted_s": record.preempted_s,
            "prefix_hit_tokens": hits or 0, "preemptions": record.preemptions,
        }
        for name, value in _columns(line).items():
            self.columns[name].append(value)
        if self.file is not None:
            self.file.write(json.dumps(line) + "\n")
        return line

    def summary(self) -> dict:
        columns = {k: np.frombuffer(v) if len(v) else np.zeros(0) for k, v in self.columns.items()}
        host = {f"host_{d}_{k}": float(v) for d, values in self.host.items()
                for k, v in zip(("bytes", "ms", "predicted_ms"), values)}
        return {**self.about, **summarize(columns), **host, "unfinished": len(self.open)}

    def close(self) -> dict:
        """Write the summary beside the records (if any) and return it."""
        summary = self.summary()
        if self.file is not None:
            self.file.close()
            self.file = None
            write_atomic(summary_path(self.path), json.dumps(summary, indent=2) + "\n")
        return summary


def _columns(line: dict) -> dict[str, float]:
    """A record line's contribution to the summary columns."""
    preemptions = line["preemptions"]
    return {"output_tokens": line["output_tokens"], "num_preemptions": line["num_preemptions"],
            "recompute_tokens": line["recompute_tokens"], "wasted_flops": line["wasted_flops"],
            "flops": line["flops"], "preempted_s": line["preempted_s"],
            "swap_choices": sum(p["selector"] == "swap" for p in preemptions),
            "swap_ms": sum(p["swap_ms"] for p in preemptions),
            "recompute_ms": sum(p["recompute_ms"] for p in preemptions),
            "saved_ms": sum(p["saved_ms"] for p in preemptions),
            "swapped": sum(p.get("decision") in ("swap", "load") for p in preemptions),
            "fallbacks": sum(p.get("fallback") is not None for p in preemptions),
            "loaded_tokens": sum(p.get("loaded_tokens", 0) for p in preemptions),
            **{f"bytes_{d}": sum(p[f"swap_{d}"]["bytes"] for p in preemptions
                                 if f"swap_{d}" in p) for d in ("out", "in")},
            **{f"swap_{d}_ms": sum(p[f"swap_{d}"]["ms"] for p in preemptions
                                   if f"swap_{d}" in p) for d in ("out", "in")},
            "swap_out_predicted_ms": sum(p["predicted"]["swap_out_ms"] for p in preemptions
                                         if "swap_out" in p),
            "swap_in_predicted_ms": sum(p["swap_in"]["predicted_ms"] for p in preemptions
                                        if "swap_in" in p)}


def summarize(columns: dict[str, np.ndarray]) -> dict:
    """The aggregate of finished requests' columns (`COLUMNS`)."""
    flops = float(columns["flops"].sum())
    preempted = columns["num_preemptions"] > 0
    return {
        "requests": int(columns["output_tokens"].size),
        "output_tokens": int(columns["output_tokens"].sum()),
        "preemptions": int(columns["num_preemptions"].sum()),
        "preempted_requests": int(np.count_nonzero(preempted)),
        "recompute_tokens": int(columns["recompute_tokens"].sum()),
        "wasted_flops": float(columns["wasted_flops"].sum()),
        "total_flops": flops,
        "recompute_fraction": float(columns["wasted_flops"].sum()) / flops if flops else 0.0,
        "preempted_s": float(columns["preempted_s"].sum()),
        "preempted_s_max": float(columns["preempted_s"].max()) if preempted.any() else 0.0,
        "selector_swap_preemptions": int(columns["swap_choices"].sum()),
        "selector_swap_ms": float(columns["swap_ms"].sum()),
        "selector_recompute_ms": float(columns["recompute_ms"].sum()),
        "selector_saved_ms": float(columns["saved_ms"].sum()),
        # What the swap connector did (zeros without it), copy times as measured
        "swapped_preemptions": int(columns["swapped"].sum()),
        "swap_fallbacks": int(columns["fallbacks"].sum()),
        "loaded_tokens": int(columns["loaded_tokens"].sum()),
        **{name: float(columns[name].sum()) for name in (
            "bytes_out", "bytes_in", "swap_out_ms", "swap_in_ms", "swap_out_predicted_ms",
            "swap_in_predicted_ms")},
    }


def summary_path(records: Path) -> Path:
    """`records.jsonl` -> `records.summary.json`."""
    return records.with_name(f"{records.stem}.summary.json")


def read_records(path: str | Path) -> list[dict]:
    """The JSON lines of a records file."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def summarize_records(path: str | Path) -> dict:
    """The summary of a records file's lines (what the engine writes when it shuts down,
    less its `about` fields and the unfinished count)."""
    lines = [_columns(line) for line in read_records(path)]
    return summarize({k: np.array([c[k] for c in lines], dtype=np.float64) for k in COLUMNS})
