import io

import numpy as np
import pytest
import torch

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.gan_data import GanPairs
from ctsynth_ray.models.gan import MODEL_DEFAULTS, GanConfig, GanTrainer, ImagePool, epoch_batches
from ctsynth_ray.models.registry import GENERATOR_STEM, NetworkSpec, export_network, load_generator, load_segmenter
from ctsynth_ray.models.validation import batch, validate

SMALL = {"batch": 4, "generator_widths": (8, 16, 32), "residual_blocks": 2, "unet_width": 16, "unet_downs": 5,
         "discriminator_width": 8, "epochs": 50, "decay_epochs": 50}  # fmt: skip


def run(trainer, pairs, steps):
    losses = []
    while trainer.step < steps:
        epoch, k = divmod(trainer.step, trainer.steps_per_epoch)
        indices = epoch_batches(len(pairs), trainer.config.batch, epoch, trainer.config.seed)[k]
        unpaired = epoch_batches(len(pairs), trainer.config.batch, epoch, trainer.config.seed, stream=1)[k]
        label, ct = batch(pairs, indices)
        losses.append(trainer.train_step(label, ct, batch(pairs, unpaired)[1]))
    return losses


def make_trainer(pairs, **kwargs):
    config = GanConfig(**{**SMALL, **kwargs})
    steps_per_epoch = len(epoch_batches(len(pairs), config.batch, 0, config.seed))
    return GanTrainer(config, 2, int(pairs[0][0].shape[0]), 1, steps_per_epoch)


def test_100_cpu_steps_lower_the_validation_mae(gan_data):
    train, val = GanPairs(gan_data, "train", "2d"), GanPairs(gan_data, "val", "2d")
    trainer = make_trainer(train, model="pix2pix")
    before = validate(trainer.generate, val)["val_mae_hu"]
    run(trainer, train, 100)
    after = validate(trainer.generate, val)
    assert after["val_mae_hu"] < 0.7 * before, (before, after)
    assert 0 < after["val_ssim"] <= 1 and after["val_psnr_db"] > 10
    assert "interslice_ratio" in after


@pytest.mark.parametrize("model", ["cyclegan", "pix2pix"])
def test_resume_from_a_checkpoint_gives_the_same_next_steps(gan_data, model):
    train = GanPairs(gan_data, "train", "2d")
    uninterrupted = make_trainer(train, model=model)
    run(uninterrupted, train, 3)
    buffer = io.BytesIO()
    torch.save(uninterrupted.state_dict(), buffer)
    expected = run(uninterrupted, train, 6)
    resumed = make_trainer(train, model=model, seed=0)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.step == 3
    assert run(resumed, train, 6) == expected
    for a, b in zip(uninterrupted.G_A.parameters(), resumed.G_A.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_learning_rate_is_constant_then_decays_linearly_to_zero():
    trainer = GanTrainer(GanConfig(**{**SMALL, "epochs": 2, "decay_epochs": 2}), 2, 1, 1, steps_per_epoch=10)
    rates = [trainer.learning_rate(step) for step in (0, 19, 20, 30, 39)]  # epochs 0, 1, 2, 3, 3
    assert rates[0] == rates[1] == 2e-4
    assert rates[0] > rates[2] > rates[3] == rates[4] > 0
    assert rates[2] - rates[3] == pytest.approx(2e-4 / 3)
    assert trainer.total_steps() == 40


def test_epoch_batches_split_workers_without_overlap():
    a = np.concatenate(epoch_batches(20, 3, epoch=1, seed=0, rank=0, world=2))
    b = np.concatenate(epoch_batches(20, 3, epoch=1, seed=0, rank=1, world=2))
    assert len(a) == len(b) == 9 and not set(a) & set(b)
    assert not np.array_equal(np.concatenate(epoch_batches(20, 3, 2, 0)), np.concatenate(epoch_batches(20, 3, 1, 0)))


def test_image_pool_returns_history_and_restores():
    pool = ImagePool(2, seed=0)
    images = [torch.full((1, 1, 2, 2), float(k)) for k in range(6)]
    for image in images[:2]:
        assert torch.equal(pool.query(image), image)  # filling up
    state = pool.state_dict()
    out = [pool.query(i) for i in images[2:]]
    pool.load_state_dict(state, "cpu")
    assert all(torch.equal(a, pool.query(i)) for a, i in zip(out, images[2:]))


def test_export_and_load_round_trip(tmp_path):
    spec = NetworkSpec("resnet", 2, 1, 1, {"widths": [8, 16, 32], "n_blocks": 1})
    trainer = GanTrainer(GanConfig(**{**SMALL, "residual_blocks": 1}), 2, 1, 1)
    export_network(tmp_path, GENERATOR_STEM, trainer.G_A, spec, {"dims": "2", "label_scheme": "body"})
    generator, info = load_generator(tmp_path)
    assert info["dims"] == "2" and info["network"]["architecture"] == "resnet"
    x = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(generator(x), trainer.G_A.eval()(x))
    with pytest.raises(CtsynthError, match=r"model\.json: not found"):
        load_segmenter(tmp_path)
    (tmp_path / "generator.json").write_text("{}")
    with pytest.raises(CtsynthError, match="not a network description"):
        load_generator(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"model": "vae"}, "model must be one of"), ({"gan_mode": "wgan"}, "gan_mode"), ({"batch": 0}, "batch"),
     ({"epochs": 0, "decay_epochs": 0}, "positive sum"), ({"lr": 0}, "lr"), ({"pool_size": -1}, "pool_size"),
     ({"norm": "group"}, "norm"), ({"lambda_identity": -1}, "lambda_identity")],
)  # fmt: skip
def test_bad_gan_configurations_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GanConfig(**kwargs)


