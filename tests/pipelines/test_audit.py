"""`ctsynth audit` end to end: planted patient copies are flagged, honest sets are not, files and MLflow, refusals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from ctsynth_ray.cli.main import app
from ctsynth_ray.dataset import Volume, load_volume, read_manifest, read_nifti, write_json, write_manifest, write_volume
from ctsynth_ray.gan_data import GanPairs
from ctsynth_ray.pipelines.runtime import RayOptions

QUIET = RayOptions(progress=False)
RUNNER = CliRunner()
PROVENANCE = ("source_volume_id", "cube_origin", "label_scheme", "inserted_nodule", "template_id", "nodule_center",
              "paste_failed")  # fmt: skip


@pytest.fixture(scope="module")
def planted(gan_data, tmp_path_factory) -> Path:
    """Eight 32^3 synthetic volumes cut from the GAN's train split: volume 0 is the real CT of its own source cube
    plus 3 HU of noise, volume 1 a GAN training crop; the rest are their label maps painted with tissue HU and
    smooth noise (an honest generator that adds only what the label map says)."""
    from ctsynth_ray.pipelines.synth_labels import synth_labels
    from ctsynth_ray.synth_labels import SynthLabelConfig

    source = gan_data.parent / "ds"
    root = tmp_path_factory.mktemp("planted")
    label_rows = synth_labels(source, root / "labels", 8, config=SynthLabelConfig(size=32), ray_options=QUIET)
    training_crop = GanPairs(gan_data, "train", "3d").hu[0]
    paint = np.zeros(256, np.int16)
    paint[:7] = [-850, -100, 0, 50, 700, 30, -1000]
    sources = {r["volume_id"]: r for r in read_manifest(source)}
    rows = []
    for k, row in enumerate(label_rows):
        volume = load_volume(root / "labels", row)
        rng = np.random.default_rng(k)
        if k == 0:
            hu, _ = read_nifti(source / sources[row["source_volume_id"]]["image"])
            origin = [row[f"cube_origin_{a}"] for a in "xyz"]
            hu = hu[tuple(slice(o, o + 32) for o in origin)] + rng.normal(0, 3, (32,) * 3)
        elif k == 1:
            hu = training_crop.astype(float)
        else:
            hu = paint[volume.label] + ndimage.gaussian_filter(rng.normal(0, 40, (32,) * 3), 0.7)
        extras = {c: v for c, v in row.items() if c.startswith(PROVENANCE)}
        volume = Volume(row["volume_id"], np.rint(hu).astype(np.int16), volume.mask, volume.affine, volume.label)
        rows.append(write_volume(root / "synth", volume, "train", "synthetic", **extras))
    write_manifest(root / "synth", rows)
    write_json(root / "synth" / "generate.json", {"source": str(source)})
    return root / "synth"


def _audit(args: list[str]):
    return RUNNER.invoke(app, ["audit", *map(str, args)])


def test_planted_copies_are_flagged_and_the_audit_is_written_and_tracked(planted, gan_data, tmp_path):
    from mlflow.tracking import MlflowClient

    out, uri = tmp_path / "audit", f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = _audit([planted, "--real", f"{gan_data.parent / 'ds'}:test", "--gan-data", gan_data, "--out", out,
                     "--turing", 3, "--tracking-uri", uri])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "2 volume(s) flagged as patient copies: synth-s0-000000, synth-s0-000001" in result.output
    report = json.loads((out / "audit.json").read_text())
    assert report["privacy"]["flagged"] == ["synth-s0-000000", "synth-s0-000001"]
    flags = {r["volume_id"]: r["flags"] for r in report["privacy"]["per_volume"]}
    assert flags["synth-s0-000000"] == ["source"] and flags["synth-s0-000001"] == ["training"]
    copied = next(r for r in report["privacy"]["per_volume"] if r["volume_id"] == "synth-s0-000001")
    crops = GanPairs(gan_data, "train", "3d")
    assert (copied["nearest_train_volume"], copied["nearest_train_crop"]) == (crops.volume_ids[0], crops.crops[0])
    assert report["n_synthetic"] == 8 and report["n_real"] == 4
    for key in ("frechet_radiomics", "frechet_radiomics_real_vs_real", "nodule_contrast", "interslice"):
        assert key in report["realism"]
    assert set(report["realism"]["hu_wasserstein"]) >= {"other", "fat", "soft_tissue", "outside_air"}
    assert set(report["diversity"]) == {"synthetic_pairwise_ssim", "real_pairwise_ssim"}
    record = report["privacy"]["per_volume"][0]
    assert set(record) >= {"volume_id", "source_similarity", "label_only_similarity", "nearest_train_volume",
                           "nearest_train_similarity"}  # fmt: skip
    assert report["privacy"]["threshold"] == max(report["privacy"]["held_out_nearest_similarity"])
    # The pages stand alone (images embedded) and the blind page does not give the answers away.
    page = (out / "audit.html").read_text()
    assert "synth-s0-000001" in page and not re.search(r"src=\"(?!data:)", page)
    turing = (out / "turing.html").read_text()
    answers = report["turing"]["answers"]
    assert len(answers) == 6 and sorted(a["truth"] for a in answers) == ["real"] * 3 + ["synthetic"] * 3
    assert turing.count("<img") == 6 and not any(a["volume_id"] in turing for a in answers)
    assert {p.name for p in out.iterdir()} >= {"hu_distributions.png", "privacy.png", "radiomics.png"}
    client = MlflowClient(uri)
    (run,) = client.search_runs(client.get_experiment_by_name("ctsynth-audit").experiment_id)
    assert run.data.tags["ctsynth.kind"] == "audit" and run.data.metrics["privacy_flagged"] == 2
    assert run.data.metrics["hu_wasserstein_other"] == pytest.approx(report["realism"]["hu_wasserstein"]["other"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "audit")} >= {"audit/audit.json", "audit/audit.html"}


def test_json_output_is_the_audit_and_workers_do_not_change_it(planted, gan_data, tmp_path, ray_session):
    real = f"{gan_data.parent / 'ds'}:test"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    one = _audit([planted, "--real", real, "--gan-data", gan_data, "--out", tmp_path / "one", "--json",
                  "--tracking-uri", uri])  # fmt: skip
    two = _audit([planted, "--real", real, "--gan-data", gan_data, "--out", tmp_path / "two", "--workers", 2,
                  "--turing", 2, "--tracking-uri", uri])  # fmt: skip
    assert one.exit_code == two.exit_code == 1
    printed = json.loads(one.stdout)
    first, second = (json.loads((tmp_path / name / "audit.json").read_text()) for name in ("one", "two"))
    assert printed["privacy"]["per_volume"] == first["privacy"]["per_volume"]
    for key in ("realism", "diversity"):  # neither the workers nor the Turing draw change a figure
        assert first[key] == second[key]
    assert first["privacy"]["per_volume"] == second["privacy"]["per_volume"]


def test_an_honest_generated_set_is_not_flagged_and_generate_audits_it(tiny_generator, gan_data, tmp_path,
                                                                       ray_session):  # fmt: skip
    out = tmp_path / "synth"
    result = RUNNER.invoke(app, ["generate", "--n", "6", "--model", str(tiny_generator), "--out", str(out),
                                 "--size", "32", "--actors", "1", "--audit", "--tracking-uri",
                                 f"sqlite:///{tmp_path / 'mlflow.db'}"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "audit" / "audit.json").read_text())
    assert report["real"].endswith(":test") and report["gan_data"] == str(gan_data)  # found through the generator
    assert report["n_synthetic"] == 6 and report["privacy"]["flagged"] == []
    assert "privacy: no volume flagged" in result.output


def _copy(dataset: Path, target: Path) -> Path:
    shutil.copytree(dataset, target)
    return target


def test_bad_inputs_get_one_clear_line_and_nothing_written(planted, gan_data, tmp_path):
    ds = gan_data.parent / "ds"
    out = tmp_path / "audit"
    # A set without provenance (a phantom dataset).
    result = _audit([ds, "--real", f"{ds}:test", "--out", out])
    assert result.exit_code == 1
    assert result.output.strip() == (f"ctsynth: error: {ds / 'manifest.parquet'}: no provenance column(s) "
                                     f"source_volume_id, cube_origin_x, cube_origin_y, cube_origin_z: the audit needs "
                                     f"the cube each volume was cut from (sets made by `ctsynth generate` have them)")  # fmt: skip
    # Grids that differ.
    other = _copy(planted, tmp_path / "other-grid")
    table = pq.read_table(other / "manifest.parquet")
    spacing = table.column("spacing_x").to_numpy() * 2
    pq.write_table(table.set_column(table.column_names.index("spacing_x"), "spacing_x", [spacing]),
                   other / "manifest.parquet")  # fmt: skip
    result = _audit([other, "--real", f"{ds}:test", "--out", out])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "on another grid than" in result.output and str(ds / "manifest.parquet") in result.output
    # Real volumes that all trained the GAN cannot set the privacy threshold.
    every = _copy(gan_data, tmp_path / "gan-every")
    description = json.loads((every / "gan_data.json").read_text())
    description["volumes"]["train"] = [r["volume_id"] for r in read_manifest(ds)]
    write_json(every / "gan_data.json", description)
    result = _audit([planted, "--real", ds, "--gan-data", every, "--out", out])
    assert result.exit_code == 1 and "every volume trained the GAN" in result.output
    # A source volume that is gone.
    moved = _copy(planted, tmp_path / "moved")
    write_json(moved / "generate.json", {"source": str(tmp_path / "nowhere")})
    result = _audit([moved, "--real", f"{ds}:test", "--out", out])
    assert result.exit_code == 1 and "the source dataset of" in result.output
    assert not out.exists()
    # Provenance with a hole in it.
    holed = _copy(planted, tmp_path / "holed")
    table = pq.read_table(holed / "manifest.parquet")
    origins = table.column("cube_origin_y").to_pylist()
    origins[3] = None
    pq.write_table(table.set_column(table.column_names.index("cube_origin_y"), "cube_origin_y", [origins]),
                   holed / "manifest.parquet")  # fmt: skip
    result = _audit([holed, "--real", f"{ds}:test", "--out", out])
    assert result.exit_code == 1 and result.output.strip() == (
        f"ctsynth: error: {holed / 'manifest.parquet'}: synth-s0-000003 lack an image, a label map or their provenance"
    )
    # An --out that is a file.
    (tmp_path / "a-file").write_text("x")
    result = _audit([planted, "--real", f"{ds}:test", "--out", tmp_path / "a-file"])
    assert result.exit_code == 1 and "a-file: exists and is not a folder" in result.output
    # An --out that holds something else is not replaced.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    result = _audit([planted, "--real", f"{ds}:test", "--out", tmp_path / "busy"])
    assert result.exit_code == 1 and "holds no earlier audit" in result.output
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_a_user_error_inside_a_ray_task_is_one_line(planted, gan_data, tmp_path, ray_session):
    broken = _copy(planted, tmp_path / "broken")
    table = pq.read_table(broken / "manifest.parquet")
    origins = table.column("cube_origin_x").to_pylist()
    origins[2] = 10_000  # far outside its source
    pq.write_table(table.set_column(table.column_names.index("cube_origin_x"), "cube_origin_x", [origins]),
                   broken / "manifest.parquet")  # fmt: skip
    result = _audit([broken, "--real", f"{gan_data.parent / 'ds'}:test", "--out", tmp_path / "audit", "--workers", 2,
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])  # fmt: skip
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("ctsynth: error:")]
    assert (
        len(errors) == 1
        and "synth-s0-000002's cube at [10000," in errors[0]
        and "is not inside its source" in errors[0]
    )
    assert "Traceback" not in result.output and not (tmp_path / "audit").exists()


def test_training_crops_without_3d_shards_are_cut_again_from_the_source(gan_data, tmp_path):
    from ctsynth_ray.pipelines.audit import load_training_crops

    from_shards = load_training_crops(gan_data, 32, 4)
    two_d_only = _copy(gan_data, tmp_path / "gan-2d")
    for shard in (two_d_only / "train").glob("3d-*.parquet"):
        shard.unlink()
    recut = load_training_crops(two_d_only, 32, 4)
    assert recut.names == from_shards.names
    np.testing.assert_array_equal(recut.hu, from_shards.hu)
