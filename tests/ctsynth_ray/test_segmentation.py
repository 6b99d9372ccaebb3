import numpy as np
import pytest
import torch

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.segmentation import (
    AIR,
    UNet,
    check_no_leakage,
    dice_ce_loss,
    gan_overlap_warnings,
    parse_spec,
    sample_patches,
    segment,
    select_volumes,
    sliding_window,
)


@pytest.mark.parametrize(
    "kwargs, input_shape, expected",
    [({}, (1, 1, 32, 32, 32), (1, 2, 32, 32, 32)),
     ({"features": (4, 8, 16, 32)}, (2, 1, 16, 24, 32), (2, 2, 16, 24, 32)),
     ({"spatial_dims": 2, "features": (4, 8)}, (3, 1, 20, 20), (3, 2, 20, 20)),
     ({"in_channels": 2, "out_channels": 3, "features": (4, 8, 16)}, (1, 2, 8, 8, 8), (1, 3, 8, 8, 8))],
)  # fmt: skip
def test_unet_shapes(kwargs, input_shape, expected):
    with torch.no_grad():
        assert tuple(UNet(**kwargs)(torch.zeros(input_shape)).shape) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [({"spatial_dims": 1}, "spatial_dims"), ({"features": (8,)}, "at least two"), ({"out_channels": 1}, "out_channels")],
)  # fmt: skip
def test_unet_bad_configurations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(**kwargs)


def test_patch_sampler_balances_nodule_and_background_centres():
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[18:22, 18:22, 18:22] = 1  # 0.1 % of the voxels
    ct = np.random.default_rng(0).random((40, 40, 40), dtype=np.float32)
    _, masks = sample_patches(np.random.default_rng(1), ct, mask, 8, 400)
    centre_is_nodule = masks[:, 4, 4, 4] == 1
    assert 0.42 < centre_is_nodule.mean() < 0.58
    _, none = sample_patches(np.random.default_rng(1), ct, np.zeros_like(mask), 8, 20)
    assert none.sum() == 0


def test_sliding_window_of_an_identity_model_reproduces_its_input():
    volume = np.random.default_rng(0).random((37, 30, 21)).astype(np.float32)
    out = sliding_window(volume, lambda windows: windows.numpy(), patch=16, overlap=0.5)
    assert out.shape == (1, 37, 30, 21)
    np.testing.assert_allclose(out[0], volume, rtol=1e-5, atol=1e-6)
    small = sliding_window(volume[:10], lambda w: w.numpy(), patch=16)  # smaller than a patch: padded
    np.testing.assert_allclose(small[0], volume[:10], rtol=1e-5, atol=1e-6)


def test_dice_ce_loss_is_lower_for_the_right_answer():
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    right = torch.stack([1 - target.float(), target.float()], 1) * 20 - 10
    assert dice_ce_loss(right, target) < 0.01 < dice_ce_loss(-right, target)


def test_specs_and_volume_selection(phantom_dataset):
    spec = parse_spec(f"{phantom_dataset}:train:n=2")
    assert spec.split == "train" and spec.n == 2
    a = select_volumes([spec], seed=0)
    assert len(a) == 2 and a == select_volumes([spec], seed=0)
    assert len(select_volumes([parse_spec(str(phantom_dataset))], 0)) == 6
    with pytest.raises(ValueError, match="expected DATASET"):
        parse_spec("ds:training")
    with pytest.raises(CtsynthError, match="asked for n=50"):
        select_volumes([parse_spec(f"{phantom_dataset}:n=50")], 0)


def test_prefetch_yields_in_order():
    from ctsynth_ray.segmentation import prefetch

    assert list(prefetch(lambda k: k * k, range(7), depth=3)) == [k * k for k in range(7)]
    assert list(prefetch(lambda k: k, [])) == []


def fake_dataset(root, ids, source="phantom", split="train", **extra):
    """A manifest-only dataset: enough for volume selection (no NIfTI files are read)."""
    from ctsynth_ray.dataset import write_manifest

    rows = [{"volume_id": v, "image": f"images/{v}.nii.gz", "mask": f"masks/{v}.nii.gz", "label": None,
             "split": split, "source": source, "shape_x": 8, "shape_y": 8, "shape_z": 8, "spacing_x": 1.0,
             "spacing_y": 1.0, "spacing_z": 1.0, "n_nodules": 0, "nodule_voxels": 0,
             **{k: v_(v) for k, v_ in extra.items()}} for v in ids]  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(root, rows)
    return root


def ids(volumes):
    return {row["volume_id"] for _, row in volumes}


def test_set_ups_are_nested_for_one_seed_and_differ_between_seeds(tmp_path):
    synth = fake_dataset(tmp_path / "synth", [f"s{k:03d}" for k in range(200)], source="synthetic")
    small, middle, large = (ids(select_volumes([parse_spec(f"{synth}:n={n}")], seed=3)) for n in (20, 50, 140))
    assert len(small) == 20 and small < middle < large
    assert ids(select_volumes([parse_spec(f"{synth}:n=20")], seed=4)) != small
    # A mixed set-up adds to, and never swaps, what the smaller set-up of the same seed drew.
    real = fake_dataset(tmp_path / "real", [f"r{k:03d}" for k in range(30)])
    mixed = select_volumes([parse_spec(f"{real}:n=5"), parse_spec(f"{synth}:n=50")], seed=3)
    assert ids(mixed) == ids(select_volumes([parse_spec(f"{real}:n=5")], 3)) | middle


def test_the_draw_does_not_depend_on_manifest_order(tmp_path):
    names = [f"v{k:02d}" for k in range(40)]
    a = fake_dataset(tmp_path / "a", names)
    b = fake_dataset(tmp_path / "b", names[::-1])
    assert ids(select_volumes([parse_spec(f"{a}:n=10")], 0)) == ids(select_volumes([parse_spec(f"{b}:n=10")], 0))


