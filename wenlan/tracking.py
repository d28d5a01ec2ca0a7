"""MLflow tracking on rank 0 (the other ranks get a tracker that does nothing), which never stops, slows
or hangs training.

Every call returns at once: it puts a record on a bounded queue, and one daemon thread sends the
records in batches (MLflow's REST calls take ~100 ms each against a server). When the store fails or
cannot be reached, the thread keeps what it could not send (up to ``max_pending`` metric values, the
oldest dropped first) and tries again every few seconds; the first failure is logged once, a
recovery once, and ``close`` says what never got through. ``close`` waits for the thread at most
``close_timeout`` seconds. The run ends FINISHED, FAILED (an exception, a diverged loss) or KILLED
(pre-emption); a resumed or requeued run continues the same MLflow run (``mlflow_run_id`` in the
output directory), logging only params it does not have yet (MLflow params are immutable).

System metrics (CPU, memory, and per GPU utilisation and memory through nvidia-ml-py) are sampled by
the same thread every ``system_every`` seconds and sent with the rest, so they outlive a server blip
(MLflow's own monitor thread stops for good at its first failure).

The experiment carries the preset dashboard (``wenlan.dashboard``): a saved chart view that the
thread sets, and widens whenever the run logs a metric it charts but the view does not have yet.
Pictures (``log_image``) are drawn on the thread too and logged for MLflow's image grid.

Default store: a SQLite database and an artifact folder next to the run's output directory
(``outputs/mlflow.db``, ``outputs/mlartifacts`` for ``outputs/demo``), so the demo needs no server and
all demo runs land in one dashboard: ``mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db``.
"""

import functools
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

STATUSES = ("FINISHED", "FAILED", "KILLED")


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve().parent / 'mlflow.db'}"


