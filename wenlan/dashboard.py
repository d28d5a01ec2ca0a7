"""The preset MLflow dashboard: a saved chart view on the experiment with four sections (Learning,
Speed, Health, System) over the metrics training logs, and the runs table's columns that tell the
runs of an ablation apart.

It matches the UI of mlflow 3.17.2 (``requirements.txt``), which stores saved views as experiment tags
``mlflow.sharedViewState.<id>`` and opens one at ``#/experiments/<experiment id>/runs?viewStateShareKey=<id>``.
The format is not documented; it is read from that version's frontend bundle
(``mlflow/server/js/build/static/js``: the ``sharedViewState`` saved-view code). The tag holds a JSON
envelope ``{"name", "createdAt", "updatedAt", "state"}`` (milliseconds, at most 20,000 characters in
all); ``state`` is a JSON string, or ``deflate;`` + base64 of its zlib stream as the UI itself writes
it and as here (26 charts: ~16,000 characters of plain JSON, ~2,500 deflated), of the experiment
page's search facets and UI state, of which the view uses ``compareRunCharts`` (chart cards),
``compareRunSections`` (their sections), ``isAccordionReordered`` (keep the sections in this order),
``selectedColumns`` and ``hideEmptyCharts``; the UI fills every other field with its default. A card
is the UI's ``RunsChartsLineCardConfig`` as its constructor sets it. The UI adds a generated chart for
every metric that no card has as ``metricKey``, in a section named after the metric's prefix: so every
metric here has a card of its own, and whatever is left (``lr``, ``eval/mean_recall`` ...) still shows,
after these sections. A new MLflow version may change all this: ``tests/test_dashboard.py`` opens the
view in a real browser.
"""

import base64
import json
import uuid
import zlib

MLFLOW_VERSION = "3.17.2"  # tests/test_dashboard.py fails on another: check the format there first
TAG_PREFIX = "mlflow.sharedViewState."
VIEW_ID = "wenlan-training"
"""One fixed id, so that every run of the experiment updates the same view and its URL never changes."""
VIEW_NAME = "WenLan training"
MAX_TAG_CHARS = 20_000  # the longest experiment tag value MLflow stores; the UI saves no larger view
DEFLATE = "deflate;"

LOG = "log"
KS = (1, 5, 10)

# (section, [(metric key, y scale)]): the metric names wenlan/train.py (StepLog, evaluate) and
# wenlan/tracking.py (system metrics) log; "PREFIX/*": every metric under PREFIX/ (their names depend on
# the run: GPUs, skip reasons). A chart appears only once its metric is logged.
SECTIONS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Learning", [("loss", LOG), ("loss_i2t", LOG), ("loss_t2i", LOG), ("acc_i2t", "linear"), ("temperature", LOG), ("queue_fill", "linear")]
     + [(f"eval/r{k}_{d}", "linear") for d in ("i2t", "t2i") for k in KS]),
    ("Speed", [("samples_per_s", "linear"), ("tflops_per_device", "linear"), ("mfu", "linear"),
               ("data_wait", "linear"), ("time/forward_backward", "linear"), ("time/optimizer", "linear"),
               ("time/ema", "linear"), ("time/enqueue", "linear"), ("time/eval", "linear")]),
    ("Health", [("grad_norm", LOG), ("skipped_samples", "linear"), ("skipped/*", "linear"),
                ("eval/skipped", "linear"), ("restarts", "linear"), ("peak_memory_gb", "linear")]),
    ("System", [("system/*", "linear")]),
]
SYSTEM_PREFIX = "system/"
IMAGES = {"retrieval": "Learning"}
"""Image keys (``Tracker.log_image``) -> their section: an image grid with a step slider."""

COLUMNS = ["tags.`wenlan.objective`", "tags.`wenlan.preset`", "tags.`wenlan.seed`", "tags.`wenlan.strategy`",
           "tags.`wenlan.world_size`", "metrics.`eval/mean_recall`", "metrics.`eval/r1_i2t`",
           "metrics.`eval/r1_t2i`"]
"""The runs table's columns: what groups an ablation's runs and how they compare."""


