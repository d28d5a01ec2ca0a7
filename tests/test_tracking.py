"""MLflow tracking against a real `mlflow server` that dies mid-run and comes back, and against one that
never existed: the tracker keeps, retries and finally delivers or counts every record, and ends the
run with the status it was given."""

import logging
import time

import pytest

from tests.helpers import Server, free_port
from wenlan.tracking import Tracker


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path, free_port()).start()
    yield srv
    if srv.proc.poll() is None:
        srv.kill()


class Config:
    """What Tracker.start reads of a TrainConfig."""

    deepspeed_config = {"zero_optimization": {"stage": 3}}

    def __init__(self, **params):
        self.params = params

    def to_dict(self) -> dict:
        return self.params


def test_server_killed_mid_run_loses_nothing_and_resume_continues_the_run(server, tmp_path, caplog):
    import mlflow

    caplog.set_level(logging.WARNING, logger="wenlan.tracking")
    out = tmp_path / "run"
    out.mkdir()
    tracker = Tracker(True, out, server.uri, "faults", "run", retry_every=1.0, system_every=0.5)
    tracker.start(Config(preset="tiny", objective={"name": "brivl"}), restarts=0, step=0)
    for step in range(1, 6):
        tracker.log_metrics({"loss": 10.0 - step}, step=step)
    time.sleep(3)  # sent while the server is up
    server.kill()
    for step in range(6, 11):  # while it is down: kept and retried
        tracker.log_metrics({"loss": 10.0 - step}, step=step)
    time.sleep(2)
    server.start()
    for step in range(11, 16):
        tracker.log_metrics({"loss": 10.0 - step}, step=step)
    tracker.close(status="KILLED")  # a pre-empted job
    assert not tracker.dropped, tracker.dropped
    assert "failed" in caplog.text and "reachable again" in caplog.text

    client = mlflow.MlflowClient(server.uri)
    run_id = (out / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 16))
    assert run.data.params["preset"] == "tiny" and run.data.params["objective.name"] == "brivl"
    assert "system/cpu_utilization_percentage" in run.data.metrics  # sampled before, during and after
    assert {a.path for a in client.list_artifacts(run_id)} == {"deepspeed_config.json"}

    # The requeued job: the same MLflow run, only new params logged (params are immutable), new steps.
    resumed = Tracker(True, out, server.uri, "faults", "run", retry_every=1.0)
    resumed.start(Config(preset="tiny", objective={"name": "brivl"}, seed=1), restarts=1, step=15)
    resumed.log_metrics({"loss": -6.0}, step=16)
    resumed.close()
    assert not resumed.dropped, resumed.dropped
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["seed"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "restarts")] == [0, 15]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 17))
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_server_that_never_existed_costs_nothing_and_is_reported(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="wenlan.tracking")
    out = tmp_path / "run"
    out.mkdir()
    tracker = Tracker(True, out, f"http://127.0.0.1:{free_port()}", "nowhere", "run", retry_every=1.0,
                      close_timeout=6.0)
    tracker.start(Config(preset="tiny"), restarts=0, step=0)
    for step in range(1, 101):
        tracker.log_metrics({"loss": 1.0, "acc": 0.5}, step=step)
    tracker.close(status="FAILED")
    assert not tracker._thread.is_alive()  # it gave up within close_timeout
    assert tracker.dropped["run (never opened)"] == 1
    assert tracker.dropped["metric values"] >= 201  # 200 + restarts (+ system samples)
    assert tracker.dropped["params"] == 1 and tracker.dropped["artifacts"] == 1
    assert caplog.text.count("failed (") == 1  # warned once
    assert "not recorded:" in caplog.text and "run (never opened)" in caplog.text
    assert not (out / "mlflow_run_id").exists()
