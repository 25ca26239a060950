"""The conformance suite's pytest plugin (`-p kvbench.vllm.conformance.plugin`).

`--kvbench` swaps kvbench's scheduler class in for vLLM's `Scheduler` and `AsyncScheduler`, and
kvbench's write-through connector for vLLM's `OffloadingConnector`, before the test modules
import them; the options come from KVBENCH_* variables, as in a server. Without it vLLM runs as
it is. Either way `--kvbench-outcomes FILE` gets one JSON line per test: its outcome, the
exception type of a failure and the file that raised it, and what the invariants found in
every scheduler the test built (`invariants`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import kvbench

KVBENCH = Path(kvbench.__file__).resolve().parent
_built: list = []  # the schedulers the running test has built
_out = None


def pytest_addoption(parser) -> None:
    group = parser.getgroup("kvbench")
    group.addoption("--kvbench", action="store_true",
                    help="run the tests with kvbench's scheduler and write-through connector")
    group.addoption("--kvbench-outcomes", help="one JSON line per test's outcome goes here")


def pytest_configure(config) -> None:
    global _out
    from vllm.v1.core.sched import async_scheduler, scheduler

    vllm_init = scheduler.Scheduler.__init__

    def tracked_init(self, *args, **kwargs):
        vllm_init(self, *args, **kwargs)
        _built.append(self)

    scheduler.Scheduler.__init__ = tracked_init
    if config.getoption("kvbench"):
        swap_in(scheduler, async_scheduler)
    path = config.getoption("kvbench_outcomes")
    if path:
        _out = open(path, "w", buffering=1)  # noqa: SIM115 (closed in pytest_unconfigure)


def swap_in(scheduler, async_scheduler) -> None:
    """kvbench's classes under vLLM's names."""
    from vllm.distributed.kv_transfer.kv_connector import factory
    from vllm.distributed.kv_transfer.kv_connector.v1 import offloading_connector

    from kvbench.vllm.scheduler import KvbenchAsyncScheduler, KvbenchScheduler
    from kvbench.vllm.write_through import KvbenchWriteThroughConnector

    scheduler.Scheduler = KvbenchScheduler
    async_scheduler.AsyncScheduler = KvbenchAsyncScheduler
    offloading_connector.OffloadingConnector = KvbenchWriteThroughConnector
    factory.KVConnectorFactory._registry["OffloadingConnector"] = (
        lambda: KvbenchWriteThroughConnector)


def pytest_unconfigure(config) -> None:
    if _out is not None:
        _out.close()


def invariants(sched) -> list[str]:
    """What a scheduler's state says was lost: blocks whose reference count no request's block
    list accounts for, unfinished requests in no queue."""
    try:
        manager = sched.kv_cache_manager
        held = Counter(block.block_id for single in manager.coordinator.single_type_managers
                       for blocks in single.req_to_blocks.values() for block in blocks
                       if not block.is_null)
        problems = [f"block {b.block_id}: ref_cnt {b.ref_cnt}, held {held[b.block_id]} times"
                    for b in manager.block_pool.blocks
                    if not b.is_null and b.ref_cnt != held[b.block_id]]
        queued = {r.request_id for queue in (sched.running, sched.waiting,
                                             sched.kv_holding_waiting, sched.deferred_waiting)
                  for r in queue}
        problems += [f"request {rid} ({request.status.name}) is in no queue"
                     for rid, request in sched.requests.items()
                     if not request.is_finished() and rid not in queued]
    except (AttributeError, TypeError) as exc:  # a test that mocks the scheduler's parts
        return [f"not checked: {type(exc).__name__}"]
    return problems[:3]


def raised_in(excinfo) -> str | None:
    """The file the exception was raised in: kvbench/..., vllm/... (installed) or the test's."""
    if excinfo is None or not excinfo.traceback:
        return None
    path = Path(str(excinfo.traceback[-1].path)).resolve()
    if path.is_relative_to(KVBENCH):
        return str(path.relative_to(KVBENCH.parent))
    parts = path.parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1:])
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _write(nodeid: str, outcome: str, exception: str | None = None, where: str | None = None,
           problems: list[str] | None = None) -> None:
    if _out is not None:
        _out.write(json.dumps({"test": nodeid, "outcome": outcome, "exception": exception,
                               "raised_in": where, "problems": problems or []}) + "\n")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    _built.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    exception = call.excinfo.typename if call.excinfo is not None else None
    if report.when == "call":
        problems = [p for sched in _built for p in invariants(sched)]
        failed = report.failed
        _write(item.nodeid, report.outcome, exception if failed else None,
               raised_in(call.excinfo) if failed else None, problems)
    elif report.when == "setup" and not report.passed:
        error = not report.skipped
        _write(item.nodeid, "error" if error else "skipped", exception if error else None,
               raised_in(call.excinfo) if error else None)


def pytest_collectreport(report) -> None:
    if report.failed:
        _write(report.nodeid, "error", "collection")
