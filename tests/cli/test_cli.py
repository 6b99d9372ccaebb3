import json
import re

import pytest
from typer.testing import CliRunner

from ctsynth_ray import __version__
from ctsynth_ray.cli.main import app
from ctsynth_ray.dataset import read_manifest
from ctsynth_ray.seg_metrics import read_scores_csv

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ctsynth {__version__}"


def test_phantom_then_inspect_with_preview(tmp_path):
    out = tmp_path / "ds"
    result = runner.invoke(app, ["phantom", "--n", "3", "--out", str(out), "--shape", "96,80,48", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert len(read_manifest(out)) == 3
    result = runner.invoke(app, ["inspect", str(out), "--preview", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "3 volume(s)" in result.output and (tmp_path / "p.png").is_file()


def test_phantom_refuses_an_existing_dataset_without_overwrite(tmp_path):
    out = tmp_path / "ds"
    args = ["phantom", "--n", "2", "--out", str(out), "--shape", "64,64,40"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert re.search(r"ctsynth: error: .*ds: already exists and is not empty", result.output)
    assert "Traceback" not in result.output
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0


@pytest.mark.parametrize(
    "args, message",
    [(["--shape", "10,10,10"], "at least 32"), (["--shape", "a,b"], "3 comma-separated"),
     (["--split", "0.5,0.5,0.5"], "sum to 1"), (["--n", "0"], "--n"), (["--shape", "64.5,64,64"], "whole numbers")],
)  # fmt: skip
def test_usage_errors_exit_2(tmp_path, args, message):
    base = {"--n": "2", "--out": str(tmp_path / "x")}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    result = runner.invoke(app, ["phantom", *[t for kv in base.items() for t in kv]])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "x").exists()


def test_inspect_of_a_broken_dataset_exits_1_naming_the_volume(copy_dataset):
    root = copy_dataset()
    row = read_manifest(root)[0]
    (root / row["mask"]).unlink()
    result = runner.invoke(app, ["inspect", str(root)])
    assert result.exit_code == 1
    assert f"{row['volume_id']}: " in result.output and "file not found" in result.output
    assert "Traceback" not in result.output


def test_inspect_of_a_folder_without_manifest(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "no manifest" in result.output


def test_demo_runs_the_chain_and_lists_outputs(tmp_path, ray_session):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--n", "8", "--generated", "3", "--workers",
                                 "2", "--gan-steps", "4", "--seg-iterations", "2", "--tracking-uri", uri])  # fmt: skip
    assert result.exit_code == 0, result.output
    for k in range(1, 13):
        assert result.output.count(f"[{k}/12]") == 1
    assert "compare real-only (baseline) with the half-synthetic set" in result.output and "t-test p" in result.output
    demo = (tmp_path / "demo").resolve()
    for output in ("phantoms", "phantoms-preview.png", "lidc-style", "ingested", "ingested/ingest_report.json",
                   "phantoms/labels", "phantoms/prepare.json", "gan-data", "gan-data/nodule_bank.parquet",
                   "synthetic-labels", "synthetic-labels-preview.png", "gan-run/generator.pt", "gan-run/generator.json",
                   "synthetic", "synthetic-preview.png", "seg-real-only/model.pt", "seg-real-only/metrics.csv",
                   "segment-test", "segment-test.csv", "sweep", "sweep/report/report.md",
                   "sweep/report/report.html", "audit/audit.json", "audit/audit.html", "audit/turing.html",
                   "synthetic-by-job"):  # fmt: skip
        assert str(demo / output) in result.output
        assert (demo / output).exists()
    assert len(read_manifest(demo / "ingested")) == 2
    audit = json.loads((demo / "audit" / "audit.json").read_text())
    assert audit["n_synthetic"] == 3 and audit["real"].endswith(":test") and len(audit["turing"]["answers"]) == 8
    generated = read_manifest(demo / "synthetic")
    assert len(generated) == 3 and all(r["image"] and r["source"] == "synthetic" for r in generated)
    # The demo never trains on a volume it scores: the U-Nets are scored on val; the sweep's mixed trials trained on
    # test phantoms and generated volumes cut from train phantoms.
    phantoms = read_manifest(demo / "phantoms")
    val = {r["volume_id"] for r in phantoms if r["split"] == "val"}
    assert {r["source_volume_id"] for r in generated} <= {r["volume_id"] for r in phantoms if r["split"] == "train"}
    assert set(read_scores_csv(demo / "sweep" / "trials" / "synthetic-50%-seed0" / "metrics.csv")) == val
    assert "ctsynth: warning" not in result.output  # the mixed set's real part never trained the GAN
    assert "sweep: 3 of 3 trial(s) finished" in result.output and f"ctsynth ui --tracking-uri {uri}" in result.output
    # the last step: generate submitted as a Ray job to a cluster of the demo's own, written through a file:// URI
    assert len(read_manifest(demo / "synthetic-by-job")) == 2
    assert re.search(r"job raysubmit_\w+ SUCCEEDED", result.output) and "generate --n 2" in result.output


def test_ingest_lidc_reports_failed_cases_and_exits_1(test_data, tmp_path):
    """A series with the XML of a series that is not there: the series is ingested, the orphan is a failed case."""
    import shutil

    import numpy as np

    from ctsynth_ray.dataset import Volume, centred_affine
    from ctsynth_ray.ingest.export import write_dicom_series

    shape = (16, 16, 3)
    write_dicom_series(Volume("P1", np.zeros(shape, np.int16), np.zeros(shape, np.uint8),
                              centred_affine(shape, (0.7, 0.7, 2.5))), tmp_path / "src" / "P1", patient_id="P1")  # fmt: skip
    shutil.copy(test_data / "lidc" / "xml-only" / "071.xml", tmp_path / "src")
    result = runner.invoke(app, ["ingest", "lidc", str(tmp_path / "src"), "--out", str(tmp_path / "ds")])
    assert result.exit_code == 1
    assert "ctsynth: error: case 071: " in result.output and "071.xml: no DICOM series" in result.output
    assert "Traceback" not in result.output and [r["volume_id"] for r in read_manifest(tmp_path / "ds")] == ["P1"]
    # Only the orphan: nothing to ingest, one line, nothing written.
    result = runner.invoke(app, ["ingest", "lidc", str(test_data / "lidc" / "xml-only"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "no DICOM series found: nothing to ingest (1 problem(s)" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()
    assert (tmp_path / "ds" / "ingest_report.json").is_file()


@pytest.mark.parametrize("kind", ["lidc", "nifti"])
def test_ingest_of_a_folder_with_nothing_to_ingest_is_an_error(kind, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("no scans here")
    result = runner.invoke(app, ["ingest", kind, str(tmp_path / "src"), "--out", str(tmp_path / "ds")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert f"ctsynth: error: {tmp_path / 'src'}: no " in result.output and "nothing to ingest" in result.output
    assert not (tmp_path / "ds").exists()


def test_ingest_lidc_of_exported_phantoms_on_two_ray_workers(tmp_path, ray_session, small_phantom_config):
    from ctsynth_ray.ingest.export import export_lidc_case
    from ctsynth_ray.phantom import make_phantom

    for i in range(2):
        export_lidc_case(make_phantom(1, i, small_phantom_config).volume, tmp_path / "src")
    out = tmp_path / "ds"
    result = runner.invoke(app, ["ingest", "lidc", str(tmp_path / "src"), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "ingested 2 volume(s)" in result.output
    assert sorted(r["volume_id"] for r in read_manifest(out)) == ["phantom-s1-00000", "phantom-s1-00001"]


def test_ingest_nifti_bad_spacing_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["ingest", "nifti", str(tmp_path), "--out", str(tmp_path / "o"), "--spacing", "1,0,1"])
    assert result.exit_code == 2 and "--spacing" in result.output


def test_prepare_and_synth_labels_from_the_cli(copy_dataset, tmp_path):
    dataset = copy_dataset()
    result = runner.invoke(app, ["prepare", str(dataset), "--out", str(tmp_path / "gan"), "--size", "32",
                                 "--dims", "2,3", "--templates", "all"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "GAN data in" in result.output and (tmp_path / "gan" / "gan_data.json").is_file()
    assert not list((tmp_path / "gan" / "train").glob("2p5d-*"))
    result = runner.invoke(app, ["synth-labels", "--n", "5", "--source", str(dataset), "--out", str(tmp_path / "sl"),
                                 "--size", "48", "--seed", "3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote 5 label volume(s)" in result.output
    rows = read_manifest(tmp_path / "sl")
    assert len(rows) == 5 and all(r["label"] and r["image"] is None for r in rows)
    result = runner.invoke(app, ["inspect", str(tmp_path / "sl"), "--preview", str(tmp_path / "sl.png")])
    assert result.exit_code == 0 and (tmp_path / "sl.png").is_file()


@pytest.mark.parametrize(
    "args, code, message",
    [(["--size", "4096"], 1, "larger than every train volume"), (["--p-nodule", "2"], 2, "--p-nodule"),
     (["--bank", "/nowhere/bank.parquet", "--size", "48"], 1, "no such template bank")],
)  # fmt: skip
def test_synth_labels_errors(labelled_dataset, tmp_path, args, code, message):
    result = runner.invoke(app, ["synth-labels", "--n", "2", "--source", str(labelled_dataset), "--out",
                                 str(tmp_path / "x"), *args])  # fmt: skip
    assert result.exit_code == code and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_synth_labels_without_label_maps_says_to_prepare(copy_dataset, tmp_path):
    result = runner.invoke(
        app, ["synth-labels", "--n", "2", "--source", str(copy_dataset()), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1 and "run `ctsynth prepare" in result.output


def test_train_gan_from_the_cli_then_refuses_to_overwrite(gan_data, tmp_path, ray_session):
    args = ["train-gan", str(gan_data), "--out", str(tmp_path / "run"), "--model", "pix2pix", "--batch", "2",
            "--steps", "2", "--unet-width", "8", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained pix2pix 2D to step 2" in result.output and (tmp_path / "run" / "generator.json").is_file()
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "holds an earlier run" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [(["--model", "vae"], "--model"), (["--dims", "4"], "--dims"),
                                           (["--widths", "8,16"], "--widths"), (["--widths", "8.5,16,32"], "--widths"),
                                           (["--gan-mode", "wgan"], "--gan-mode"), (["--pool-size", "-1"], "--pool-size"),
                                           (["--encoding", "binary"], "--encoding")])  # fmt: skip
def test_train_gan_usage_errors(tmp_path, args, message):
    result = runner.invoke(app, ["train-gan", str(tmp_path), "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2 and message in result.output


def test_score_and_compare_from_the_cli(tmp_path):
    import json

    import numpy as np

    from ctsynth_ray.dataset import centred_affine, write_nifti

    affine = centred_affine((6, 6, 6), (1, 1, 1))
    for k in range(3):
        truth = np.zeros((6, 6, 6), np.uint8)
        truth[1:4, 1:4, 1:4] = 1
        pred = np.roll(truth, k, axis=0)
        write_nifti(tmp_path / "truth" / f"v{k}.nii.gz", truth, affine)
        write_nifti(tmp_path / "a" / f"v{k}.nii.gz", pred, affine)
        write_nifti(tmp_path / "b" / f"v{k}.nii.gz", truth, affine)
    for name in ("a", "b"):
        result = runner.invoke(
            app, ["score", str(tmp_path / name), str(tmp_path / "truth"), "--out", str(tmp_path / f"{name}.csv")]
        )
        assert result.exit_code == 0 and "scored 3 volume(s)" in result.output
    result = runner.invoke(app, ["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--json"])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.output)
    assert parsed["n_volumes"] == 3 and parsed["n_with_nodule"] == 3
    assert set(parsed["metrics"]) == {"sensitivity", "dice", "f2"}
    assert set(parsed["metrics"]["dice"]) == {"baseline", "candidate", "p_value", "wilcoxon_p", "test"}
    assert parsed["metrics"]["dice"]["candidate"]["mean"] == 1.0
    table = runner.invoke(app, ["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert table.exit_code == 0 and "Wilcoxon p" in table.output
    (tmp_path / "b" / "v0.nii.gz").unlink()
    bad = runner.invoke(app, ["score", str(tmp_path / "b"), str(tmp_path / "truth"), "--out", str(tmp_path / "x.csv")])
    assert bad.exit_code == 1 and "v0: no v0.nii.gz in" in bad.output and not (tmp_path / "x.csv").exists()


def test_relative_paths_reach_ray_train_workers(gan_data, tmp_path, monkeypatch, ray_session):
    """Ray Train workers run in another working directory: relative GANDATA, --out and sqlite URI still work."""
    import shutil

    shutil.copytree(gan_data, tmp_path / "gan")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train-gan", "gan", "--out", "run", "--model", "pix2pix", "--batch", "2", "--steps", "1",
                                 "--unet-width", "8", "--tracking-uri", "sqlite:///rel.db"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "generator.pt").is_file() and (tmp_path / "rel.db").is_file()


def test_help_names_every_command_on_one_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    panel = [line for line in result.output[result.output.index("Commands") :].splitlines() if line.startswith("│")]
    names = [line.strip("│ ").split()[0] for line in panel]
    expected = {"phantom", "inspect", "ingest", "prepare", "synth-labels", "train-gan", "generate", "train-seg", "segment",
                "score", "compare", "sweep", "report", "ui", "audit", "submit", "jobs", "demo"}  # fmt: skip
    assert set(names) == expected and len(panel) == len(expected)  # no wrapped second lines


def test_train_gan_takes_the_reference_flags(gan_data, tmp_path, ray_session):
    import json

    args = ["train-gan", str(gan_data), "--out", str(tmp_path / "run"), "--batch", "2", "--steps", "1",
            "--widths", "4,8,16", "--blocks", "1", "--pool-size", "0", "--gan-mode", "vanilla",
            "--lambda-identity", "0.5", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    gan = json.loads((tmp_path / "run" / "generator.json").read_text())["gan"]
    assert (gan["pool_size"], gan["gan_mode"], gan["lambda_identity"], gan["norm"]) == (0, "vanilla", 0.5, "instance")


def test_segment_then_score_against_the_dataset(gan_data, tmp_path, ray_session):
    dataset = gan_data.parent / "ds"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train = ["train-seg", "--train", f"{dataset}:train", "--val", f"{dataset}:test", "--out", str(tmp_path / "run"),
             "--iterations", "2", "--patch", "32", "--batch", "2", "--features", "4,8,16", "--eval-every", "2",
             "--tracking-uri", uri]  # fmt: skip
    result = runner.invoke(app, train)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["segment", str(tmp_path / "run"), f"{dataset}:test", "--out", str(tmp_path / "pred")])
    assert result.exit_code == 0, result.output
    test_ids = sorted(r["volume_id"] for r in read_manifest(dataset) if r["split"] == "test")
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [f"{v}.nii.gz" for v in test_ids]
    result = runner.invoke(app, ["score", str(tmp_path / "pred"), f"{dataset}:test", "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 0 and f"scored {len(test_ids)} volume(s)" in result.output
    result = runner.invoke(app, ["segment", str(tmp_path), str(dataset), "--out", str(tmp_path / "p2")])
    assert result.exit_code == 1 and "model.json: not found" in result.output and not (tmp_path / "p2").exists()


def test_train_seg_refuses_leakage_and_warns_about_the_gan_split(gan_data, tmp_path):
    dataset = gan_data.parent / "ds"
    args = ["train-seg", "--train", str(dataset), "--val", f"{dataset}:test", "--out", str(tmp_path / "run"),
            "--patch", "32", "--features", "4,8,16"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "ctsynth: error: 4 training volume(s) are also validation volumes: phantom-s21-" in result.output
    assert not (tmp_path / "run").exists()

    # A mixed set whose real part trained the GAN (prepare recorded it) runs, with a warning first.
    from ctsynth_ray.dataset import load_volume, write_manifest, write_volume

    row = next(r for r in read_manifest(dataset) if r["split"] == "train" and r["n_nodules"])
    volume = load_volume(dataset, row)
    volume.volume_id = "synth-0"
    synth = tmp_path / "synth"
    write_manifest(synth, [write_volume(synth, volume, "train", "synthetic", source_volume_id=row["volume_id"])])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"")  # stop at the run-folder check, after the warning
    args[2] = f"{dataset}:train"
    result = runner.invoke(app, [*args, "--train", str(synth)])
    assert result.exit_code == 1 and "holds an earlier run" in result.output
    assert "ctsynth: warning: " in result.output and "real training volume(s) trained the GAN" in result.output


def test_score_prints_every_problem_and_compare_takes_the_thesis_interval(tmp_path):
    import numpy as np

    from ctsynth_ray.dataset import centred_affine, write_nifti

    affine = centred_affine((6, 6, 6), (1, 1, 1))
    cube = np.zeros((6, 6, 6), np.uint8)
    cube[1:4, 1:4, 1:4] = 1
    for name in ("a", "b"):
        write_nifti(tmp_path / "pred" / f"{name}.nii.gz", cube, affine)
    write_nifti(tmp_path / "truth" / "c.nii.gz", cube, affine)
    result = runner.invoke(
        app, ["score", str(tmp_path / "pred"), str(tmp_path / "truth"), "--out", str(tmp_path / "s.csv")]
    )
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("ctsynth: error: ")]
    assert [e.split()[2] for e in errors] == ["a:", "b:", "c:"]
    rows = "volume_id,sensitivity,dice,f2,nodule_present\n" + "".join(
        f"v{k},0.5,{0.1 * k},0.5,yes\n" for k in range(1, 5)
    )
    (tmp_path / "x.csv").write_text(rows)
    result = runner.invoke(app, ["compare", str(tmp_path / "x.csv"), str(tmp_path / "x.csv"), "--ci", "thesis"])
    assert result.exit_code == 0 and "95% CI (thesis)" in result.output
    assert runner.invoke(app, ["compare", str(tmp_path / "x.csv"), str(tmp_path / "x.csv"), "--ci", "z"]).exit_code == 2


def test_the_terminal_shows_each_progress_line_once_and_ray_reports_only_when_verbose(gan_data, tmp_path, ray_session):
    """The real command in a subprocess (Ray's log forwarding writes to the process' own stdout), joined to the
    session's Ray."""
    import subprocess
    import sys

    address = ray_session.get_runtime_context().gcs_address
    base = [sys.executable, "-m", "ctsynth_ray.cli.main", "train-gan", str(gan_data), "--model", "pix2pix",
            "--batch", "2", "--steps", "2", "--unet-width", "8", "--address", address,
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    quiet = subprocess.run([*base, "--out", str(tmp_path / "quiet")], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    terminal = quiet.stdout + quiet.stderr
    assert terminal.count("train-gan: step 2/2") == 1 and terminal.count("train-gan: pix2pix 2D") == 1
    for noise in ("TrainingReport", "Checkpoint successfully created", "Started training worker group",
                  "Creating initial MLflow database tables", "PreemptionWatcher"):  # fmt: skip
        assert noise not in terminal
    verbose = subprocess.run([*base, "--out", str(tmp_path / "verbose"), "--verbose"], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert verbose.returncode == 0, verbose.stderr
    terminal = verbose.stdout + verbose.stderr
    assert "TrainingReport" in terminal and terminal.count("train-gan: step 2/2") == 1


def test_generate_from_the_cli_and_a_size_that_does_not_fit(tiny_generator, tmp_path, ray_session):
    out = tmp_path / "synth"
    result = runner.invoke(
        app, ["generate", "--n", "3", "--model", str(tiny_generator), "--out", str(out), "--seed", "5"]
    )
    assert result.exit_code == 0, result.output
    assert "3 volume(s) in" in result.output and "seconds per stage" in result.output
    assert [r["volume_id"] for r in read_manifest(out)] == [f"synth-s5-{i:06d}" for i in range(3)]
    result = runner.invoke(app, ["generate", "--n", "3", "--model", str(tiny_generator), "--out", str(tmp_path / "x"),
                                 "--size", "48"])  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == (
        "ctsynth: error: --size 48 does not fit the generator (unet: sizes must be multiples of 32; it was trained on 32)"
    )
    assert not (tmp_path / "x").exists()