def _uuid(name: str) -> str:
    """A stable id per section and chart, so that rewriting the view changes nothing the UI keys on."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"wenlan-dashboard/{name}").hex


def line_chart(key: str, scale: str, section_id: str) -> dict:
    system = key.startswith(SYSTEM_PREFIX)  # sampled on a clock, not per step: plotted against time
    return {"uuid": _uuid(key), "type": "LINE", "runsCountToCompare": 10, "metricSectionId": section_id,
            "deleted": False, "isGenerated": False, "displayName": key, "metricKey": key,
            "selectedMetricKeys": [key], "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": scale,
            "range": {}, "xAxisKey": "time" if system else "step", "selectedXAxisMetricKey": "",
            "yAxisKey": "metric", "yAxisExpressions": [], "ignoreOutliers": False,
            "useGlobalXaxisKey": not system, "useGlobalLineSmoothing": True}


def image_chart(key: str, section_id: str, step: int) -> dict:
    """An image grid opened at ``step`` (the UI shows "No image logged at this step" elsewhere; its
    slider moves through the logged steps)."""
    return {"uuid": _uuid(f"image/{key}"), "type": "IMAGE", "runsCountToCompare": 10, "metricSectionId": section_id,
            "deleted": False, "isGenerated": False, "displayName": key, "imageKeys": [key], "step": step,
            "showRunParams": False}


def charted(metric_keys) -> dict[str, list[str]]:
    """Section -> the metric keys of ``metric_keys`` charted in it, in the view's order (images aside)."""
    keys = set(metric_keys)
    out = {}
    for section, charts in SECTIONS:
        out[section] = []
        for key, _ in charts:
            if key.endswith("/*"):
                out[section] += sorted(k for k in keys if k.startswith(key[:-1]))
            elif key in keys:
                out[section].append(key)
    return out


def view_state(keys, image_step: int = 0) -> dict:
    """The UI state of the view, charting the metrics and images of ``keys`` that the sections name,
    the images at ``image_step``."""
    scales = {key.removesuffix("*"): scale for _, charts in SECTIONS for key, scale in charts}
    sections, charts = [], []
    for section, metrics in charted(keys).items():
        section_id = _uuid(f"section/{section}")
        sections.append({"uuid": section_id, "name": section, "display": True, "isReordered": True,
                         "deleted": False, "isGenerated": False})
        charts += [line_chart(key, scales.get(key, scales.get(key.split("/")[0] + "/", "linear")), section_id)
                   for key in metrics]
        charts += [image_chart(key, section_id, image_step) for key, where in IMAGES.items() if where == section and key in keys]
    return {"compareRunCharts": charts, "compareRunSections": sections, "isAccordionReordered": True,
            "hideEmptyCharts": True, "selectedColumns": COLUMNS}


def shown(keys) -> set[str]:
    """The metric and image keys of ``keys`` that the view shows."""
    return {key for metrics in charted(keys).values() for key in metrics} | (set(keys) & set(IMAGES))


def view_tag(metric_keys, created_ms: int, updated_ms: int, image_step: int = 0) -> tuple[str, str]:
    """(experiment tag key, value) of the view over ``metric_keys`` (and image keys, at ``image_step``)."""
    state = json.dumps(view_state(metric_keys, image_step), separators=(",", ":")).encode()
    envelope = {"name": VIEW_NAME, "createdAt": created_ms, "updatedAt": updated_ms,
                "state": DEFLATE + base64.b64encode(zlib.compress(state, 9)).decode()}
    value = json.dumps(envelope, separators=(",", ":"))
    if len(value) > MAX_TAG_CHARS:  # hundreds of GPUs on one host: their charts are left to the UI
        return view_tag([k for k in metric_keys if not k.startswith(SYSTEM_PREFIX)], created_ms, updated_ms, image_step)
    return TAG_PREFIX + VIEW_ID, value


def parse_view(value: str) -> dict:
    """A view tag's value -> its UI state (a plain JSON state, the older format, is accepted too)."""
    data = json.loads(value)
    if isinstance(data, dict) and isinstance(data.get("state"), str):
        data = data["state"]
        if data.startswith(DEFLATE):
            data = zlib.decompress(base64.b64decode(data[len(DEFLATE):])).decode()
        return json.loads(data)
    return data


def keys_in_view(value: str) -> set[str]:
    """The metric and image keys a view tag's charts show."""
    return {key for chart in parse_view(value).get("compareRunCharts", [])
            for key in chart.get("imageKeys") or chart.get("selectedMetricKeys") or [chart.get("metricKey")] if key}


def view_url(tracking_uri: str, experiment_id: str) -> str:
    """The address that opens the view in the charts tab of the experiment's runs page."""
    return (f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?viewStateShareKey={VIEW_ID}&compareRunsMode=CHART")
