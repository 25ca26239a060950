"""`kvbench select`, `models`, `profile show`, `--version`, the simulator commands' help and
error handling: through typer's CliRunner and through the console entry point."""

import importlib.metadata
import json
import sys

import pytest
from typer.testing import CliRunner

from kvbench import __version__, cli
from kvbench.cli import app
from kvbench.hardware import get_hardware
from kvbench.models import MODELS, get_model
from kvbench.profile import analytic_profile, parse, save
from kvbench.selector import select_preemption_strategy

runner = CliRunner()

# swap_ms(n) = 1 + 0.01·n + 0.25·ceil(n/16): out 0.4 + 0.004·n + 0.05·ceil(n/16), in the rest;
# recompute_ms(n) = 0.5 + 0.002·n + 1e-5·n²
HAND_SWAP_OUT = {"fixed_ms": 0.4, "ms_per_token": 0.004, "ms_per_block": 0.05}
HAND_SWAP_IN = {"fixed_ms": 0.6, "ms_per_token": 0.006, "ms_per_block": 0.2}
HAND_RECOMPUTE = {"fixed_ms": 0.5, "ms_per_token": 0.002, "ms_per_token_sq": 1e-5}


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def hand_profile(tmp_path):
    """A measured llama-3-8b profile with hand-picked coefficients and fit figures."""
    data = json.loads(analytic_profile(get_model("llama-3-8b"),
                                       get_hardware("h100-sxm")).to_json())
    fit = {"r2": 0.9991, "heldout_mape": 0.031, "min_tokens": 16, "max_tokens": 32768,
           "method": "nnls"}
    # Crossover by hand: n = 2389 costs 62.39 vs 62.35121 (recompute), 2390: 62.4 vs 62.401 (swap).
    data.update(source="measured", crossover_tokens=2390,
                environment={"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
                             "commit": "abc1234", "torch": "2.5.1", "triton": "3.1.0"})
    data["swap"].update(block_size=16, impl="triton")
    data["swap_out"].update(HAND_SWAP_OUT, fit=fit)
    data["swap_in"].update(HAND_SWAP_IN, fit=fit)
    data["recompute"].update(HAND_RECOMPUTE, fit={**fit, "r2": 0.9987, "heldout_mape": None})
    data["decode"] = {"d0_ms": 5.1, "d1_ms_per_seq": 0.02, "d2_ms_per_seq_token": 4e-5,
                      "r2": None, "heldout_mape": None}
    path = tmp_path / "h100-llama-3-8b.json"
    save(parse(data), path)
    return path