class Tracker:
    def __init__(self, enabled: bool, output_dir: Path, uri: str | None, experiment: str, run_name: str, *,
                 max_pending: int = 200_000, retry_every: float = 5.0, close_timeout: float = 60.0,
                 system_every: float = 15.0):
        self.enabled = enabled
        if not enabled:
            return
        self.uri = uri or default_tracking_uri(output_dir)
        self.output_dir, self.experiment, self.run_name = Path(output_dir), experiment, run_name
        self.max_pending, self.retry_every = max_pending, retry_every
        self.close_timeout, self.system_every = close_timeout, system_every
        self.records: queue.Queue = queue.Queue(maxsize=100_000)
        self.dropped: Counter = Counter()  # what never reached the store, by kind
        self.run_id: str | None = None
        self._thread = threading.Thread(target=_Sender(self).run, name="mlflow-tracking", daemon=True)
        self._thread.start()

    # -- what training calls: each returns at once ----------------------------------------------------
    def start(self, cfg, restarts: int, step: int, tags: dict | None = None) -> None:
        """What every (re)start records: the resolved config as params (only new ones), the restart
        count, the DeepSpeed config as an artifact, and ``tags`` (what ran where: they may change
        between restarts, params may not)."""
        self.log_params(cfg.to_dict())
        self.log_metrics({"restarts": restarts}, step=step)
        self.log_dict(cfg.deepspeed_config, "deepspeed_config.json")
        self.set_tags({"restarts": restarts, **(tags or {})})

    def set_tags(self, tags: dict) -> None:
        self._put("tags", {k: str(v) for k, v in tags.items()})

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        """A file uploaded as it is when the sender reaches it (the exported model at the end)."""
        self._put("file", (str(path), artifact_path))

    def log_params(self, params: dict) -> None:
        self._put("params", {k: str(v)[:6000] for k, v in _flatten(params).items()})

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._put("metrics", ({k: float(v) for k, v in metrics.items()}, step, int(time.time() * 1000)))

    def log_artifact(self, path: Path) -> None:
        """A small file's contents as they are now (eval.json is rewritten at every evaluation)."""
        if self.enabled:
            self._put("text", (Path(path).read_text(), Path(path).name))

    def log_dict(self, data: dict, name: str) -> None:
        self.log_text(json.dumps(data, indent=2), name)

    def log_text(self, text: str, name: str) -> None:
        """``text`` as the artifact ``name`` (a path in the run's artifacts, e.g. ``eval/step-000200.txt``)."""
        self._put("text", (text, name))

    def log_image(self, draw, key: str, step: int) -> None:
        """The PIL image that ``draw()`` returns, drawn on the tracker's thread (training does not wait
        for it), as MLflow's image ``key`` at ``step``: the run's image grid steps through them."""
        self._put("draw", (draw, key, step))

    def close(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        """End the run with ``status``; wait for the sender at most ``timeout`` (default
        ``close_timeout``) seconds and say what could not be sent."""
        if not self.enabled or not self._thread.is_alive():
            return
        if status not in STATUSES:
            raise ValueError(f"MLflow run status {status!r}: use one of {', '.join(STATUSES)}")
        self._put("close", status, block=True)
        self._thread.join(timeout or self.close_timeout)
        if self._thread.is_alive():
            self.dropped["records still queued at exit"] += self.records.qsize()
        if self.dropped:
            lost = ", ".join(f"{n} {kind}" for kind, n in sorted(self.dropped.items()))
            log.warning("MLflow at %s: not recorded: %s", self.uri, lost)

    def _put(self, kind: str, payload, block: bool = False) -> None:
        if not self.enabled:
            return
        try:
            self.records.put((kind, payload), block=block, timeout=self.close_timeout if block else None)
        except queue.Full:  # the sender has been stuck for ~100,000 records: training goes on
            self.dropped[f"{kind} records (queue full)"] += 1


class _Sender:
    """The tracker's thread: opens (or continues) the run, batches records, retries, samples the system."""

    def __init__(self, tracker: Tracker):
        self.t = tracker
        self.client = None
        self.metrics: list = []  # mlflow.entities.Metric not yet sent, oldest first
        self.params: dict = {}
        self.tags: dict = {}
        # ("text", (text, name)), ("file", (path, artifact_path)) or ("image", (PIL image, key, step))
        self.artifacts: list[tuple[str, tuple]] = []
        self.metric_keys: set[str] = set()  # every metric and image key the run logs, for the dashboard
        self.view_keys: set[str] | None = None  # the metrics the experiment's view charts (None: not read yet)
        self.view_created = 0
        self.image_step, self.view_image_step = 0, 0  # the newest picture's step, and the view's
        self.status: str | None = None
        self.failing_since: float | None = None
        self.next_try = 0.0
        self.next_sample = 0.0
        self.last_step = 0
        self.system = _SystemMetrics()

    def run(self) -> None:
        # Our retries are the slow ones: MLflow's own (7 with exponential back-off, 120 s timeouts) would
        # hold the thread for minutes per call against a dead server. Only where the user set none.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import mlflow

        self.mlflow = mlflow
        while self.status is None:
            self._take(timeout=min(1.0, self.t.system_every))
            now = time.monotonic()
            if now >= self.next_sample:
                self.next_sample = now + self.t.system_every
                self._add_metrics(self.system.sample(), self.last_step, int(time.time() * 1000))
            if now >= self.next_try or self.status is not None:
                self._send()
        deadline = time.monotonic() + self.t.close_timeout / 2
        while not self._send() and time.monotonic() < deadline:  # a last chance for a blip at the end
            time.sleep(min(self.t.retry_every, 2.0))
        if self.client is not None and self.t.run_id is not None:
            self._attempt(lambda: self.client.set_terminated(self.t.run_id, status=self.status))
        self._count_unsent()

    def _take(self, timeout: float) -> None:
        """Move every queued record into the pending batches (waiting up to ``timeout`` for the first)."""
        try:
            item = self.t.records.get(timeout=timeout)
        except queue.Empty:
            return
        while item is not None:
            kind, payload = item
            if kind == "metrics":
                values, step, stamp = payload
                self.last_step = max(self.last_step, step)
                self._add_metrics(values, step, stamp)
            elif kind == "params":
                self.params.update(payload)
            elif kind in ("text", "file"):
                self.artifacts.append((kind, payload))
            elif kind == "draw":
                self._draw(*payload)
            elif kind == "tags":
                self.tags.update(payload)
            elif kind == "close":
                self.status = payload
            try:
                item = self.t.records.get_nowait()
            except queue.Empty:
                item = None

    def _draw(self, draw, key: str, step: int) -> None:
        try:
            image = draw()
        except Exception:  # noqa: BLE001 - a picture that cannot be drawn costs the picture, nothing else
            if not self.t.dropped["images (drawing failed)"]:
                log.exception("drawing the MLflow image %r failed; training continues without it", key)
            self.t.dropped["images (drawing failed)"] += 1
            return
        self.artifacts.append(("image", (image, key, step)))
        self.metric_keys.add(key)
        self.image_step = max(self.image_step, step)

    def _add_metrics(self, values: dict, step: int, stamp: int) -> None:
        from mlflow.entities import Metric

        self.metric_keys.update(values)
        self.metrics.extend(Metric(k, v, stamp, step) for k, v in values.items())
        excess = len(self.metrics) - self.t.max_pending
        if excess > 0:  # the store has been away for long: keep the newest
            del self.metrics[:excess]
            self.t.dropped["metric values (buffer full)"] += excess

    def _send(self) -> bool:
        """Try to send everything pending; True if nothing is left."""
        if not (self._open() and self._send_params() and self._send_tags() and self._send_metrics()
                and self._send_view() and self._send_artifacts()):
            self.next_try = time.monotonic() + self.t.retry_every
            return False
        return True

    def _attempt(self, call) -> bool:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - any failure of the store: training must not notice
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                log.warning("MLflow at %s failed (%s: %s); training continues, and records are kept and "
                            "retried every %g s", self.t.uri, type(err).__name__, str(err).splitlines()[0][:200],
                            self.t.retry_every)
            return False
        if self.failing_since is not None:
            log.warning("MLflow at %s reachable again after %.0f s", self.t.uri, time.monotonic() - self.failing_since)
            self.failing_since = None
        return True

    def _open(self) -> bool:
        if self.t.run_id is not None:
            return True
        return self._attempt(self._open_run)

    def _open_run(self) -> None:
        from mlflow.exceptions import MlflowException

        self.client = self.client or self.mlflow.MlflowClient(self.t.uri)
        experiment = self.client.get_experiment_by_name(self.t.experiment)
        if experiment is None:
            artifacts = None
            if self.t.uri.startswith("sqlite:///"):
                artifacts = (Path(self.t.uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(self.t.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        self._read_view(experiment)
        self.experiment_id = experiment_id
        id_file = self.t.output_dir / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        if run_id is not None:  # a resumed run continues its MLflow run
            try:
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow run %s is gone from %s; starting a new one", run_id, self.t.uri)
                run_id = None
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=self.t.run_name).info.run_id
            id_file.write_text(run_id)
        self.existing_params = set(self.client.get_run(run_id).data.params)
        self.t.run_id = run_id
        log.info("MLflow run %s in %s", run_id, self.t.uri)

    def _read_view(self, experiment) -> None:
        """The metrics the experiment's view charts already (other runs may have widened it)."""
        from wenlan import dashboard

        value = experiment.tags.get(dashboard.TAG_PREFIX + dashboard.VIEW_ID) if experiment is not None else None
        self.view_keys, self.view_created = set(), int(time.time() * 1000)
        if value is None:
            return
        try:
            self.view_keys = dashboard.keys_in_view(value)
            self.view_created = int(json.loads(value).get("createdAt", self.view_created))
        except (ValueError, TypeError, AttributeError):  # edited into something else: set ours anew
            log.warning("the MLflow view %s of experiment %s is not one this version reads; rewriting it",
                        dashboard.VIEW_ID, self.t.experiment)

    def _send_view(self) -> bool:
        """Set (or widen) the experiment's preset view when the run logs a metric it does not chart yet,
        and move its image grid to the newest picture."""
        from wenlan import dashboard

        charted = dashboard.shown(self.metric_keys)
        if charted <= self.view_keys and self.image_step == self.view_image_step:
            return True
        keys, step = self.view_keys | charted, self.image_step
        tag, value = dashboard.view_tag(keys, self.view_created, int(time.time() * 1000), step)
        if not self._attempt(lambda: self.client.set_experiment_tag(self.experiment_id, tag, value)):
            return False
        if not self.view_keys and self.t.uri.startswith(("http://", "https://")):
            log.info("MLflow dashboard: %s", dashboard.view_url(self.t.uri, self.experiment_id))
        self.view_keys, self.view_image_step = keys, step
        return True

    def _send_params(self) -> bool:
        from mlflow.entities import Param

        new = [Param(k, v) for k, v in self.params.items() if k not in self.existing_params]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            chunk = new[i:i + 100]
            if not self._attempt(lambda: self.client.log_batch(self.t.run_id, params=chunk)):
                return False
            self.existing_params.update(p.key for p in chunk)
        self.params = {}
        return True

    def _send_tags(self) -> bool:
        from mlflow.entities import RunTag

        tags = [RunTag(k, v) for k, v in self.tags.items()]
        if tags and not self._attempt(lambda: self.client.log_batch(self.t.run_id, tags=tags)):
            return False
        self.tags = {}
        return True

    def _send_artifacts(self) -> bool:
        """After the metrics: a large file (the exported model) must not hold them back."""
        while self.artifacts:
            kind, payload = self.artifacts[0]
            if kind == "image":
                image, key, step = payload
                upload = functools.partial(self.client.log_image, self.t.run_id, image, key=key, step=step,
                                           synchronous=True)
            else:
                upload = functools.partial(self.client.log_text if kind == "text" else self.client.log_artifact,
                                           self.t.run_id, *payload)
            if not self._attempt(upload):
                return False
            self.artifacts.pop(0)
        return True

    def _send_metrics(self) -> bool:
        while self.metrics:
            chunk = self.metrics[:1000]  # MLflow takes at most 1000 metrics per batch
            if not self._attempt(lambda: self.client.log_batch(self.t.run_id, metrics=chunk)):
                return False
            del self.metrics[:len(chunk)]
        return True

    def _count_unsent(self) -> None:
        if self.metrics:
            self.t.dropped["metric values"] += len(self.metrics)
        if self.params:
            self.t.dropped["params"] += len(self.params)
        if self.artifacts:
            self.t.dropped["artifacts"] += len(self.artifacts)
        if self.tags:
            self.t.dropped["tags"] += len(self.tags)
        if self.t.run_id is None:
            self.t.dropped["run (never opened)"] += 1


class _SystemMetrics:
    """CPU and memory of the host (psutil) and, where nvidia-ml-py finds GPUs, each GPU's utilisation and
    memory, named as MLflow's own system metrics are."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        psutil.cpu_percent()  # the first call only starts the interval
        self.gpus = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.gpus = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - no driver, no GPU, or no nvidia-ml-py: host metrics only
            pass

    def sample(self) -> dict[str, float]:
        memory = self.psutil.virtual_memory()
        out = {"system/cpu_utilization_percentage": self.psutil.cpu_percent(),
               "system/system_memory_usage_megabytes": memory.used / 2**20,
               "system/system_memory_usage_percentage": memory.percent}
        for i, handle in enumerate(self.gpus):
            try:
                use = self.nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception:  # noqa: BLE001 - a GPU that stops answering costs its metrics, nothing else
                continue
            out[f"system/gpu_{i}_utilization_percentage"] = float(use.gpu)
            out[f"system/gpu_{i}_memory_usage_megabytes"] = mem.used / 2**20
        return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
