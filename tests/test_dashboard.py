"""The preset MLflow dashboard (``wenlan.dashboard``) and what every evaluation logs (the retrieval
picture, the R@K tables), from a 2-rank CPU run tracked to a real ``mlflow server``.

Exact values are read through the tracking API; headless Chromium (Debian's, through Playwright) checks
that the UI of the pinned MLflow opens the view with every section's charts drawn, and that the run's
page shows the picture and the system metrics (charts show sampled points, so the browser checks
presence, not numbers). Screenshots are saved beside the run and their folder printed. Without
Chromium the browser test fails under CI and is skipped elsewhere: ``make chromium`` installs it.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from data_tools.make_demo_data import write_demo_shards
from tests.helpers import ROOT, Server, free_port, launch
from wenlan import dashboard

STEPS, EVAL_EVERY, QUEUE = 6, 2, 64
BAD = {"missing_caption": 2, "undecodable_image": 1}  # the first samples of the first train shard, read at step 1
EVAL_STEPS = [2, 4, 6]  # every EVAL_EVERY steps, and at the end
EXPERIMENT = "dashboard"
UI_TIMEOUT_MS = 90_000  # the first page load compiles MLflow's bundle in a cold browser: tens of seconds on 2 cores


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    data = root / "data"
    write_demo_shards(data, n_train=400, n_val=32, seed=0, image_size=64, shard_size=100, quiet=True)
    spoil_first_samples(data / "train-000000.tar")
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 16
    (root / "ds.json").write_text(json.dumps(ds))
    server = Server(root, free_port()).start()
    try:
        out = root / "runs" / "tiny-brivl-seed0"
        launch(2, ["--deepspeed_config", str(root / "ds.json"), "--preset", "tiny", "--tokenizer", str(data / "tokenizer"),
                   "--train-shards", str(data / "train-{000000..000003}.tar"), "--val-shards", str(data / "val-000000.tar"),
                   "--max-steps", str(STEPS), "--eval-every", str(EVAL_EVERY), "--log-every", "1",
                   "--queue-size", str(QUEUE), "--no-color-augment", "--data-streams", "4", "--output-dir", str(out),
                   "--mlflow-uri", server.uri, "--mlflow-experiment", EXPERIMENT])
        import mlflow

        client = mlflow.MlflowClient(server.uri)
        run = client.get_run((out / "mlflow_run_id").read_text().strip())
        yield dict(server=server, client=client, run=run, root=root)
    finally:
        server.kill()


def spoil_first_samples(shard: Path) -> None:
    """Two samples without a caption, then one whose image does not decode (BAD), the rest as they were."""
    import webdataset as wds

    from data_tools.shard_io import read_samples

    samples = list(read_samples(shard))
    for sample in samples[:2]:
        del sample["txt"]
    samples[2]["jpg"] = b"not a jpeg"
    with wds.TarWriter(str(shard), encoder=False, mtime=0) as sink:
        for sample in samples:
            sink.write(sample)


def test_the_view_charts_what_the_run_logged_and_every_evaluation_left_a_picture_and_tables(tracked_run):
    import mlflow

    assert mlflow.__version__ == dashboard.MLFLOW_VERSION, "a new MLflow: check wenlan/dashboard.py's view format"
    client, run = tracked_run["client"], tracked_run["run"]
    experiment = client.get_experiment(run.info.experiment_id)
    tag = dashboard.TAG_PREFIX + dashboard.VIEW_ID
    assert tag in experiment.tags, sorted(experiment.tags)
    envelope = json.loads(experiment.tags[tag])
    assert envelope["name"] == dashboard.VIEW_NAME and envelope["createdAt"] <= envelope["updatedAt"]
    state = dashboard.parse_view(experiment.tags[tag])
    metrics = set(run.data.metrics)

    # Every chart names a metric (or image) the run has; every metric a section lists and the run logged is charted.
    in_view = dashboard.keys_in_view(experiment.tags[tag])
    assert in_view <= metrics | {"retrieval"}, in_view - metrics
    assert {key for keys in dashboard.charted(metrics).values() for key in keys} <= in_view
    sections = {s["uuid"]: s["name"] for s in state["compareRunSections"]}
    assert list(sections.values()) == [name for name, _ in dashboard.SECTIONS]
    by_section = {}
    for chart in state["compareRunCharts"]:
        by_section.setdefault(sections[chart["metricSectionId"]], []).append(chart)
    assert all(by_section.get(name) for name, _ in dashboard.SECTIONS), {k: len(v) for k, v in by_section.items()}
    pictures = [c for c in state["compareRunCharts"] if c["type"] == "IMAGE"]
    assert [(c["imageKeys"], c["step"]) for c in pictures] == [(["retrieval"], EVAL_STEPS[-1])]  # the newest
    scales = {c["metricKey"]: c["scaleType"] for c in state["compareRunCharts"] if c["type"] == "LINE"}
    assert scales["loss"] == scales["loss_i2t"] == scales["loss_t2i"] == "log" and scales["eval/r1_i2t"] == "linear"
    assert {"queue_fill", "eval/r10_t2i", "samples_per_s", "time/forward_backward", "data_wait", "grad_norm",
            "skipped_samples", "restarts", "system/cpu_utilization_percentage"} <= in_view
    assert {f"skipped/{reason}" for reason in BAD} <= in_view
    skipped = {key: sum(m.value for m in client.get_metric_history(run.info.run_id, key))
               for key in ["skipped_samples", *(f"skipped/{reason}" for reason in BAD)]}
    assert skipped == {"skipped_samples": sum(BAD.values()), **{f"skipped/{r}": n for r, n in BAD.items()}}
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "queue_fill")}
    assert history == {step: min(1.0, 32 * step / QUEUE) for step in range(1, STEPS + 1)}  # global batch 32

    # The retrieval picture of every evaluation, at its step (MLflow's image grid reads these names).
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    steps = sorted(int(re.match(r"images/retrieval\+step\+(\d+)\+.*\.png$", p).group(1))
                   for p in images if p.endswith(".png"))
    assert steps == EVAL_STEPS, images
    assert run.data.tags.get("mlflow.loggedImages") == "True"
    # ... and its R@K table and metrics, one of each per evaluation, the same numbers as eval/* at that step.
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert tables == {f"eval/step-{s:08d}.{ext}" for s in EVAL_STEPS for ext in ("json", "txt")}
    for step in EVAL_STEPS:
        logged = json.loads(Path(client.download_artifacts(run.info.run_id, f"eval/step-{step:08d}.json",
                                                           str(tracked_run["root"]))).read_text())
        assert logged["r5_t2i"] == next(m.value for m in client.get_metric_history(run.info.run_id, "eval/r5_t2i")
                                        if m.step == step)
        table = Path(client.download_artifacts(run.info.run_id, f"eval/step-{step:08d}.txt",
                                               str(tracked_run["root"]))).read_text()
        assert "image->text" in table and f"{logged['r1_i2t']:.3f}" in table

    # What groups the runs of an ablation: its name and the tags the view's table shows.
    assert run.info.run_name == "tiny-brivl-seed0"
    assert (run.data.tags["wenlan.preset"], run.data.tags["wenlan.objective"], run.data.tags["wenlan.seed"]) == \
        ("tiny", "brivl", "0")
    assert {c.split("`")[1] for c in state["selectedColumns"] if c.startswith("tags.")} <= set(run.data.tags)


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "Debian's chromium is not installed: `make chromium` (as root) installs it and a CJK font"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def close_assistant(page) -> None:
    """MLflow 3.17's chat panel opens beside every page and takes a third of its width."""
    close = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
    try:
        close.click(timeout=15_000)
    except Exception:  # noqa: BLE001 - no panel (another MLflow build): nothing to close
        pass


