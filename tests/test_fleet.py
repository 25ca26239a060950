"""`kvbench fleet calibrate` on a real Ray cluster on this machine (127.0.0.1): a head node
without CPUs and two one-CPU worker nodes, so both are one device type. The calibration's node
is removed once it starts measuring; the fleet must report it, measure on the other node and
write a profile of the same schema as `kvbench calibrate`'s. The model is `tiny` in float32 with
small sizes (`PLAN`: seconds on any CPU, AVX2-only included; its interleaved rounds last long
enough that the node is lost mid-run).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from kvbench.calibration.pipeline import samples_path
from kvbench.calibration.plans import CalibrationPlan, TokenSweep
from kvbench.cli import app
from kvbench.cluster import import_ray
from kvbench.fleet import FleetEvent, calibrate_fleet, results_table, without_commit
from kvbench.hardware import fingerprint
from kvbench.models import get_model
from kvbench.profile import load

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="needs Ray: pip install 'kvbench[ray]'")
REFERENCE_PROFILES = Path(__file__).resolve().parents[1] / "results" / "profiles"
PLAN = CalibrationPlan(swap_tokens=TokenSweep(16, 2048, 6),
                       prefill_tokens=TokenSweep(16, 512, 6), decode_batch_sizes=(1, 4, 8),
                       decode_contexts=(32, 128), per_block_max_tokens=None,
                       swap_interleave_s=2.0, prefill_interleave_s=2.0)


@pytest.fixture(scope="module")
def cluster():
    ray = import_ray(loopback=True)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def key_paths(data, prefix: str = "") -> set[str]:
    """Every key of nested objects, as dotted paths (lists are leaves; `extra.stopped` names
    the sweeps that ended early, so its keys vary from run to run)."""
    paths = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if isinstance(value, dict) and path != "extra.stopped":
            paths |= key_paths(value, path + ".")
    return paths


def test_fleet_calibration_survives_a_lost_node_and_skips_current_profiles(cluster, tmp_path):
    ray_cluster, workers = cluster
    events: list[FleetEvent] = []
    removed = []

    def on_event(event: FleetEvent) -> None:
        events.append(event)
        if event.phase == "swap" and not removed:  # the first node began measuring: lose it
            node = next(w for w in workers if event.node.endswith(w.node_id[:6]))
            ray_cluster.remove_node(node, allow_graceful=False)
            removed.append(event.node)

    [result] = calibrate_fleet([get_model("tiny")], "cpu", quick=True, plan=PLAN,
                               out_dir=tmp_path, on_event=on_event)

    assert result.status == "calibrated", result.errors
    assert removed and result.node != removed[0]
    assert len(result.errors) == 1 and result.errors[0].startswith(removed[0])
    assert [e.phase for e in events if e.node == removed[0]][-1] == "failed"
    assert {"start", "swap", "prefill", "decode", "done"} <= {
        e.phase for e in events if e.node == result.node}
    # What `kvbench calibrate` writes, with this machine's fingerprint inside.
    profile = load(result.path)
    assert result.path.name == f"{result.device_slug}-tiny.json"
    assert without_commit(profile.environment) == without_commit(fingerprint("cpu"))
    assert profile.source == "measured" and profile.config["quick"] is True
    for written in (samples_path(result.path, profile), result.path.with_suffix(".png")):
        assert written.stat().st_size > 0
    references = sorted(p for p in REFERENCE_PROFILES.glob("cpu-*.json")
                        if not p.name.endswith(".samples.json"))
    assert references, f"no CPU profile from `kvbench calibrate` in {REFERENCE_PROFILES}"
    reference = json.loads(references[0].read_text())

    def schema_paths(profile: dict) -> set:  # `extra` is free-form: what a release adds there;
        # `environment` is this machine's `fingerprint` (checked above), newer than the reference's
        return {p for p in key_paths(profile) if not p.startswith(("extra.", "environment."))}

    assert schema_paths(json.loads(result.path.read_text())) == schema_paths(reference)

    console = Console(record=True, width=250)
    console.print(results_table([result], "fleet"))
    row = rf"{result.device_slug} +│ tiny +│ calibrated +│ {result.node}"
    assert re.search(row, console.export_text())

    # A second run finds the profile current and measures nothing.
    written = result.path.stat().st_mtime_ns
    run = CliRunner().invoke(app, ["fleet", "calibrate", "--address", ray_cluster.address,
                                   "--device", "cpu", "--model", "tiny", "--quick", "--out-dir",
                                   str(tmp_path),
                                   "--json"])
    assert run.exit_code == 0, run.output
    # Ray's driver prints the lost node's death notice on stdout once its heartbeats time out,
    # which may be during this run: kvbench's JSON is the last line.
    [again] = json.loads(run.stdout.splitlines()[-1])
    assert again["status"] == "current" and again["path"] == str(result.path)
    assert result.path.stat().st_mtime_ns == written