def assert_user_error(result, fragment: str) -> None:
    """Exit code 2, nothing on stdout, one `error:` line naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]
    assert "Traceback" not in result.output


# --- --version and models ----------------------------------------------------------------------

def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"kvbench {__version__}\n"
    assert __version__ == importlib.metadata.version("kvbench")


def test_models_lists_every_preset_with_kv_bytes():
    result = invoke("models")
    assert result.exit_code == 0
    rows = {line.split()[1]: line for line in result.stdout.splitlines()
            if line.startswith("│")}
    assert set(rows) == set(MODELS)
    # KV bytes per token and billions of parameters (embeddings included), worked by hand.
    for name, kv_bytes, params_b in [("llama-3-8b", "131,072", "8.03"),
                                     ("llama-2-7b", "524,288", "6.74"),
                                     ("qwen2.5-0.5b", "12,288", "0.63"),
                                     ("tiny", "512", "0.00")]:
        cells = [c.strip() for c in rows[name].strip("│").split("│")]
        assert cells[7] == kv_bytes and cells[8] == params_b, cells


# --- select ------------------------------------------------------------------------------------

def test_select_json_is_exactly_the_library_result(hand_profile):
    tokens = ["5000", "0", "10", "1000", "17"]
    result = invoke("select", *tokens, "--profile", str(hand_profile), "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == select_preemption_strategy([int(t) for t in tokens], hand_profile)
    assert printed == {
        "strategies": ["swap", "swap", "recompute", "recompute", "recompute"],
        "swap_costs_ms": [129.25, 0.0, 1.35, 26.75, 1.67],
        "recompute_costs_ms": [260.5, 0.0, 0.521, 12.5, 0.5369],
        "total_cost_ms": 142.8079,  # 129.25 + 0.521 + 12.5 + 0.53689
    }


def test_select_prints_a_table_and_the_total(hand_profile):
    result = invoke("select", "10", "5000", "0", "--profile", str(hand_profile))
    assert result.exit_code == 0, result.output
    rows = [[c.strip() for c in line.strip("│").split("│")]
            for line in result.stdout.splitlines() if line.startswith("│")]
    assert rows == [["10", "1.3500", "0.5210", "recompute"],
                    ["5000", "129.2500", "260.5000", "swap"],
                    ["0", "0.0000", "0.0000", "swap"]]
    assert "total_cost_ms: 129.7710" in result.stdout
    assert "crossover_tokens: 2390" in result.stdout
    assert "llama-3-8b · NVIDIA H100 80GB HBM3 (measured)" in result.stdout


def test_select_analytic_model_matches_library():
    result = invoke("select", "1", "100", "4096", "0", "--model", "llama-3-8b", "--json")
    assert result.exit_code == 0, result.output
    expected = select_preemption_strategy([1, 100, 4096, 0], {"model": "llama-3-8b"})
    assert json.loads(result.stdout) == expected
    # 100 tokens at 131072 B each way over 55 GB/s plus 2 × 0.01 ms latency: 0.4966 ms.
    assert expected["swap_costs_ms"][1] == 0.4966


def test_select_json_stays_parseable_when_warning(hand_profile):
    # 40000 tokens is beyond the profile's fitted range (32768): the warning goes to stderr.
    result = invoke("select", "40000", "--profile", str(hand_profile), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "strategies": ["swap"], "swap_costs_ms": [1026.0],  # 1 + 400 + 0.25 · 2500
        "recompute_costs_ms": [16080.5], "total_cost_ms": 1026.0}  # 0.5 + 80 + 16000
    assert "40000" in result.stderr


def test_select_hardware_flags_reach_the_cost_model():
    flags = ["--hardware", "a100-80gb", "--h2d-gbps", "20", "--d2h-gbps", "30",
             "--transfer-latency-ms", "0.02", "--peak-tflops", "200", "--achieved-fraction",
             "0.4", "--block-size", "32", "--dtype", "fp16", "--tp", "2"]
    result = invoke("select", "1", "33", "2048", "--model", "mistral-7b", *flags, "--json")
    assert result.exit_code == 0, result.output
    expected = select_preemption_strategy([1, 33, 2048], {
        "model": "mistral-7b", "hardware": "a100-80gb", "h2d_gbps": 20.0, "d2h_gbps": 30.0,
        "transfer_latency_ms": 0.02, "peak_tflops": 200.0, "achieved_fraction": 0.4,
        "block_size": 32, "dtype": "fp16", "tp": 2})
    assert json.loads(result.stdout) == expected
    # 33 tokens · 65536 B/GPU · (1/20 + 1/30) GB/s⁻¹ + 2 · 0.02 ms
    assert expected["swap_costs_ms"][1] == round(33 * 65536 * (1 / 20 + 1 / 30) / 1e6 + 0.04, 4)
    default = json.loads(invoke("select", "1", "33", "2048", "--model", "mistral-7b",
                                "--json").stdout)
    assert default != expected


@pytest.mark.parametrize(("args", "fragment"), [
    (["select", "1", "x", "--model", "tiny"], "request 1: token count 'x'"),
    (["select", "--model", "tiny", "1.5"], "request 0"),
    (["select", "--model", "tiny", "--", "5", "-3"], "request 1: token count must be non-neg"),
    (["select", "--model", "tiny", "99999999999999999999"], "request 0"),
    (["select", "1"], "give --profile PATH or --model NAME"),
    (["select", "1", "--model", "llama-9"], "unknown model 'llama-9'"),
    (["select", "1", "--model", "tiny", "--hardware", "tpu"], "unknown hardware 'tpu'"),
    (["select", "1", "--model", "tiny", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["select", "1", "--model", "tiny", "--tp", "0"], "tp must be an integer from 1 to"),
    (["select", "1", "--model", "tiny", "--block-size", "0"], "block_size must be a positive"),
    (["select", "1", "--model", "tiny", "--achieved-fraction", "1.5"], "achieved_fraction"),
    (["select", "1", "--model", "tiny", "--peak-tflops", "-1"], "peak_tflops"),
    (["select", "1", "--model", "tiny", "--h2d-gbps", "nan"], "h2d_gbps"),
    (["select", "1", "--profile", "absent.json"], "cannot read profile absent.json"),
])
def test_select_user_mistakes_print_one_line_and_exit_2(args, fragment):
    assert_user_error(invoke(*args), fragment)


def test_select_a_negative_count_is_a_count_not_a_flag():
    """`select -5` reads -5 as request 0's token count, not as an unknown option."""
    assert_user_error(invoke("select", "-5", "--model", "llama-3-8b"),
                      "request 0: token count must be non-negative")


