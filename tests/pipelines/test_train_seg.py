import shutil

import numpy as np
import pytest
import torch

from ctsynth_ray.dataset import read_manifest, read_nifti
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.models.registry import load_segmenter
from ctsynth_ray.pipelines.runtime import RayOptions
from ctsynth_ray.pipelines.segment import segment_dataset
from ctsynth_ray.pipelines.train_seg import TrainSegOptions, train_seg
from ctsynth_ray.seg_metrics import read_scores_csv, volume_scores
from ctsynth_ray.segmentation import UNet, VolumeCache, segment


def untrained_dice(dataset, rows, features, patch):
    torch.manual_seed(0)
    model, cache = UNet(3, 1, 2, features), VolumeCache()
    volumes = [cache.get(dataset, r) for r in rows if r["n_nodules"]]
    dice = [volume_scores(segment(model, v.ct, patch), v.mask)["dice"] for v in volumes]
    return float(np.nanmean(dice))


def test_short_cpu_run_beats_an_untrained_model_and_resumes(gan_data, tmp_path, ray_session):
    from mlflow.tracking import MlflowClient

    dataset = gan_data.parent / "ds"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = TrainSegOptions(train=(f"{dataset}:train",), val=f"{dataset}:test", run_dir=str(tmp_path / "run"),
                              iterations=40, patch=32, batch=4, features=(8, 16, 32), lr=1e-3, eval_every=20,
                              tracking_uri=uri, experiment="seg-test")  # fmt: skip
    result = train_seg(options)
    val_rows = [r for r in read_manifest(dataset) if r["split"] == "test"]
    baseline = untrained_dice(dataset, val_rows, (8, 16, 32), 32)
    assert result.metrics["val_dice"] > baseline + 0.05, (result.metrics["val_dice"], baseline)
    scores = read_scores_csv(tmp_path / "run" / "metrics.csv")
    assert sorted(scores) == sorted(r["volume_id"] for r in val_rows)
    assert sorted(p.name for p in (tmp_path / "run" / "pred").iterdir()) == sorted(f"{v}.nii.gz" for v in scores)

    with pytest.raises(CtsynthError, match="holds an earlier run"):
        train_seg(options)
    resumed = train_seg(TrainSegOptions(**{**options.__dict__, "iterations": 50}), resume=True)
    assert resumed.metrics["step"] == 50
    with pytest.raises(CtsynthError, match="--resume continues the same run, but lr, seed differ from it"):
        train_seg(TrainSegOptions(**{**options.__dict__, "iterations": 60, "lr": 0.1, "seed": 3}), resume=True)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("seg-test").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 51))
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_dice")} == {20, 40, 50}
    assert {"metrics.csv", "model.json", "evals"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.info.status == "FINISHED"

    model, info = load_segmenter(tmp_path / "run")
    assert info["patch"] == 32 and info["iterations"] == 50 and info["network"]["arguments"]["features"] == [8, 16, 32]
    assert info["spacing_mm"] == [0.48828125, 0.48828125, 1.0]
    pred = tmp_path / "pred"
    written = segment_dataset(tmp_path / "run", dataset, pred, split="test", ray_options=RayOptions(progress=False))
    assert sorted(written) == sorted(scores)
    for vid in written:  # the same model, the same volumes: segment reproduces the run's own predictions
        np.testing.assert_array_equal(
            read_nifti(pred / f"{vid}.nii.gz")[0], read_nifti(tmp_path / "run" / "pred" / f"{vid}.nii.gz")[0]
        )
    assert not model.training


def seg_options(dataset, run_dir, uri, **kwargs):
    base = {"train": (f"{dataset}:train",), "val": f"{dataset}:test", "run_dir": str(run_dir), "iterations": 3,
            "patch": 32, "batch": 4, "features": (4, 8, 16), "lr": 1e-3, "eval_every": 3, "tracking_uri": uri,
            "experiment": "seg-test"}  # fmt: skip
    return TrainSegOptions(**{**base, **kwargs})


def test_two_ddp_workers_stay_identical_and_match_one_worker_on_the_same_global_batch(gan_data, tmp_path, ray_session):
    dataset = gan_data.parent / "ds"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    one = train_seg(seg_options(dataset, tmp_path / "one", uri, batch=4, workers=1))
    two = train_seg(seg_options(dataset, tmp_path / "two", uri, batch=2, workers=2))
    assert two.metrics["replica_max_abs_diff"] == 0.0  # DDP keeps the two workers' weights identical
    a = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    torch.manual_seed(0)
    initial = UNet(3, 1, 2, (4, 8, 16)).state_dict()
    moved = max(float((a[k] - initial[k]).abs().max()) for k in a)
    assert moved > 2e-3  # three Adam steps of lr 1e-3: weights moved ~20x the tolerance below
    for name in a:  # the same global batch, so the same update up to float rounding
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4)
    assert one.metrics["step"] == two.metrics["step"] == 3


def test_a_leaking_training_set_is_refused_before_ray_starts(gan_data, tmp_path):
    dataset = gan_data.parent / "ds"
    options = seg_options(dataset, tmp_path / "run", "sqlite:///unused.db", train=(str(dataset),))
    with pytest.raises(CtsynthError, match="training volume\\(s\\) are also validation volumes: phantom-s21-"):
        train_seg(options)
    assert not (tmp_path / "run").exists()


def test_a_failed_run_is_marked_failed_in_mlflow(gan_data, tmp_path, ray_session):
    from mlflow.tracking import MlflowClient

    dataset = tmp_path / "ds"
    shutil.copytree(gan_data.parent / "ds", dataset)
    victim = next(r for r in read_manifest(dataset) if r["split"] == "test")
    (dataset / victim["image"]).write_bytes(b"not a NIfTI file")  # found only at the first evaluation
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(CtsynthError, match="training failed"):
        train_seg(seg_options(dataset, tmp_path / "run", uri, iterations=1, eval_every=1))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("seg-test").experiment_id])
    assert run.info.status == "FAILED" and run.data.params["iterations"] == "1"
