"""Issue 20, calibration stability judged by what a user relies on: held-out errors, the
selector's decisions and the costs over the machine's speed, from the saved runs alone."""

import json
from pathlib import Path

from kvbench.calibration.stability import NUM_LENGTHS, judge, run_row
from kvbench.hardware import get_hardware
from kvbench.models import get_model
from kvbench.profile import analytic_profile
from kvbench.report import stability_markdown
from kvbench.selector import select_preemption_strategy

SWAP_OUT = {"fixed_ms": 0.4, "ms_per_token": 0.04, "ms_per_block": 0.0}  # round trip 1 + 0.1·n
SWAP_IN = {"fixed_ms": 0.6, "ms_per_token": 0.06, "ms_per_block": 0.0}
RECOMPUTE = {"fixed_ms": 0.0, "ms_per_token": 0.05, "ms_per_token_sq": 5e-5}  # equal at ~1020
DATA = {"command": "kvbench calibrate --device cpu --quick",
        "machine": {"cpu_model": "a CPU", "cpu_count": 2}}


def run(scale=1.0, reference_ms=4.0, heldout=0.02, **recompute):
    """A run's row from a profile costing `scale` x SWAP_OUT, SWAP_IN and RECOMPUTE (`recompute`
    overriding its coefficients), fitted on 16-16384 tokens (swap) and 32-2048 (recompute)."""
    prof = json.loads(analytic_profile(get_model("tiny"), get_hardware("l4")).to_json())
    for phase, coefficients, (low, high) in (("swap_out", SWAP_OUT, (16, 16384)),
                                             ("swap_in", SWAP_IN, (16, 16384)),
                                             ("recompute", {**RECOMPUTE, **recompute}, (32, 2048))):
        prof[phase].update({k: scale * v for k, v in coefficients.items()})
        prof[phase]["fit"].update(heldout_mape=heldout, min_tokens=low, max_tokens=high)
    prof["extra"] = {"machine": {when: {"reference_ms": reference_ms}
                                 for when in ("before", "after")}}
    return {"wall_s": 30.0, "load_before": 0.5, "exit": 0, **run_row(prof)}


def test_heldout_error_at_most_10_percent_in_every_run():
    assert judge([run(), run(heldout=0.1)]).heldout_ok
    missed = [run(), run(heldout=0.11)]
    assert not judge(missed).heldout_ok
    assert ("- (a) held-out error at most 10% in every run: **not met** (worst: swap out 11.0%, "
            "swap in 11.0%, recompute 11.0%)") in stability_markdown({**DATA, "runs": missed})


def test_a_recompute_coefficient_that_moves_the_crossover_flips_decisions():
    steady = judge([run(), run(), run()])
    lengths = steady.lengths
    assert (len(lengths), lengths[0], lengths[-1]) == (NUM_LENGTHS, 32, 2048)  # common range
    assert steady.decisions_ok and steady.differ_at == []
    choices = select_preemption_strategy(lengths.tolist(), run()["costs"])["strategies"]
    assert {"swap", "recompute"} == set(choices)  # the crossover lies inside the range

    # recompute's n² term 25% higher: swap and recompute now cost the same at ~820 tokens
    runs = [run(), run(ms_per_token_sq=6.25e-5), run()]
    flipped = judge(runs)
    differ_at = flipped.differ_at
    assert not flipped.decisions_ok
    assert differ_at and all(819 < n < 1021 for n in differ_at)
    verdict = stability_markdown({**DATA, "runs": runs})[-2]
    assert verdict.endswith(f"from 32 to 2048 tokens (inside every run's measured range): **not "
                            f"met** ({NUM_LENGTHS - len(differ_at)} of 64 agree; they differ at "
                            f"{', '.join(map(str, differ_at))} tokens)")


def test_costs_are_compared_over_the_machine_speed_of_their_run():
    # 30% slower costs on a machine whose reference workload is 30% slower: the same fit
    slower = judge([run(), run(scale=1.3, reference_ms=5.2), run()])
    assert slower.costs_ok and slower.decisions_ok
    assert max(slower.spread_per_speed.values()) < 1e-9
    assert abs(slower.spread_raw["swap"] - 0.3) < 1e-9  # (1.3 - 1) / median 1
    text = stability_markdown({**DATA, "runs": [run(), run(scale=1.3, reference_ms=5.2), run()]})
    assert text[-1].endswith("(mean of before and after): met (worst spread over lengths: swap "
                             "0.0%, recompute 0.0%; undivided: swap 30.0%, recompute 30.0%)")

    # 30% slower costs on a machine of the same speed
    unexplained = judge([run(), run(scale=1.3), run()])
    assert not unexplained.costs_ok and unexplained.spread_per_speed["swap"] > 0.1
    # 30% slower costs and machine, but a recompute curve of another shape
    shape = judge([run(), run(scale=1.3, reference_ms=5.2, ms_per_token_sq=8e-5), run()])
    assert not shape.costs_ok
    assert shape.spread_per_speed["swap"] < 1e-9 < 0.1 < shape.spread_per_speed["recompute"]


def test_runs_saved_before_issue_20_render_with_a_note():
    old = [{k: v for k, v in run(heldout=h).items() if k not in ("costs", "fit_tokens")}
           for h in (0.01, 0.02)]
    text = stability_markdown({**DATA, "runs": old})
    assert text[0].startswith("2 runs of `kvbench calibrate --device cpu --quick` on a CPU")
    assert "| `swap_out.fixed_ms` | 0.4 | 0.4 | 0.4 | 0.0% |" in text
    assert text[-2] == ("- (a) held-out error at most 10% in every run: met (worst: swap out "
                        "2.0%, swap in 2.0%, recompute 2.0%)")
    assert text[-1].startswith("- (b) decisions and (c) costs per machine speed: not judged")
    new = stability_markdown({**DATA, "runs": [run(heldout=0.01), run(heldout=0.02)]})
    assert new[:-2] == text[:-1] and not any("`costs`" in line for line in new)
    assert [line[:6] for line in new[-3:]] == ["- (a) ", "- (b) ", "- (c) "]


def test_runs_of_version_1_profiles_are_judged_on_their_round_trip():
    """The committed runs predate swap-out and swap-in fitted apart: one `swap` phase, a
    round-trip `costs` dict; both are read as they are."""
    saved = Path(__file__).resolve().parents[2] / "results" / "stability"
    [path] = saved.glob("*-stability.json")
    runs = json.loads(path.read_text())["runs"]
    assert "swap_heldout" in runs[0] and "swap_fixed_ms" in runs[0]["costs"]
    judged = judge(runs)
    assert list(judged.heldout_worst) == ["swap", "recompute"]
    assert judged.lengths is not None and set(judged.spread_raw) == {"swap", "recompute"}
    text = stability_markdown(json.loads(path.read_text()))
    assert text[-3].startswith("- (a) held-out error at most 10% in every run: met (worst: swap ")
