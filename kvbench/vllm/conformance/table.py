"""The conformance suite's judged outcomes (`run.run`'s JSON) as Markdown for `kvbench report`.
Imports no vLLM."""

from __future__ import annotations

from collections import defaultdict


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def conformance_markdown(data: dict) -> list[str]:
    """One row per variant, then each listed policy difference with the tests it covers."""
    tests, ignored = (", ".join(f"`{t}`" for t in data[k]) for k in ("tests", "ignored"))
    lines = [f"vLLM {data['vllm_version']}'s own tests ({tests}; ignored: {ignored}), "
             f"{data['wall_s'] / 60:.1f} min in all", "",
             _row(["variant", "kvbench options", "passed", "failed", "skipped", "errors",
                   "fail where vLLM passes", "problems"]), "|" + "---|" * 8]
    reasons: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, result in data["variants"].items():
        options = data["options"][name]
        label = ("plain vLLM" if options is None else
                 ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults")
        counts = result["counts"]
        lines.append(_row([f"`{name}`", label, counts["passed"], counts["failed"],
                           counts["skipped"], counts["error"],
                           len(result["fails_where_vllm_passes"]), len(result["problems"])]))
        for differ in result["fails_where_vllm_passes"]:
            reasons[differ["reason"] or "not listed"][name].append(differ["test"])
    if reasons:
        lines += ["", _row(["why a policy fails vLLM's test", "variant: tests"]), "|---|---|"]
        for why, by_variant in reasons.items():
            tests = "; ".join(f"`{name}`: {len(tests)}" for name, tests in by_variant.items())
            lines.append(_row([why, tests]))
    return lines + [""]
