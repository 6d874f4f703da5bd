"""Starting or joining Ray, in one place.

Locally, Ray starts on this machine (dashboard on http://127.0.0.1:8265 when ``ray[default]`` is
installed). On a cluster, pass its address (``--ray-address ray://head:10001`` or ``auto``) or set
``RAY_ADDRESS``; the same stages then fan out over every node.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("avat3r.ray")


def ensure_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool | None = None) -> dict:
    """Initialise Ray once per process; later calls are no-ops. Returns the cluster resources."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": True, "logging_level": logging.WARNING}
        if address:
            kwargs["address"] = address
        else:
            if num_cpus:
                kwargs["num_cpus"] = num_cpus
            if dashboard is None:
                dashboard = os.environ.get("AVAT3R_RAY_DASHBOARD", "1") != "0"
            kwargs["include_dashboard"] = dashboard
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(**kwargs)
        log.info("ray: %s", ray.cluster_resources())
    return ray.cluster_resources()
