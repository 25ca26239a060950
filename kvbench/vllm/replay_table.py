"""`kvbench replay`'s report from its document (replay.json), without importing vLLM: the replay
writes it to replay.md, and `kvbench report` renders the committed one into README."""

from __future__ import annotations

from pathlib import Path

from kvbench.sim.metrics import METRICS
from kvbench.sim.study import summary_markdown, table_cells


def replay_title(document: dict) -> str:
    s, workload = document["settings"], document["workload"]
    return (f"{workload['name']} ({workload['num_requests']} requests) · "
            f"{Path(s['model']).name} · {s['num_gpu_blocks']} blocks of {s['block_size']} · "
            f"{s['max_num_seqs']} seqs / {s['max_num_batched_tokens']} tokens")


def replay_markdown(document: dict) -> list[str]:
    """The replayed and the simulated tables, the engine's step times, and the two side by side
    with the first step where their schedules part."""
    labels = [f"{METRICS[key].label} replay | sim" for key in ("preemptions", "ttft_p50_s",
                                                                  "ttft_p99_s")]
    gap = ["| policy | " + " | ".join(labels) + " | first step where the schedules part |",
           "|" + "---|" * 8]
    gap += ["| " + " | ".join(table_cells(row.values())) + " |" for row in document["gap"]]
    steps = "; ".join(f"{row['policy']} {row['step_ms_median']:.3g} / {row['step_ms_mean']:.3g} "
                      f"({row['load_average'][0]:.1f}, {row['load_average'][1]:.1f})"
                      for row in document["replayed"])
    return [f"Replay: {replay_title(document)}", "", "```", document["command"], "```", "",
            "**Replayed in vLLM**", "", *summary_markdown(document["replayed"]).splitlines(),
            "", "Engine step, median / mean ms (this machine's 1-minute load average at the start "
            "and end of the run; a mean far above the median means some steps stalled): "
            f"{steps}.", "",
            f"**Simulated** (step time `{document['step_time']}`, fitted to every replayed step)",
            "", *summary_markdown(document["simulated"]).splitlines(), "",
            "**Replay vs simulator**", "", *gap]


MECHANISM_COLUMNS = {  # key: header
    "policy": "mechanism", "preemptions": "preempt", "host_decisions": "to host",
    "fallbacks": "fallbacks", "recompute_tokens": "recomputed tok",
    "loaded_tokens": "loaded tok", "moved_mb": "moved MB", "throughput_tokens_per_s": "tok/s",
    "ttft_p50_s": "TTFT p50 s", "ttft_p99_s": "TTFT p99 s"}
COPY_COLUMNS = {"policy": "mechanism", "copy_out_ms": "out ms", "copy_out_predicted_ms":
                "predicted", "copy_out_error_pct": "error %", "copy_in_ms": "in ms",
                "copy_in_predicted_ms": "predicted", "copy_in_error_pct": "error %"}


def _rows(columns: dict, rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        row = row | {"moved_mb": row["moved_bytes"] / 2**20}
        lines.append("| " + " | ".join(table_cells([row.get(k) for k in columns])) + " |")
    return lines


def mechanisms_markdown(document: dict) -> list[str]:
    """`kvbench replay --mechanisms`: the replayed rows, the simulated rows, and the copies the
    connectors measured against the profile's predictions."""
    loads = "; ".join(f"{row['policy']} {row['load_average'][0]:.1f} -> "
                      f"{row['load_average'][1]:.1f}" for row in document["replayed"])
    return [f"Mechanisms: {replay_title(document)} · host pool "
            f"{document['host_blocks']} blocks", "", "```", document["command"], "```", "",
            "**Replayed in vLLM**", "", *_rows(MECHANISM_COLUMNS, document["replayed"]), "",
            "This machine's 1-minute load average at the start and end of each run (above 2 on "
            f"2 cores, other processes held the cores and the times are not comparable): {loads}.",
            "",
            f"**Simulated** (step time `{document['step_time']}`, fitted to every replayed step)",
            "", *_rows(MECHANISM_COLUMNS, document["simulated"]), "",
            "**Copies: measured by the connectors, predicted by the costs** (all copies of the "
            "run, ms; out = swap-out or store, in = swap-in or load; error = (predicted - "
            "measured) / measured)", "", *_rows(COPY_COLUMNS, document["replayed"])]
