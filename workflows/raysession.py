"""One way to get a Ray connection for every workflow."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Ray's switch for "this machine forms no multi-node cluster": its node IP becomes 127.0.0.1, and then
# (Ray 2.60) the GCS, raylet, workers, dashboard agent and Prometheus metrics export all listen on
# loopback only. Without it Ray turns even an explicit 127.0.0.1 into the machine's LAN address and
# its servers listen on every interface.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While Ray starts, make it listen on 127.0.0.1 only (unless the user set the switch); restored
    afterwards, so a later multi-node Ray in this process (a test's cluster, a second job) is unaffected:
    the started Ray's processes keep the environment they were started with."""
    from ray._private import ray_constants

    before_env, before_flag = os.environ.get(LOOPBACK_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
    if os.environ[LOOPBACK_ONLY_ENV] == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False  # read once when Ray is imported, maybe before this call
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(LOOPBACK_ONLY_ENV, None)
        else:
            os.environ[LOOPBACK_ONLY_ENV] = before_env


def ensure_ray() -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray of this process's own, bound to 127.0.0.1
    (node IP, gRPC servers, dashboard, metrics export) with Ray's token auth as configured (on by
    default); a no-op when already connected.

    Worker logs stay in Ray's log folder (``log_to_driver=False``) so the front-ends' own progress
    output stays readable; progress bars of Ray Data are off for the same reason.
    """
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address:
            ray.init(address=address, **options)
        else:
            # "local": never attach to another Ray found on this machine (another user's, another job's).
            with _loopback_only():
                ray.init(address="local", dashboard_host="127.0.0.1", **options)
    ray.data.DataContext.get_current().enable_progress_bars = False
