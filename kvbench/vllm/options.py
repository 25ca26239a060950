"""Options of the kvbench scheduler inside vLLM: policies by name, their knobs, costs, records.

Given as environment variables (`KVBENCH_VICTIM=lcf`) or in vLLM's additional config
(`--additional-config '{"kvbench": {"victim": "lcf"}}'`); one key given both ways is an error.

* `admission`  fcfs (vLLM's own, the default), reserve-max or future-kv;
* `victim`     lifo (vLLM's own, the default), lcf or cost-aware;
* `preemption` recompute (vLLM's own: the default), swap or selector (the default with kvbench's
               swap connector, `kvbench.vllm.swap_connector`, which carries it out): what each
               victim of a preemption gets;
* `predictor`  history (the default: learns online from finished requests), oracle (a
               per-request hint, `SamplingParams.extra_args["kvbench_output_tokens"]`, else
               max_tokens), noisy or max;
* the policies' knobs, named and checked as `Knobs`' fields (`headroom_fraction`,
  `max_long_requests`, `protect_steps`, `history_quantile`, ...);
* `profile`    a kvbench profile whose costs price preemptions (the selector's swap-or-recompute
               choice, cost-aware victims); without one, analytic costs on `hardware`;
* `records`    where to write one JSON line per finished request (`kvbench.vllm.instrument`).

The policy names and knobs are validated by `PolicySpec` and `Knobs` themselves, so the plugin
accepts exactly what `kvbench simulate` accepts. vLLM v1 itself can only recompute: swap and
selector need kvbench's swap connector.
Imports no vLLM: `kvbench replay` checks options before it starts an engine.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from kvbench.errors import KvbenchError
from kvbench.hardware import get_hardware
from kvbench.sim.policies import KNOB_FIELDS, Knobs, PolicySpec

ENV_PREFIX = "KVBENCH_"
CONFIG_KEY = "kvbench"  # the section of vLLM's additional_config
# The per-request hint of the oracle predictor: the number of tokens the request will generate.
OUTPUT_TOKENS_HINT = "kvbench_output_tokens"
POLICY_KEYS = ("admission", "victim", "preemption", "predictor")
KNOB_KEYS = tuple(sorted(KNOB_FIELDS))
FILE_KEYS = ("profile", "hardware", "records")
KEYS = POLICY_KEYS + KNOB_KEYS + FILE_KEYS
VLLM_DEFAULTS = {"admission": "fcfs", "victim": "lifo"}
DEFAULT_PREDICTOR = "history"
_POLICY, _KNOBS = TypeAdapter(PolicySpec), TypeAdapter(Knobs)


def env_name(key: str) -> str:
    return f"{ENV_PREFIX}{key.upper()}"


def config_name(key: str) -> str:
    return f'additional_config["{CONFIG_KEY}"]["{key}"]'


class PluginError(KvbenchError):
    """A kvbench scheduler option vLLM cannot start with; the message names the option."""


@dataclass(frozen=True)
class PluginOptions:
    """The options, checked: admission, victim and predictor (`policy`), their knobs."""

    policy: PolicySpec = PolicySpec(predictor=DEFAULT_PREDICTOR)
    knobs: Knobs = Knobs()
    profile: Path | None = None
    hardware: str = "h100-sxm"
    records: Path | None = None

    @property
    def is_vllm_default(self) -> bool:
        """vLLM's own admission and victim: the scheduler only records, never decides."""
        return all(getattr(self.policy, k) == v for k, v in VLLM_DEFAULTS.items())

    @property
    def label(self) -> str:
        """admission/victim/recompute/predictor, as `kvbench compare-policies` names policies."""
        return self.policy.name

    @classmethod
    def parse(cls, values: Mapping[str, object], name_of: Callable[[str], str] = repr,
              preemption: str = "recompute") -> PluginOptions:
        """From option names (lowercase, as above) to values, strings converted; `name_of(key)`
        is how an error names an option (an environment variable, a config key); `preemption`
        is the default preemption policy."""
        unknown = [k for k in values if k not in KEYS]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], KEYS, n=1)
            raise PluginError(f"kvbench: unknown option {name_of(unknown[0])}"
                              + (f" (did you mean {name_of(hint[0])}?)" if hint else "")
                              + f"; known: {', '.join(KEYS)}")
        policy = {"predictor": DEFAULT_PREDICTOR, "preemption": preemption,
                  **{k: v for k, v in values.items() if k in POLICY_KEYS}}
        knobs = {k: v for k, v in values.items() if k in KNOB_KEYS}
        try:
            policy, knobs = _POLICY.validate_python(policy), _KNOBS.validate_python(knobs)
        except ValidationError as exc:
            problem = exc.errors()[0]
            message = problem["msg"].removeprefix("Value error, ")
            # A type error names its field; the specs' own checks name it in the message.
            key = (str(problem["loc"][0]) if problem["loc"]
                   else next((k for k in values if k in message), None))
            where = f"{name_of(key)}: " if key else ""
            raise PluginError(f"kvbench: {where}{message}") from None
        hardware = str(values.get("hardware", cls.hardware))
        try:
            get_hardware(hardware)
        except ValueError as exc:
            raise PluginError(f"kvbench: {name_of('hardware')}: {exc}") from None
        profile, records = (Path(str(values[k])) if values.get(k) else None
                            for k in ("profile", "records"))
        if profile is not None and not profile.is_file():
            raise PluginError(f"kvbench: {name_of('profile')}: no file {profile}")
        return cls(policy, knobs, profile, hardware, records)

    @classmethod
    def from_sources(cls, environ: Mapping[str, str], additional_config: Mapping | None,
                     preemption: str = "recompute") -> PluginOptions:
        """KVBENCH_* environment variables and vLLM's additional_config["kvbench"]
        (`preemption`: the default preemption policy)."""
        from_env = {k[len(ENV_PREFIX):].lower(): v for k, v in environ.items()
                    if k.startswith(ENV_PREFIX)}
        from_config = dict((additional_config or {}).get(CONFIG_KEY) or {})
        both = sorted(from_env.keys() & from_config.keys())
        if both:
            raise PluginError(f"kvbench: option {both[0]!r} is given twice, as "
                              f"{env_name(both[0])} and as {config_name(both[0])}; give it "
                              "once")
        return cls.parse({**from_env, **from_config},
                         lambda key: config_name(key) if key in from_config else env_name(key),
                         preemption)

    def to_config(self) -> dict:
        """The options as vLLM's additional_config: {"kvbench": {...}} (non-default fields)."""
        base = PluginOptions()
        fields = {k: getattr(self.policy, k) for k in POLICY_KEYS
                  if getattr(self.policy, k) != getattr(base.policy, k)}
        fields |= {k: getattr(self.knobs, k) for k in KNOB_KEYS
                   if getattr(self.knobs, k) != getattr(base.knobs, k)}
        fields |= {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if f.name not in ("policy", "knobs")
                   and getattr(self, f.name) != getattr(base, f.name)}
        return {CONFIG_KEY: fields}