@pytest.mark.parametrize("command", ["compare-policies", "simulate"])
def test_sim_help_shows_the_synthetic_example_whole_and_no_bool_metavar(command):
    """The --synthetic help names a whole mix (wrapped at 80 columns wherever click breaks it),
    and a switch shows as --x/--no-x, never as an option taking `<bool>`."""
    result = runner.invoke(app, [command, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert ("requests=500,rate=8,arrivals=gamma,cv=2,long-prompt=0.3,long-output=0.2"
            in "".join(result.stdout.split()))
    assert "<bool>" not in result.stdout
    assert "--enable-prefix-caching / --no-enable-prefix-caching" in result.stdout


def test_select_rejects_a_profile_of_another_schema(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"schema": "other.thing", "schema_version": 1}))
    assert_user_error(invoke("select", "1", "--profile", str(path)), "not a kvbench profile")


def test_select_parse_errors_exit_2_without_traceback():
    for args in (["select", "--model", "tiny"], ["select", "1", "--model", "tiny", "--tp", "x"]):
        result = invoke(*args)
        assert result.exit_code == 2
        assert "Traceback" not in result.output
        assert result.stdout == ""


# --- profile show ------------------------------------------------------------------------------

def test_profile_show(hand_profile):
    result = invoke("profile", "show", str(hand_profile))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"profile: {hand_profile}"
    assert lines[1].startswith("source: measured, created ")
    expected = [
        "device: NVIDIA H100 80GB HBM3 (commit abc1234, torch 2.5.1, triton 3.1.0)",
        "model: llama-3-8b, bfloat16, tp=1, 131,072 KV bytes/token",
        "swap_ms(n) = swap_out_ms(n) + swap_in_ms(n)  [impl triton]",
        "swap_out_ms(n) = 0.4 + 0.004·n + 0.05·ceil(n/16)",
        "swap_in_ms(n) = 0.6 + 0.006·n + 0.2·ceil(n/16)",
        "recompute_ms(n) = 0.5 + 0.002·n + 1e-05·n²",
        "decode_step_ms(B, T) = 5.1 + 0.02·B + 4e-05·B·T",
        "swap_out fit: R² 0.9991, held-out error 3.1%, valid 16-32768 tokens (nnls)",
        "swap_in fit: R² 0.9991, held-out error 3.1%, valid 16-32768 tokens (nnls)",
        "recompute fit: R² 0.9987, held-out error n/a, valid 16-32768 tokens (nnls)",
        "crossover_tokens: 2390",
    ]
    assert lines[2:] == expected


