"""One way to get a Ray connection for every workflow."""

from __future__ import annotations

import os


def ensure_ray() -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray; a no-op when already connected.

    Worker logs stay in Ray's log folder (``log_to_driver=False``) so the front-ends' own progress
    output stays readable; progress bars of Ray Data are off for the same reason.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