def test_the_dashboard_and_the_run_page_in_a_browser(tracked_run):
    executable = chromium()
    from playwright.sync_api import expect, sync_playwright

    client, run, server = tracked_run["client"], tracked_run["run"], tracked_run["server"]
    experiment_id = run.info.experiment_id
    in_view = dashboard.keys_in_view(client.get_experiment(experiment_id).tags[dashboard.TAG_PREFIX + dashboard.VIEW_ID])
    shots = tracked_run["root"] / "screenshots"
    shots.mkdir()
    print(f"\nscreenshots: {shots}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 4000})  # tall: every chart in view draws
            page.set_default_timeout(UI_TIMEOUT_MS)
            # The UI polls the server for ever: wait on what it draws, never on an idle network.
            page.goto(dashboard.view_url(server.uri, experiment_id))
            close_assistant(page)
            cards = page.get_by_test_id("experiment-view-compare-runs-card")
            for section, keys in dashboard.charted(in_view).items():
                header = page.get_by_test_id("experiment-view-compare-runs-section-header").filter(
                    has=page.get_by_text(section, exact=True))
                shown = len(keys) + sum(1 for key, where in dashboard.IMAGES.items() if where == section and key in in_view)
                expect(header).to_contain_text(f"({shown})")
                # The UI renders a section's cards only once the section nears the viewport: bring it there.
                header.scroll_into_view_if_needed()
                for key in keys:  # a line drawn from the run's points in every chart
                    card = cards.filter(has=page.locator(f'h4[title="{key}"]'))
                    card.scroll_into_view_if_needed()
                    expect(card.locator(".js-plotly-plot .scatterlayer .trace").first).to_be_attached()
            page.get_by_test_id("experiment-view-compare-runs-section-header").filter(
                has=page.get_by_text(dashboard.IMAGES["retrieval"], exact=True)).scroll_into_view_if_needed()
            picture = cards.filter(has=page.locator('h4[title="retrieval"]'))  # opened at the newest picture
            picture.scroll_into_view_if_needed()
            expect(picture.locator("img").first).to_be_visible()
            page.screenshot(path=str(shots / "dashboard.png"))

            base = f"{server.uri}/#/experiments/{experiment_id}/runs/{run.info.run_id}"
            # The run page charts every metric in MLflow's own order, the picture last; cards render only
            # near the viewport, so the page is made tall enough to hold them all.
            page.set_viewport_size({"width": 1500, "height": 12000})
            page.goto(f"{base}/model-metrics")
            close_assistant(page)
            picture = cards.filter(has=page.locator('h4[title="retrieval"]'))
            picture.scroll_into_view_if_needed()
            slider = picture.get_by_role("slider")  # the grid's step slider, over the steps with a picture
            expect(slider).to_have_attribute("aria-valuemax", str(EVAL_STEPS[-1]))
            image = picture.locator("img").first
            slider.focus()  # from the card's initial step 0 to the first evaluation's picture
            page.keyboard.press("ArrowRight")
            expect(image).to_have_attribute("src", re.compile(rf"retrieval%2Bstep%2B{EVAL_STEPS[0]}%2B"))
            picture.get_by_role("spinbutton").click()  # the step box beside it: the last evaluation's
            page.keyboard.press("Control+A")
            page.keyboard.type(str(EVAL_STEPS[-1]))
            page.keyboard.press("Tab")
            expect(image).to_have_attribute("src", re.compile(rf"retrieval%2Bstep%2B{EVAL_STEPS[-1]}%2B"))
            page.screenshot(path=str(shots / "run-model-metrics.png"))
            page.goto(f"{base}/system-metrics")
            for key in (k for k in run.data.metrics if k.startswith("system/")):
                expect(cards.filter(has=page.locator(f'h4[title="{key}"]'))).to_be_visible()
            page.screenshot(path=str(shots / "run-system-metrics.png"))
        finally:
            browser.close()
