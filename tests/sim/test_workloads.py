"""Workloads: both trace schemas, one clear error per bad row, synthetic mixes, the shared trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kvbench
from kvbench.sim.workloads import (
    AZURE_CONV_TRACE,
    BUNDLED_TRACES,
    SyntheticSpec,
    WorkloadError,
    load_workload,
    parse_synthetic_spec,
    read_trace,
    resolve_trace,
    spec_trace,
    synthetic,
)

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,879,55
2023-11-16 18:15:51.3910170,91,16
"""
PLAIN = """arrival_s,prompt_tokens,output_tokens
0.5,17,3
0.0,1000,1
2.25,1,17
"""


def write(tmp_path, text, name="trace.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_azure_schema(tmp_path):
    work = read_trace(write(tmp_path, AZURE))
    np.testing.assert_allclose(work.arrival_s, [0.0, 4.314579, 4.541877, 4.710427], atol=1e-9)
    assert work.prompt_tokens.tolist() == [374, 396, 879, 91]
    assert work.output_tokens.tolist() == [44, 109, 55, 16]
    assert work.max_tokens.tolist() == [109] * 4  # the trace's longest output


def test_plain_schema_sorted_by_arrival_and_rate_scaled(tmp_path):
    work = read_trace(write(tmp_path, PLAIN), rate_scale=2.0)
    assert work.arrival_s.tolist() == [0.0, 0.25, 1.125]
    assert work.prompt_tokens.tolist() == [1000, 17, 1]
    assert work.output_tokens.tolist() == [1, 3, 17]
    assert "rate x2" in work.name


def test_plain_schema_max_tokens_and_overrides(tmp_path):
    path = write(tmp_path, "arrival_s,prompt_tokens,output_tokens,max_tokens\n0,5,3,10\n1,5,4,4\n")
    assert read_trace(path).max_tokens.tolist() == [10, 4]
    assert read_trace(path, max_tokens=6).max_tokens.tolist() == [6, 6]
    assert read_trace(path, num_requests=1).num_requests == 1


@pytest.mark.parametrize("text, message", [
    (AZURE.replace("879", "8x9"), "line 4, column ContextTokens: '8x9' is not an integer from 1"),
    (AZURE.replace(",55", ",0"), "line 4, column GeneratedTokens: '0' is not an integer from 1"),
    (AZURE.replace("18:15:50", "18:15:5O"), "line 3, column TIMESTAMP: '2023-11-16 18:15:5O"),
    (AZURE.replace(",16\n", "\n"), "line 5: expected 3 fields"),
    (AZURE.replace(",16\n", ",16,9\n"), "line 5: expected 3 fields"),
    (PLAIN.replace("2.25", "inf"), "line 4, column arrival_s: 'inf' is not a finite number"),
    (PLAIN.replace("17,3", "17.5,3"), "line 2, column prompt_tokens: '17.5'"),
    ("time,prompt,output\n1,2,3\n", "matches neither schema"),
    ("arrival_s,prompt_tokens,output_tokens\n", "no requests"),
    ("arrival_s,prompt_tokens,output_tokens,max_tokens\n0,5,3,2\n",
     "line 2, column max_tokens: 2 is below output_tokens (3)"),
])
def test_bad_rows_give_one_clear_error(tmp_path, text, message):
    with pytest.raises(WorkloadError) as info:
        read_trace(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(WorkloadError, match="cannot read trace"):
        read_trace(tmp_path / "absent.csv")
    with pytest.raises(WorkloadError, match="rate scale must be positive"):
        read_trace(write(tmp_path, PLAIN), rate_scale=0)
    with pytest.raises(WorkloadError, match="exactly one"):
        load_workload(None, None)


def test_synthetic_is_seeded_and_follows_the_mix():
    spec = SyntheticSpec(num_requests=4000, rate_per_s=50, long_prompt_fraction=0.25,
                         long_output_fraction=0.5)
    first, again, other = synthetic(spec, 1), synthetic(spec, 1), synthetic(spec, 2)
    np.testing.assert_array_equal(first.arrival_s, again.arrival_s)
    np.testing.assert_array_equal(first.output_tokens, again.output_tokens)
    assert not np.array_equal(first.prompt_tokens, other.prompt_tokens)
    long_prompt = first.prompt_tokens > 1.5 * spec.short_prompt_tokens
    assert long_prompt.mean() == pytest.approx(0.25, abs=0.03)
    assert (first.output_tokens > 1.5 * spec.short_output_tokens).mean() == pytest.approx(
        0.5, abs=0.03)
    assert first.num_requests / first.duration_s == pytest.approx(50, rel=0.05)
    assert (first.max_tokens >= first.output_tokens).all()


def test_gamma_arrivals_are_burstier():
    poisson = synthetic(SyntheticSpec(num_requests=5000, arrivals="poisson"), 0)
    gamma = synthetic(SyntheticSpec(num_requests=5000, arrivals="gamma", cv=3.0), 0)
    cv = [np.std(np.diff(w.arrival_s)) / np.mean(np.diff(w.arrival_s)) for w in (poisson, gamma)]
    assert cv[0] == pytest.approx(1.0, abs=0.1) and cv[1] == pytest.approx(3.0, rel=0.15)


def test_synthetic_spec_parsing():
    spec = parse_synthetic_spec("requests=50, rate=2.5,arrivals=gamma,cv=2,long-prompt=0.3")
    assert (spec.num_requests, spec.rate_per_s, spec.arrivals, spec.cv,
            spec.long_prompt_fraction) == (50, 2.5, "gamma", 2.0, 0.3)
    for text, message in (("rate=fast", "rate='fast' is not a valid float"),
                          ("speed=3", "'speed=3' is not KEY=VALUE"),
                          ("arrivals=uniform", "poisson or gamma"),
                          ("long-output=1.5", "long-output must be at most 1"),
                          ("long-output-tokens=4000", "max-tokens (2048) must be at least")):
        with pytest.raises(WorkloadError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_synthetic_spec(text)


def test_load_workload_scales_synthetic_rate():
    work = load_workload(synthetic_spec="requests=2000,rate=10", rate_scale=3.0, seed=0)
    assert work.num_requests / work.duration_s == pytest.approx(30, rel=0.08)


def test_shipped_azure_trace():
    assert AZURE_CONV_TRACE.is_relative_to(Path(kvbench.__file__).parent)  # package data
    work = read_trace(AZURE_CONV_TRACE)
    assert work.num_requests == 19366
    assert work.prompt_tokens.mean() == pytest.approx(1155, abs=1)
    assert work.output_tokens.mean() == pytest.approx(211, abs=1)
    assert work.duration_s == pytest.approx(3501.7, abs=1)
    assert (work.max_tokens == 1000).all()


def test_bundled_traces_by_name_and_a_file_of_that_name_wins(tmp_path, monkeypatch):
    assert resolve_trace("azure-conv-2023") == AZURE_CONV_TRACE
    assert read_trace("azure-conv-2023", num_requests=5).name == AZURE_CONV_TRACE.name
    monkeypatch.chdir(tmp_path)
    write(tmp_path, PLAIN, name="azure-conv-2023")
    assert resolve_trace("azure-conv-2023") == Path("azure-conv-2023")
    assert read_trace("azure-conv-2023").num_requests == 3
    # in a sweep spec: a path relative to its folder where one exists, else the name
    assert spec_trace("azure-conv-2023", tmp_path) == str(tmp_path / "azure-conv-2023")
    assert spec_trace("azure-conv-2023", tmp_path / "elsewhere") == "azure-conv-2023"
    assert spec_trace("t.csv", tmp_path / "elsewhere") == str(tmp_path / "elsewhere" / "t.csv")


def test_an_unknown_trace_name_lists_the_bundled_ones():
    with pytest.raises(WorkloadError) as info:
        load_workload("azure-conv-2024")
    assert str(info.value) == ("cannot read trace azure-conv-2024: no such file, nor a bundled "
                               f"trace's name ({', '.join(BUNDLED_TRACES)})")


def test_a_misspelled_column_is_an_error_and_an_unknown_one_a_warning(tmp_path):
    """Issue 21, item 7: `max_token` fell back to the longest output without a word."""
    misspelled = write(tmp_path, "arrival_s,prompt_tokens,output_tokens,max_token\n0,5,3,10\n")
    with pytest.raises(WorkloadError) as info:
        read_trace(misspelled, warn=pytest.fail)
    assert "column 'max_token' is not one kvbench reads: did you mean 'max_tokens'?" in str(
        info.value) and str(misspelled) in str(info.value)
    warnings = []
    extra = write(tmp_path, "".join(line + (",region\n" if i == 0 else ",eu\n") for i, line
                                    in enumerate(AZURE.splitlines())), name="azure.csv")
    assert read_trace(extra, warn=warnings.append).num_requests == 4
    assert warnings == [f"{extra}: column 'region' is ignored (columns read: TIMESTAMP, "
                        "ContextTokens, GeneratedTokens)"]


def test_an_ignored_column_is_one_warning_line_on_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from kvbench.cli import app

    trace = write(tmp_path, "arrival_s,prompt_tokens,output_tokens,user\n0,5,3,a\n1,9,2,b\n")
    result = CliRunner().invoke(app, ["simulate", "--trace", str(trace), "--json"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {trace}: column 'user' is ignored (columns read: "
                        "arrival_s, prompt_tokens, output_tokens, max_tokens)"]
    result = CliRunner().invoke(app, ["simulate", "--trace", "azure-conv-2023",
                                      "--num-requests", "20", "--json"])
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output
