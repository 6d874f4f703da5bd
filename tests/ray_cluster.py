"""A two-node Ray cluster on this machine's loopback interface, for the multi-node tests.

``python -m tests.ray_cluster DIR [--head-only]`` starts a head node (1 CPU, resource ``head``)
and a second node (1 CPU, resource ``second``; not with ``--head-only``) with Ray's own test harness (``ray.cluster_utils.Cluster``:
separate GCS, raylets and object stores, as two machines would have), both bound to 127.0.0.1 and
with token authentication (the token in ``DIR/token``). It prints one JSON line (the GCS address,
each node's id and raylet pid, the token file) and keeps the cluster up until stdin closes.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path


def main(work: str, second_node: bool = True) -> None:
    work_dir = Path(work)
    token = work_dir / "token"
    token.write_text(secrets.token_hex(32))
    # before Ray is imported: loopback only (see stages.ray_runtime), token authentication on
    # (RAY_TMPDIR: the address file `--ray-address auto` reads is this cluster's, not /tmp/ray's)
    os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_TMPDIR": str(work_dir),
                       "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"})
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    common = {"include_dashboard": False, "object_store_memory": 100 * 1024 * 1024,
              "temp_dir": str(work_dir / "ray")}
    # a lost node is declared dead after ~1.5 s instead of Ray's ~15 s (health checks), to keep the test short
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1},
                                                            "_system_config": health, **common})
    members = [("head", cluster.head_node)]
    if second_node:
        members.append(("second", cluster.add_node(num_cpus=1, resources={"second": 1}, **common)))
    cluster.wait_for_nodes()
    nodes = {name: {"node_id": node.node_id,
                    "raylet_pid": node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid}
             for name, node in members}
    print(json.dumps({"address": cluster.address, "nodes": nodes, "token_path": str(token)}), flush=True)
    sys.stdin.read()  # until the test closes our stdin
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], second_node="--head-only" not in sys.argv[2:])
