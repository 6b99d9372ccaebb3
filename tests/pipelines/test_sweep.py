"""`sweep` on the shared Ray with tiny phantoms and a tiny generator: MLflow runs, resume, report, bad input."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctsynth_ray.cli.main import app
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.pipelines.generate import GenerateOptions, generate
from ctsynth_ray.pipelines.runtime import RayOptions
from ctsynth_ray.pipelines.sweep import SweepOptions, report_from_folder, run_sweep

CHROMIUM = "/usr/bin/chromium"  # Debian's package (make browser); Playwright's own download is not used
TINY = {"iterations": 4, "patch": 32, "batch": 2, "features": (4, 8, 16), "samples_per_volume": 2}


def silent(*_) -> None:
    """Print nothing."""


@pytest.fixture(scope="module")
def synthetic(tiny_generator, tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("sweep-synth") / "synth"
    generate(GenerateOptions(n=4, model=str(tiny_generator), out=str(out), chunk=2), RayOptions(progress=False),
             echo=silent)  # fmt: skip
    return out


def options(gan_data, synthetic, tmp_path, **kwargs) -> SweepOptions:
    dataset = gan_data.parent / "ds"
    return SweepOptions(**{"real": str(dataset), "synthetic": str(synthetic), "val": f"{dataset}:test",
                           "out": str(tmp_path / "sweep"), "preset": "ratio", "total": 2, "fractions": (1.0,),
                           "seeds": 1, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                           "experiment": "sweep-test", **TINY, **kwargs})  # fmt: skip


TRIAL_TITLES = (b"ray::ImplicitFunc", b"ray::RayTrainWorker", b"ray::TrainController")  # Tune's trial, Train's


@pytest.fixture(scope="module")
def finished_sweep(gan_data, synthetic, tmp_path_factory, ray_session):
    opts = options(gan_data, synthetic, tmp_path_factory.mktemp("finished-sweep"))
    return opts, run_sweep(opts, echo=silent)


def test_sweep_logs_nested_runs_comparisons_and_a_report(finished_sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    opts, summary = finished_sweep
    assert summary.trials == 2 and summary.finished == 2 and not summary.failed
    client = MlflowClient(opts.tracking_uri)
    experiment = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("ctsynth.kind") == "sweep"]
    children = {r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert set(children) == {"real-only-seed0", "synthetic-100%-seed0"} and len(runs) == 3
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert all(r.info.status == "FINISHED" for r in runs)
    synth = children["synthetic-100%-seed0"]
    assert {k: synth.data.params[k] for k in ("setup", "real_n", "synthetic_n", "fraction", "seed", "iterations")} == {
        "setup": "synthetic-100%", "real_n": "0", "synthetic_n": "2", "fraction": "1.0", "seed": "0", "iterations": "4"}  # fmt: skip
    assert sorted(m.step for m in client.get_metric_history(synth.info.run_id, "loss")) == [1, 2, 3, 4]
    for key in ("val_dice", "vs_baseline_p_dice", "vs_baseline_diff_dice", "vs_baseline_wilcoxon_p_sensitivity"):
        assert key in synth.data.metrics, key
    assert "vs_baseline_p_dice" not in children["real-only-seed0"].data.metrics
    assert "metrics.csv" in {a.path for a in client.list_artifacts(synth.info.run_id)}
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparisons.json", "report"} <= parent_artifacts
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert parent.data.params["preset"] == "ratio" and parent.data.params["trials"] == "2"
    # Every experiment, "Default" included, keeps its artifacts beside the store (not in a Ray or working folder).
    artifacts = (Path(opts.tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    assert {e.name for e in client.search_experiments()} == {"Default", "sweep-test"}
    assert all(e.artifact_location.startswith(artifacts) for e in client.search_experiments())

    report = summary.report
    assert "synthetic-100%" in report["report"].read_text() and report["setups.png"].is_file()
    # The report rebuilt from MLflow alone says the same.
    result = CliRunner().invoke(app, ["report", "--experiment", "sweep-test", "--tracking-uri", opts.tracking_uri,
                                      "--out", str(tmp_path / "from-mlflow")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-mlflow" / "results.csv").read_text() == report["results"].read_text()
    again = report_from_folder(opts.out, tmp_path / "from-folder")
    assert again["results"].read_text() == report["results"].read_text()

    with pytest.raises(CtsynthError, match="holds an earlier sweep"):
        run_sweep(opts, echo=silent)
    with pytest.raises(CtsynthError, match="iterations differ"):
        run_sweep(SweepOptions(**{**opts.__dict__, "iterations": 9}), resume=True, echo=silent)


def test_an_interrupted_sweep_resumed_reruns_no_finished_trial(gan_data, synthetic, tmp_path, ray_session,
                                                               ray_processes):  # fmt: skip
    from mlflow.tracking import MlflowClient

    opts = options(gan_data, synthetic, tmp_path, iterations=20, max_concurrent=1, samples_per_volume=8)  # the CLI's
    address = ray_session.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "ctsynth_ray.cli.main", "sweep", "--real", opts.real, "--synthetic",
               opts.synthetic, "--val", opts.val, "--out", opts.out, "--preset", "ratio", "--total", "2",
               "--fractions", "1", "--seeds", "1", "--iterations", "20", "--max-concurrent", "1", "--patch", "32",
               "--batch", "2", "--features", "4,8,16", "--tracking-uri", opts.tracking_uri, "--experiment",
               "sweep-test", "--address", address]  # fmt: skip
    earlier = set(ray_processes(*TRIAL_TITLES))  # other tests' (ended) trials may still be going away
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = Path(opts.out) / "trials"
    deadline = time.monotonic() + 240
    while not any((trials / name / "model.pt").exists() for name in ("real-only-seed0", "synthetic-100%-seed0")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    while set(ray_processes(*TRIAL_TITLES)) - earlier:  # the dead driver's trials die with it, a moment later
        assert time.monotonic() < deadline, [(Path(f"/proc/{pid}/cmdline").read_bytes()[:60], pid)
                                             for pid in set(ray_processes(*TRIAL_TITLES)) - earlier]  # fmt: skip
        time.sleep(0.1)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in trials.glob("*/model.pt")}
    assert len(finished) == 1
    summary = run_sweep(opts, resume=True, echo=silent)
    assert summary.finished == 2 and not summary.failed
    assert {p.parent.name: p.stat().st_mtime_ns for p in trials.glob("*/model.pt") if p.parent.name in finished} == (
        finished
    )  # not rerun
    client = MlflowClient(opts.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)  # no duplicate runs


def test_sweeps_that_cannot_run_are_refused_before_ray(gan_data, synthetic, tmp_path):
    dataset = gan_data.parent / "ds"
    with pytest.raises(CtsynthError, match=r"set-up real-only needs 50 real \(train\) volume\(s\), but there are"):
        run_sweep(options(gan_data, synthetic, tmp_path, total=50), echo=silent)
    with pytest.raises(CtsynthError, match=r"set-up real-only: .*validation"):
        run_sweep(options(gan_data, synthetic, tmp_path, val=f"{dataset}:train"), echo=silent)
    with pytest.raises(CtsynthError, match="no sweep to resume"):
        run_sweep(options(gan_data, synthetic, tmp_path), resume=True, echo=silent)
    assert not (tmp_path / "sweep").exists()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "sweep.json").write_text("{not json")
    with pytest.raises(CtsynthError, match=r"broken/sweep.json: not a sweep plan ctsynth can read"):
        run_sweep(options(gan_data, synthetic, tmp_path, out=str(tmp_path / "broken")), resume=True, echo=silent)
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", "--real", str(dataset), "--synthetic", str(synthetic), "--val",
                                 f"{dataset}:test", "--out", str(tmp_path / "s"), "--fractions", "0.5,2"])  # fmt: skip
    assert result.exit_code == 2 and "--fractions must lie in [0, 1]" in result.output
    result = runner.invoke(app, ["report", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "give a SWEEP folder or --experiment" in result.output
    result = runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and f"{tmp_path.resolve()}: not a sweep folder" in result.output


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ui_shows_the_sweep_in_a_real_browser(finished_sweep, tmp_path):
    """`ctsynth ui` on loopback; headless Chromium (Debian's, driven by Playwright) opens the runs table it prints,
    finds the sweep and its trials, adds a metric column, then opens the printed compare view of the trials."""
    import os
    import urllib.request

    from playwright.sync_api import sync_playwright

    opts, summary = finished_sweep
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "ctsynth_ray.cli.main", "ui", "--port", str(port), "--tracking-uri",
                           opts.tracking_uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)  # fmt: skip
    try:
        lines = [ui.stdout.readline() for _ in range(3)]
        runs_url = next(line.split()[-1] for line in lines if "sweep-test" in line)
        compare_url = next(line.split()[-1] for line in lines if "side by side" in line)
        assert runs_url == f"http://127.0.0.1:{port}/#/experiments/{summary.experiment_id}/runs", lines
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline and ui.poll() is None, "the MLflow UI did not start"
                time.sleep(0.5)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                                       "--disable-background-networking", "--disable-component-update"])  # fmt: skip
            page = browser.new_page(viewport={"width": 2200, "height": 900})
            page.goto(runs_url)
            sweep_row = page.locator('[role="row"]', has_text="sweep").first
            sweep_row.wait_for(timeout=60_000)
            sweep_row.locator('[col-id="attributes.`Run Name`"] button').first.click()  # show its child runs
            for name in ("real-only-seed0", "synthetic-100%-seed0"):
                page.get_by_text(name, exact=True).first.wait_for(timeout=20_000)
            page.get_by_role("button", name="Columns").click()
            page.get_by_text("val_dice", exact=True).first.click()
            page.keyboard.press("Escape")
            header = page.locator('[role="columnheader"]', has_text="val_dice").first
            header.wait_for(timeout=20_000)
            header.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "runs-table.png"))
            page.goto(compare_url)
            for text in ("fraction", "val_dice", "vs_baseline_p_dice", "synthetic-100%-seed0"):
                page.get_by_text(text, exact=True).first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
            browser.close()
        for shot in ("runs-table.png", "compare.png"):
            assert (tmp_path / shot).read_bytes()[:4] == b"\x89PNG"
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def test_a_failed_trial_is_reported_and_the_sweep_goes_on_then_resume_reruns_it(gan_data, synthetic, tmp_path,
                                                                                   ray_session):  # fmt: skip
    import shutil

    broken = tmp_path / "synth"
    shutil.copytree(synthetic, broken)
    for image in (broken / "images").iterdir():
        image.write_bytes(b"not a NIfTI file")
    opts = options(gan_data, broken, tmp_path)
    summary = run_sweep(opts, echo=silent)
    assert summary.finished == 1 and len(summary.failed) == 1
    assert summary.failed[0].startswith("synthetic-100%-seed0: ")
    assert "synthetic-100%" not in summary.report["report"].read_text()  # the report of what finished
    baseline_model = Path(opts.out) / "trials" / "real-only-seed0" / "model.pt"
    before = baseline_model.stat().st_mtime_ns
    shutil.rmtree(broken / "images")
    shutil.copytree(synthetic / "images", broken / "images")
    resumed = run_sweep(opts, resume=True, echo=silent)
    assert resumed.finished == 2 and not resumed.failed and baseline_model.stat().st_mtime_ns == before
    assert "synthetic-100%" in resumed.report["report"].read_text()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(opts.tracking_uri)
    table = json.loads(
        Path(client.download_artifacts(resumed.parent_run_id, "comparisons.json", str(tmp_path))).read_text()
    )
    assert len(table["rows"]) == 3  # one set-up x one seed x three metrics: the resumed sweep replaced it
    runs = client.search_runs([resumed.experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)


def test_ui_refuses_a_missing_store_and_a_busy_port_and_warns_of_temporary_artifacts(finished_sweep, tmp_path):
    import socket

    from ctsynth_ray.pipelines.ui import ExperimentLink, experiment_links, temporary_artifacts

    runner = CliRunner()
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    result = runner.invoke(app, ["ui", "--tracking-uri", missing])
    assert result.exit_code == 1 and f"ctsynth: error: {missing}: no MLflow store there yet" in result.output
    assert not (tmp_path / "none.db").exists()
    opts, _ = finished_sweep
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["ui", "--port", str(port), "--tracking-uri", opts.tracking_uri])
    assert result.exit_code == 1 and f"127.0.0.1:{port}: cannot listen there" in result.output
    (link,) = [x for x in experiment_links(opts.tracking_uri, 5000) if x.name == "sweep-test"]
    assert temporary_artifacts([link]) == []
    in_ray = ExperimentLink("old", "0", 1, link.url, "/tmp/ray/session_2026-11-01_00-00-00_1/mlruns/0", {})
    assert "a temporary folder" in temporary_artifacts([in_ray])[0]
