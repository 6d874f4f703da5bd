"""Deployments and schedules for ML ops: run a flow on a cron schedule, served from this machine or
registered with a Prefect server for a work pool's workers.

Two training runs must not share a GPU. Two guards do that:

* each deployment has ``concurrency_limit=1``: a scheduled run that comes due while the previous
  one still trains waits (Prefect's deployment concurrency), it does not start beside it;
* the train task holds a slot of the global concurrency limit
  :data:`~pipelines.flows.TRAINING_LIMIT` while it runs (see :mod:`pipelines.flows`), which :func:`ensure_training_limit` creates with one slot per
  GPU node, so ad-hoc runs (``avat3r train``) and every deployment queue on the same GPUs.

Pointing at other infrastructure is configuration, not code: ``PREFECT_API_URL`` selects the
Prefect server, and the flows' ``ray_address`` parameter (``ray://head:10001`` or ``auto``) the Ray
cluster the stages run on.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.flows import TRAINING_LIMIT, demo_flow, preprocess_flow, reconstruct_flow, train_flow


def flows() -> dict:
    return {"train": train_flow, "preprocess": preprocess_flow, "reconstruct": reconstruct_flow, "demo": demo_flow}


def make_deployment(flow_name: str, cron: str, params_path: str = "params.yaml", data_root: str = "data",
                    ray_address: str | None = None, name: str | None = None, work_pool: str | None = None,
                    timezone: str = "UTC", concurrency_limit: int = 1):
    """A ``RunnerDeployment`` of flow ``flow_name`` on ``cron`` with the flow's parameters. The
    params file and data root are made absolute: the run starts wherever the worker runs."""
    from prefect.schedules import Cron

    registry = flows()
    if flow_name not in registry:
        raise ValueError(f"unknown flow {flow_name!r}; known: {', '.join(registry)}")
    params = Path(params_path).resolve()
    if not params.exists():
        raise FileNotFoundError(f"params file not found: {params}")
    schedule = Cron(cron, timezone=timezone)  # validates the expression (ValueError names it)
    parameters = {"params_path": str(params), "data_root": str(Path(data_root).resolve()),
                  "ray_address": ray_address, "executor": "ray"}
    return registry[flow_name].to_deployment(
        name=name or f"{flow_name}-scheduled", schedule=schedule, parameters=parameters,
        concurrency_limit=concurrency_limit, work_pool_name=work_pool, tags=["avat3r", flow_name],
        description=f"avat3r {flow_name} flow on '{cron}' ({timezone}) with {params}")


def ensure_training_limit(slots: int = 1) -> None:
    """Create (or resize) the global concurrency limit the train task holds while it runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(TRAINING_LIMIT)
            client.update_global_concurrency_limit(TRAINING_LIMIT, GlobalConcurrencyLimitUpdate(limit=slots))
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=TRAINING_LIMIT, limit=slots))


def register(deployment) -> str:
    """Register with the Prefect server (a work pool's workers pick the runs up); returns its id."""
    return str(deployment.apply())


def serve(deployment) -> None:  # pragma: no cover - blocks until interrupted
    """Serve from this process: it polls for due runs and executes them here until stopped."""
    from prefect import serve as prefect_serve

    prefect_serve(deployment)