def test_a_volume_picked_twice_is_refused(tmp_path):
    real = fake_dataset(tmp_path / "real", ["a", "b", "c"])
    with pytest.raises(CtsynthError, match="picked by more than one --train spec"):
        select_volumes([parse_spec(str(real)), parse_spec(f"{real}:train:n=1")], 0)


def test_leakage_into_the_validation_set_is_refused_naming_the_volumes(tmp_path):
    real = fake_dataset(tmp_path / "real", ["p1", "p2", "p3"])
    val_rows = [{"volume_id": "p3"}, {"volume_id": "p9"}]
    copies = fake_dataset(tmp_path / "copies", ["p3"])  # a re-ingested copy of a validation volume
    synth = fake_dataset(tmp_path / "synth", ["s1", "s2"], source="synthetic",
                         source_volume_id=lambda v: "p9" if v == "s2" else "p1", template_id=lambda v: None)  # fmt: skip
    check_no_leakage(select_volumes([parse_spec(f"{real}:n=2")], 0), [{"volume_id": "p9"}])
    with pytest.raises(CtsynthError) as error:
        check_no_leakage(select_volumes([parse_spec(str(copies)), parse_spec(str(synth))], 0), val_rows)
    assert str(error.value).splitlines() == [
        "1 training volume(s) are also validation volumes: p3",
        "1 synthetic training volume(s) were cut from validation volumes: s2 (from p9)",
    ]
    with pytest.raises(CtsynthError, match=r"training volume.*validation volumes: p3$"):
        check_no_leakage(select_volumes([parse_spec(str(real))], 0), val_rows)
    pasted = fake_dataset(tmp_path / "pasted", ["s3", "s4"], source="synthetic", source_volume_id=lambda v: "p1",
                          template_id=lambda v: "p9#2" if v == "s4" else "p1#1")  # fmt: skip
    with pytest.raises(
        CtsynthError, match=r"^1 synthetic .* carry a nodule cut from a validation volume: s4 \(template p9#2\)$"
    ):
        check_no_leakage(select_volumes([parse_spec(str(pasted))], 0), val_rows)


def test_a_mixed_set_whose_real_part_trained_the_gan_is_warned_about(tmp_path):
    from ctsynth_ray.dataset import PREPARE_RECORD, write_json

    real = fake_dataset(tmp_path / "real", ["t1", "t2", "u1"])
    synth = fake_dataset(tmp_path / "synth", ["s1"], source="synthetic", source_volume_id=lambda v: "t1")
    write_json(real / PREPARE_RECORD, {"gan_data": "/g", "bank": "/g/b", "gan_train_split": "train",
                                       "gan_train_volumes": ["t1", "t2"]})  # fmt: skip
    both = select_volumes([parse_spec(str(real)), parse_spec(str(synth))], 0)
    (warning,) = gan_overlap_warnings(both)
    assert "2 real training volume(s) trained the GAN" in warning and "t1, t2" in warning
    assert gan_overlap_warnings(select_volumes([parse_spec(str(real))], 0)) == []  # real only: the baseline
    unseen = fake_dataset(tmp_path / "unseen", ["u1"])
    assert gan_overlap_warnings(select_volumes([parse_spec(str(unseen)), parse_spec(str(synth))], 0)) == []


def test_the_gan_behind_generated_volumes_is_found_from_their_generator(tmp_path):
    """A copy of a GAN training volume in another dataset (re-ingested) is found through the generator's GAN data."""
    import json

    (tmp_path / "gan").mkdir()
    (tmp_path / "gan" / "gan_data.json").write_text(json.dumps({"volumes": {"train": ["t1"], "val": []}}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "generator.json").write_text(json.dumps({"training_data": {"path": str(tmp_path / "gan")}}))
    copies = fake_dataset(tmp_path / "copies", ["t1", "u1"])
    synth = fake_dataset(tmp_path / "synth", ["s1"], source="synthetic", generator=lambda v: str(tmp_path / "run"))
    (warning,) = gan_overlap_warnings(select_volumes([parse_spec(str(copies)), parse_spec(str(synth))], 0))
    assert "1 real training volume(s) trained the GAN (GAN data" in warning and warning.endswith(":test:n=N)")


def test_sliding_window_pads_with_the_given_value():
    volume = np.zeros((4, 4, 4), np.float32)

    def window_mean(windows):
        return windows.mean(dim=(2, 3, 4), keepdim=True).expand_as(windows).numpy()

    assert float(sliding_window(volume, window_mean, patch=8, pad_value=0.0)[0].max()) == 0.0
    padded = sliding_window(volume, window_mean, patch=8, pad_value=-0.25)
    np.testing.assert_allclose(padded[0], -0.25 * (1 - 64 / 512), rtol=1e-6)
    by_default = sliding_window(volume, window_mean, patch=8)  # air
    np.testing.assert_allclose(by_default[0], AIR * (1 - 64 / 512), rtol=1e-6)


class WindowMean(torch.nn.Module):
    """Nodule where the window's mean is above -0.4 (a water cube padded with water: yes; with air: no)."""

    def forward(self, x):
        mean = x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x)
        return torch.cat([torch.zeros_like(x), mean * 100 + 40], 1)


def test_segment_pads_with_air_like_the_patch_sampler():
    water = np.zeros((4, 4, 4), np.float32)
    assert pytest.approx(-0.5) == AIR
    assert segment(WindowMean(), water, patch=8).sum() == 0
    model = WindowMean().eval()
    assert segment(model, water, patch=8, pad_value=0.0).all()
    assert not model.training  # segment leaves the model in the mode it found it
