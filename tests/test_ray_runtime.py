"""Where a Ray started by the project listens, and what joining an address that does not answer says."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Starts Ray the way every stage does, runs tasks (so workers exist), then lists every listening
# TCP socket of this driver and of every process of its Ray session (GCS, raylet, agents, workers).
LISTENERS = r"""
import json, os, time, psutil, ray
from stages.ray_runtime import ensure_ray
ensure_ray(num_cpus=1, dashboard=False)
ray.get([ray.remote(lambda: os.getpid()).remote() for _ in range(2)])
time.sleep(1)
session = ray._private.worker._global_node.get_session_dir_path()
found = []
for proc in psutil.process_iter(["pid", "name", "cmdline"]):
    try:
        mine = proc.pid == os.getpid() or any(session in part for part in proc.info["cmdline"] or [])
        mine = mine or proc.pid in {c.pid for c in psutil.Process().children(recursive=True)}
        if mine:
            found += [(proc.info["name"], c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
print(json.dumps(found))
"""


def listeners(extra_env: dict) -> list:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra_env}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def is_loopback(ip: str) -> bool:
    return ip.removeprefix("::ffff:") in ("127.0.0.1", "::1")


def test_a_local_ray_listens_on_loopback_only():
    found = listeners({})
    names = {name for name, _, _ in found}
    assert {"gcs_server", "raylet"} <= names, found  # the sockets looked at include Ray's own
    assert all(is_loopback(ip) for _, ip, _ in found), [f for f in found if not is_loopback(f[1])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_joining_an_address_where_nothing_answers_names_it():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "40"}  # narrow: the message must not wrap
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", "extract", "--capture", "nowhere", "--ray-address",
                               address], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"no Ray cluster answers at {address}" in done.stdout and "Traceback" not in done.stderr, done.stdout
    bad = subprocess.run([sys.executable, "-m", "pipelines.cli", "extract", "--ray-address", "head-without-port"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert bad.returncode == 1 and "not HOST:PORT" in bad.stdout, bad.stdout