def test_identity_loss_needs_matching_channels():
    with pytest.raises(ValueError, match="identity loss"):
        GanTrainer(GanConfig(**{**SMALL, "lambda_identity": 0.5}), 2, 3, 1)


@pytest.mark.parametrize("model", ["cyclegan", "pix2pix"])
def test_a_3d_training_step_on_3d_crops(gan_data, model):
    crops = GanPairs(gan_data, "train", "3d")
    config = GanConfig(**{**SMALL, "model": model, "batch": 1, "unet_downs": 4})
    trainer = GanTrainer(config, 3, 1, 1, steps_per_epoch=len(crops))
    label, ct = batch(crops, [0])
    losses = trainer.train_step(label, ct, ct)
    assert trainer.step == 1 and all(np.isfinite(v) for v in losses.values())
    assert tuple(trainer.generate(label).shape) == (1, 1, 32, 32, 32)


@pytest.mark.parametrize("model", ["cyclegan", "pix2pix"])
def test_model_defaults_are_the_references(model):
    config = GanConfig(model=model)
    assert {k: getattr(config, k) for k in MODEL_DEFAULTS[model]} == MODEL_DEFAULTS[model]
    assert (config.gan_mode, config.pool_size, config.norm) == (
        ("lsgan", 50, "instance") if model == "cyclegan" else ("vanilla", 0, "batch")
    )
    assert GanConfig(model=model, pool_size=7, gan_mode="lsgan").pool_size == 7  # explicit values win
    assert GanConfig(**config.to_dict()) == config  # a checkpoint's config round-trips


@pytest.mark.parametrize("model", ["cyclegan", "pix2pix"])
@pytest.mark.parametrize("pool_size", [0, 3])
def test_any_pool_size_trains_both_models(gan_data, model, pool_size):
    train = GanPairs(gan_data, "train", "2d")
    trainer = make_trainer(train, model=model, pool_size=pool_size)
    losses = run(trainer, train, 2)
    assert trainer.step == 2 and all(np.isfinite(v) for step in losses for v in step.values())


def test_backward_d_basic_never_reaches_the_generator(gan_data):
    train = GanPairs(gan_data, "train", "2d")
    trainer = make_trainer(train, model="pix2pix")
    label, ct = batch(train, [0, 1])
    fake = trainer.G_A(label)
    loss = trainer.backward_D_basic(trainer.D_A, torch.cat([label, ct], 1), torch.cat([label, fake], 1))
    assert loss.item() > 0
    assert all(p.grad is None for p in trainer.G_A.parameters())
    assert all(p.grad is not None for p in trainer.D_A.parameters())


@pytest.mark.parametrize("model, expected", [("pix2pix", [True, True, False]), ("cyclegan", [False, True, True])])
def test_step_order_follows_the_reference(gan_data, model, expected):
    """Whether D_A is trainable at each of its calls in one step: pix2pix steps D (real, fake) and then G with D
    frozen; CycleGAN steps G with D frozen and then D."""
    train = GanPairs(gan_data, "train", "2d")
    trainer = make_trainer(train, model=model)
    trainable = []
    trainer.D_A.register_forward_hook(lambda net, args, out: trainable.append(next(net.parameters()).requires_grad))
    run(trainer, train, 1)
    assert trainable == expected
