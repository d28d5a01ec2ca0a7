"""MLflow tracking, on rank 0 only (the other ranks get a tracker that does nothing).

Default store: a SQLite database and an artifact folder next to the run's output directory
(``outputs/mlflow.db``, ``outputs/mlartifacts`` for ``outputs/demo``), so the demo needs no server and
all demo runs land in one dashboard: ``mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db``.
"""

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve().parent / 'mlflow.db'}"


class Tracker:
    def __init__(self, enabled: bool, output_dir: Path, uri: str | None, experiment: str, run_name: str):
        self.enabled = enabled
        if not enabled:
            return
        import mlflow  # only rank 0 pays the import

        self.mlflow = mlflow
        uri = uri or default_tracking_uri(output_dir)
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            artifacts = None
            if uri.startswith("sqlite:///"):
                artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            mlflow.create_experiment(experiment, artifact_location=artifacts)
        mlflow.set_experiment(experiment)
        run_id_file = Path(output_dir) / "mlflow_run_id"
        # A resumed run continues the same MLflow run rather than starting a new one.
        run_id = run_id_file.read_text().strip() if run_id_file.exists() else None
        try:
            self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        except Exception as err:  # e.g. the run was deleted from the store
            log.warning("cannot continue MLflow run %s (%s); starting a new one", run_id, err)
            self.run = mlflow.start_run(run_name=run_name)
        run_id_file.write_text(self.run.info.run_id)
        log.info("MLflow run %s in %s", self.run.info.run_id, uri)

    def start(self, cfg, restarts: int, step: int) -> None:
        """What every (re)start records: the resolved config as params (only new ones: MLflow params are
        immutable), the restart count, and the DeepSpeed config as an artifact."""
        self.log_params(cfg.to_dict())
        self.log_metrics({"restarts": restarts}, step=step)
        self.log_dict(cfg.deepspeed_config, "deepspeed_config.json")

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        flat = _flatten(params)
        existing = self.mlflow.get_run(self.run.info.run_id).data.params
        new = {k: str(v)[:6000] for k, v in flat.items() if k not in existing}
        if new:
            self.mlflow.log_params(new)

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.enabled:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path) -> None:
        if self.enabled:
            self.mlflow.log_artifact(str(path))

    def log_dict(self, data: dict, name: str) -> None:
        if self.enabled:
            self.mlflow.log_text(json.dumps(data, indent=2), name)

    def close(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.mlflow.end_run(status=status)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
