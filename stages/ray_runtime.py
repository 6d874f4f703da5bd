"""Starting or joining Ray, in one place.

Locally (no address), Ray starts on this machine bound to the loopback interface: its GCS,
raylet, object manager, workers and agents listen on 127.0.0.1 only (dashboard, when
``ray[default]`` is installed and ``AVAT3R_RAY_DASHBOARD`` is not ``0``, on http://127.0.0.1:8265).
``AVAT3R_RAY_LISTEN=all`` asks for Ray's own default instead: every interface, which is what
other machines need to join.

On a cluster, pass its address (``--ray-address HOST:PORT``, ``auto``, ``ray://head:10001``) or
set ``RAY_ADDRESS``; the same stages then fan out over every node. A loopback address
(``127.0.0.1:PORT``, ``localhost:PORT``) joins a cluster bound to loopback on this machine; Ray by
itself rewrites such an address to the machine's interface address, where such a cluster does
not listen. Nothing answering the address is one clear error naming it, found before Ray's own
connection retries.

Authentication: Ray 2.60 turns on token authentication for a cluster it starts (``ray.init``
without an address; ``ray start --head`` when a token exists), with the token in
``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``), but a driver joining an
explicit address does not send it unless ``RAY_AUTH_MODE=token``. When ``RAY_AUTH_MODE`` is unset
and a token is available, joining therefore sends it (a cluster without authentication ignores it).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

log = logging.getLogger("avat3r.ray")

#: ``loopback`` (default) or ``all``: where a Ray that this process starts listens
LISTEN_ENV = "AVAT3R_RAY_LISTEN"
#: Ray's switch between a single-machine instance on 127.0.0.1 (False, Ray's default on macOS and
#: Windows) and a cluster node on the interface address (True, Ray's default on Linux). Read by
#: Ray's processes from the environment, and by this one from ``ray_constants`` at call time.
_RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayConnectError(ConnectionError):
    """No Ray cluster answers at the address given (names it, and what was tried)."""


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``ray://`` stripped, IPv6 in brackets) → (host, port)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        raise RayConnectError(f"Ray address {address!r} is not HOST:PORT (or auto, or ray://HOST:PORT)")
    return host.strip("[]"), int(port)


def resolve_address(address: str | None) -> str | None:
    """The address to join: the argument, else ``RAY_ADDRESS``; ``auto`` becomes the cluster Ray
    recorded on this machine (``ray start``). None: start Ray locally."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        return None
    if address == "auto":
        from ray._private import services

        found = services.find_bootstrap_address(None)
        if not found:
            raise RayConnectError("--ray-address auto: no Ray cluster started on this machine (`ray start --head`) "
                                  "was found; give its HOST:PORT")
        return found
    return address


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the address, when nothing accepts a TCP connection there."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayConnectError(f"no Ray cluster answers at {address} ({host} port {port}: {exc.strerror or exc}); "
                              f"start one there (`ray start --head --port {port}`) or fix --ray-address / RAY_ADDRESS") from exc


def _set_cluster_mode(enabled: bool) -> None:
    """Ray on the interface address (a cluster node) or on loopback only, for Ray processes started
    from here (environment) and for this process's address resolution (``ray_constants``, which Ray
    read from the environment when it was first imported)."""
    import ray._private.ray_constants as ray_constants

    os.environ[_RAY_CLUSTER_ENV] = "1" if enabled else "0"
    ray_constants.ENABLE_RAY_CLUSTER = enabled


def ensure_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool | None = None) -> dict:
    """Initialise Ray once per process; later calls are no-ops. Returns the cluster resources."""
    import ray

    if not ray.is_initialized():
        address = resolve_address(address)
        kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": True, "logging_level": logging.WARNING}
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address:
            client = address.startswith("ray://")
            host, _ = split_address(address)
            if not client:
                # this driver registers itself at the address Ray resolves for this machine:
                # loopback for a loopback cluster, the interface address otherwise
                _set_cluster_mode(not is_loopback_host(host))
                # Ray's own rule for `auto`, which it skips for an explicit address
                from ray._private.authentication.authentication_token_setup import (
                    maybe_enable_token_auth_if_token_available)

                maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
            _probe(address)
            kwargs["address"] = address
        else:
            listen = os.environ.get(LISTEN_ENV, "loopback")
            if listen not in ("loopback", "all"):
                raise RayConnectError(f"{LISTEN_ENV}={listen!r}: use loopback or all")
            _set_cluster_mode(listen == "all")
            # "local", not None: a bare ray.init() joins the cluster `ray start` recorded on this
            # machine (ray_current_cluster in Ray's temp dir) instead of starting one
            kwargs["address"] = "local"
            if num_cpus:
                kwargs["num_cpus"] = num_cpus
            if dashboard is None:
                dashboard = os.environ.get("AVAT3R_RAY_DASHBOARD", "1") != "0"
            kwargs["include_dashboard"] = dashboard
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            cause = exc
            while cause.__cause__ is not None:  # Ray wraps the reason (e.g. AuthenticationError) twice
                cause = cause.__cause__
            why = f" ({type(cause).__name__}: {str(cause).splitlines()[0]})" if cause is not exc else ""
            if "InvalidAuthToken" in str(cause):
                why = (" (the cluster uses token authentication and refused this driver's token: give its token "
                       "in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, and RAY_AUTH_MODE=token)")
            raise RayConnectError(f"could not join the Ray cluster at {address}: {exc}{why}") from exc
        log.info("ray: %s", ray.cluster_resources())
    return ray.cluster_resources()
