import numpy as np
import pytest
import torch

from ctsynth_ray.dataset import read_manifest
from ctsynth_ray.errors import CtsynthError
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
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("seg-test").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 51))
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_dice")} == {20, 40, 50}
    assert {"metrics.csv", "model.json", "evals"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
