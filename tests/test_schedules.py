"""Schedules and deployments for ML ops (no run is started: the deployment objects and the server side)."""

from __future__ import annotations

import pytest


@pytest.fixture()
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {preset: tiny}\n")
    return path


def test_make_deployment_schedule_parameters_and_no_overlap(prefect_harness, params_file, tmp_path, monkeypatch):
    from pipelines.schedules import make_deployment

    monkeypatch.chdir(tmp_path)
    dep = make_deployment("train", "0 2 * * *", "params.yaml", "data", ray_address="ray://head:10001",
                          timezone="Europe/Berlin")
    assert dep.name == "train-scheduled" and dep.flow_name == "train"
    (schedule,) = dep.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "Europe/Berlin"
    # the run starts wherever a worker runs: absolute paths; the cluster address is passed through
    assert dep.parameters == {"params_path": str(params_file), "data_root": str(tmp_path / "data"),
                              "ray_address": "ray://head:10001", "executor": "ray"}
    assert dep.concurrency_limit == 1  # a due run waits for the previous one


def test_make_deployment_rejects_bad_input(prefect_harness, params_file):
    from pipelines.schedules import make_deployment

    with pytest.raises(ValueError, match="unknown flow 'trian'"):
        make_deployment("trian", "0 2 * * *", str(params_file))
    with pytest.raises(ValueError):
        make_deployment("train", "not a cron", str(params_file))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        make_deployment("train", "0 2 * * *", str(params_file.parent / "missing.yaml"))


def test_training_limit_and_registration_with_a_work_pool(prefect_harness, params_file):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from pipelines.flows import TRAINING_LIMIT
    from pipelines.schedules import ensure_training_limit, make_deployment, register

    ensure_training_limit(1)
    ensure_training_limit(2)  # resized, not duplicated
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(TRAINING_LIMIT).limit == 2
        client.create_work_pool(WorkPoolCreate(name="gpu-pool", type="process"))
    dep = make_deployment("train", "*/30 * * * *", str(params_file), work_pool="gpu-pool", name="nightly")
    deployment_id = register(dep)
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
    assert stored.name == "nightly" and stored.work_pool_name == "gpu-pool"
    assert stored.schedules[0].schedule.cron == "*/30 * * * *"
    assert stored.parameters["params_path"] == str(params_file)


def test_cli_schedule_rejects_a_bad_cron(params_file):
    from tests.test_flows import run_cli

    done = run_cli("schedule", "train", "--cron", "every night", "--params", str(params_file))
    assert done.returncode == 2 and "bad schedule" in done.stdout


def test_cli_schedule_needs_a_prefect_server(params_file, monkeypatch):
    from tests.test_flows import run_cli

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    done = run_cli("schedule", "train", "--cron", "0 2 * * *", "--params", str(params_file))
    assert done.returncode == 2 and "no Prefect server" in done.stdout and "prefect server start" in done.stdout

