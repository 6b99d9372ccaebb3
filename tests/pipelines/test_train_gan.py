import json

import pytest
import torch

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.models.gan import GanConfig
from ctsynth_ray.models.registry import load_generator
from ctsynth_ray.pipelines.train_gan import TrainGanOptions, train_gan

SMALL = GanConfig(model="cyclegan", batch=2, epochs=1, decay_epochs=1, generator_widths=(8, 16, 32),
                  residual_blocks=1, discriminator_width=8)  # fmt: skip


def test_two_worker_run_resumes_and_is_tracked_in_mlflow(gan_data, tmp_path, ray_session):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    options = TrainGanOptions(gandata=str(gan_data), run_dir=str(run_dir), dims="2.5", steps=4, checkpoint_every=2,
                              workers=2, tracking_uri=uri, experiment="test-gan")  # fmt: skip
    result = train_gan(options, SMALL)
    assert result.metrics["step"] == 4
    with pytest.raises(CtsynthError, match="holds an earlier run"):
        train_gan(options, SMALL)
    resumed = train_gan(TrainGanOptions(**{**options.__dict__, "steps": 6}), SMALL, resume=True)
    assert resumed.metrics["step"] == 6

    generator, info = load_generator(run_dir)
    assert info["dims"] == "2.5" and info["label_scheme"] == "body" and info["steps"] == 6
    assert info["network"]["in_channels"] == 3  # three label slices in, the centre CT slice out
    assert info["spacing_mm"] == json.loads((gan_data / "gan_data.json").read_text())["spacing_mm"]
    assert info["gan"]["pool_size"] == 50 and info["gan"]["norm"] == "instance"
    assert tuple(generator(torch.zeros(1, 3, 32, 32)).shape) == (1, 1, 32, 32)

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test-gan").experiment_id])
    assert run.info.run_id == json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert run.data.params["gan.model"] == "cyclegan" and run.data.params["workers"] == "2"
    history = client.get_metric_history(run.info.run_id, "loss_G")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # resumed: no step repeated or skipped
    assert client.get_metric_history(run.info.run_id, "lr") and "val_mae_hu" in run.data.metrics
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"generator.json", "generator.pt", "samples"} <= artifacts


def test_resume_without_checkpoint_and_missing_dims_are_clear_errors(gan_data, tmp_path):
    options = TrainGanOptions(gandata=str(gan_data), run_dir=str(tmp_path / "run"), steps=2)
    with pytest.raises(CtsynthError, match="no checkpoint to resume from"):
        train_gan(options, SMALL, resume=True)
    with pytest.raises(CtsynthError, match=r"gan_data\.json: not found"):
        train_gan(TrainGanOptions(gandata=str(tmp_path), run_dir=str(tmp_path / "r")), SMALL)


def test_the_generator_records_the_voxel_size_of_its_data(gan_data, tmp_path):
    from ctsynth_ray.models.gan import GanTrainer
    from ctsynth_ray.pipelines.train_gan import export_generator

    description = {**json.loads((gan_data / "gan_data.json").read_text()), "spacing_mm": [0.7, 0.7, 1.5]}
    trainer = GanTrainer(SMALL, 2, 1, 1)
    export_generator(tmp_path, trainer, TrainGanOptions(gandata=str(gan_data), run_dir=str(tmp_path)), description)
    assert load_generator(tmp_path)[1]["spacing_mm"] == [0.7, 0.7, 1.5]


def test_an_identity_loss_that_cannot_apply_is_refused_before_ray_starts(gan_data, tmp_path):
    options = TrainGanOptions(gandata=str(gan_data), run_dir=str(tmp_path / "run"), dims="2.5", steps=1)
    with pytest.raises(CtsynthError, match=r"--lambda-identity: .* here cyclegan with 3"):
        train_gan(options, GanConfig(**{**SMALL.to_dict(), "lambda_identity": 0.5}))
    assert not (tmp_path / "run").exists()