def test_profile_show_without_crossover(tmp_path):
    # Recompute always cheaper: a slow link and a fast GPU for a tiny model.
    hw = get_hardware("l4", h2d_gbps=0.001, d2h_gbps=0.001)
    prof = analytic_profile(get_model("tiny"), hw, max_tokens=1024)
    assert prof.crossover_tokens is None
    path = save(prof, tmp_path / "p.json")
    result = invoke("profile", "show", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "crossover_tokens: none (recompute always cheaper)"


def test_profile_show_user_mistakes(tmp_path, hand_profile):
    assert_user_error(invoke("profile", "show", str(tmp_path / "absent.json")),
                      "cannot read profile")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert_user_error(invoke("profile", "show", str(broken)), "not valid JSON")
    newer = tmp_path / "newer.json"
    newer.write_text(hand_profile.read_text().replace('"schema_version": 2',
                                                      '"schema_version": 3'))
    assert_user_error(invoke("profile", "show", str(newer)), "schema_version 3 is newer")
    negative = tmp_path / "negative.json"
    negative.write_text(hand_profile.read_text().replace('"fixed_ms": 0.6', '"fixed_ms": -1.0'))
    assert_user_error(invoke("profile", "show", str(negative)), "swap_in.fixed_ms")


def test_select_rejects_hardware_flags_with_a_profile(tmp_path):
    path = save(analytic_profile(get_model("tiny"), get_hardware("h100-sxm")), tmp_path / "p.json")
    res = runner.invoke(app, ["select", "5", "--profile", str(path), "--peak-tflops", "3"])
    assert res.exit_code == 2 and "--peak-tflops sets analytic costs" in res.stderr


# --- errors: a user mistake is one line, a bug keeps its traceback -----------------------------

def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The console entry point (`kvbench ...` as installed): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["kvbench", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """Only the library's user errors (ValueError, OSError) become one line: a TypeError from a
    bug propagates with its traceback, through CliRunner and through the console entry."""
    def broken(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(cli, "select_preemption_strategy", broken)
    result = invoke("select", "1", "--model", "tiny")
    assert isinstance(result.exception, TypeError) and result.exit_code == 1
    assert "error:" not in result.output
    monkeypatch.setattr(sys, "argv", ["kvbench", "select", "1", "--model", "tiny"])
    with pytest.raises(TypeError, match="unsupported operand"):
        cli.main()


def test_console_entry_prints_usage_mistakes_in_one_line(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "select", "1", "--tp", "x")
    assert code == 2 and out == ""
    assert err.startswith("error: Invalid value for '--tp'") and err.count("\n") == 1
    assert err.endswith("(see `kvbench select --help`)\n")
    code, out, err = run_main(monkeypatch, capsys, "frobnicate")
    assert (code, out) == (2, "") and err == ("error: No such command 'frobnicate'. "
                                              "(see `kvbench --help`)\n")
    code, out, err = run_main(monkeypatch, capsys, "select", "1", "x", "--model", "tiny")
    assert (code, out) == (2, "")
    assert err == "error: request 1: token count 'x' is not a non-negative integer\n"


@pytest.mark.parametrize(("args", "usage"), [((), "Usage: kvbench [OPTIONS] COMMAND"),
                                             (("profile",), "Usage: kvbench profile [OPTIONS]")])
def test_console_entry_without_a_command_prints_the_help_once(monkeypatch, capsys, args, usage):
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and err == ""
    assert out.count("Usage:") == 1 and usage in out


def test_console_entry_results_and_exit_codes(monkeypatch, capsys):
    assert run_main(monkeypatch, capsys, "--version") == (0, f"kvbench {__version__}\n", "")
    code, out, err = run_main(monkeypatch, capsys, "select", "100", "--model", "tiny", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == select_preemption_strategy([100], {"model": "tiny"})


def test_console_entry_end_of_input_is_one_line(monkeypatch, capsys):
    def end_of_input(*args, **kwargs):
        raise EOFError

    monkeypatch.setattr(cli, "resolve", end_of_input)
    code, out, err = run_main(monkeypatch, capsys, "select", "1", "--model", "tiny")
    assert (code, out) == (1, "")
    assert err.strip() == "error: aborted"  # after the newline typer ends the prompt line with


def test_a_path_that_cannot_be_written_is_one_line(tmp_path):
    not_a_folder = tmp_path / "results"
    not_a_folder.write_text("a file where the results folder should be")
    assert_user_error(invoke("report", "--results", str(not_a_folder)), str(not_a_folder))
