"""The Ray connection behind `kvbench fleet calibrate` and `compare-policies --ray`.

An address is `local` (start a private Ray instance on this machine, reachable on 127.0.0.1
only, shut down afterwards), `auto` (join the cluster that `ray start --head` began on this
machine) or `HOST:PORT` of a cluster's head node. Every node must have kvbench[ray] installed:
tasks import kvbench there. Ray itself is the optional extra `pip install 'kvbench[ray]'`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from kvbench.errors import KvbenchError

LOCAL = "local"


class ClusterError(KvbenchError):
    """Ray is missing, or the cluster cannot do what was asked; the message says how to fix it."""


def import_ray(loopback: bool = False) -> ModuleType:
    """Ray, or a one-line error naming the extra to install.

    `loopback`: before Ray's first import, keep a local node on 127.0.0.1. Ray replaces a
    loopback node address by the machine's outward one unless this switch (read once, when
    `ray._private.ray_constants` is imported) is off; it is how Ray keeps local instances
    private on macOS and Windows.
    """
    if loopback:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise ClusterError("Ray is not installed: pip install 'kvbench[ray]'") from None
    return ray


def check_head(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a HOST:PORT where nothing listens: Ray itself retries for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"Ray address {address!r}: use local, auto or HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(f"no Ray head node answers at {address} ({exc.strerror or exc}); "
                           "start one with `ray start --head` or check the address") from None


@contextmanager
def connect(address: str = LOCAL) -> Iterator[ModuleType]:
    """`ray`, connected to `address` for the duration of the block (a `local` instance gets
    every core of this machine). If this process is already connected (a caller's own
    `ray.init`), that connection is used as it is and left open."""
    ray = import_ray(loopback=address == LOCAL)
    if ray.is_initialized():
        yield ray
        return
    if address not in (LOCAL, "auto") and not address.startswith("ray://"):
        check_head(address)
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    try:
        yield ray
    finally:
        ray.shutdown()
