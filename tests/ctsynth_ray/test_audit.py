"""The audit's measures on constructed inputs whose values are known."""

from __future__ import annotations

import numpy as np
import pytest

from ctsynth_ray import audit
from ctsynth_ray.labels import Tissue


def _chest(rng, shape=(48, 48, 24), nodule_hu=50.0):
    """A block of lung (-850 HU, noise) in fat, a spherical nodule of ``nodule_hu`` in the lung; (hu, label, mask)."""
    label = np.full(shape, Tissue.FAT, np.uint8)
    label[6:-6, 6:-6, :] = Tissue.OTHER
    hu = np.where(label == Tissue.OTHER, -850.0, -100.0) + rng.normal(0, 20, shape)
    x, y, z = np.indices(shape)
    mask = ((x - 24) ** 2 + (y - 24) ** 2 + (z - 12) ** 2 <= 16).astype(np.uint8)
    hu[mask > 0] = nodule_hu
    label[mask > 0] = Tissue.NODULE
    return np.rint(hu).astype(np.int16), label, mask


def test_hu_wasserstein_is_zero_for_identical_sets_and_the_shift_for_a_shifted_one():
    rng = np.random.default_rng(0)
    hu, label, _ = _chest(rng)
    real = audit.class_samples(hu, label, np.random.default_rng(1), cap=10**6)
    same = audit.class_samples(hu, label, np.random.default_rng(2), cap=10**6)
    shifted = audit.class_samples((hu + 37).astype(np.int16), label, np.random.default_rng(3), cap=10**6)
    assert audit.hu_wasserstein(same, real) == {"other": 0.0, "fat": 0.0, "nodule": 0.0}
    assert audit.hu_wasserstein(shifted, real) == pytest.approx({"other": 37.0, "fat": 37.0, "nodule": 37.0})


def test_class_samples_caps_each_class_and_keeps_hu_with_its_label():
    rng = np.random.default_rng(0)
    hu, label, mask = _chest(rng)
    samples = audit.class_samples(np.asfortranarray(hu), np.asfortranarray(label), rng, cap=300)
    nodule = int(mask.sum())
    assert nodule < 300
    assert {k: len(v) for k, v in samples.items()} == {Tissue.OTHER: 300, Tissue.FAT: 300, Tissue.NODULE: nodule}
    assert samples[Tissue.NODULE].tolist() == [50] * nodule
    assert samples[Tissue.FAT].mean() == pytest.approx(-100, abs=10)


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 5))
    assert audit.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([1.0, 0, 0, 0, 0]) * a.std(0)[0] * 2
    near = audit.frechet_distance(a, a + 0.1 * a.std(0), reference=a)
    far = audit.frechet_distance(a, shifted, reference=a)
    assert far == pytest.approx(4.0, rel=0.01)  # a mean shift of 2 standard deviations in one feature
    assert near < far
    assert audit.frechet_distance(a[:1], a) is None


def test_radiomic_features_are_finite_even_for_a_flat_patch():
    flat = np.full((32, 32), -1000, np.int16)
    textured = np.random.default_rng(0).normal(-800, 60, (32, 32)).astype(np.int16)
    for patch in (flat, textured):
        values = audit.radiomic_features(patch)
        assert values.shape == (len(audit.FEATURES),) and np.isfinite(values).all()
    assert audit.radiomic_features(textured)[1] > audit.radiomic_features(flat)[1]  # std


def test_nodule_contrast_and_interslice_on_known_volumes():
    hu, label, mask = _chest(np.random.default_rng(0))
    assert audit.nodule_contrast(hu, mask, label) == pytest.approx(900, abs=5)
    assert audit.nodule_contrast(hu, np.zeros_like(mask), label) is None
    flicker = np.zeros((8, 8, 6), np.int16)
    flicker[:, :, ::2] = 100
    assert audit.interslice(flicker, np.zeros(flicker.shape, np.uint8)) == 100
    assert audit.interslice(np.zeros_like(flicker), np.zeros(flicker.shape, np.uint8)) == 0
    outside = np.full(flicker.shape, Tissue.OUTSIDE_AIR, np.uint8)
    assert audit.interslice(flicker, outside) == 0  # air around the body does not count


def test_similarity_is_one_for_a_copy_and_lower_for_noise_and_other_images():
    rng = np.random.default_rng(0)
    hu, label, _ = _chest(rng)
    noisy = (hu + rng.normal(0, 3, hu.shape)).astype(np.int16)
    other, _, _ = _chest(np.random.default_rng(5))
    assert audit.similarity(hu, hu) == pytest.approx(1.0)
    assert 0.9 < audit.similarity(noisy, hu) < 1.0
    assert audit.similarity(other, hu) < audit.similarity(noisy, hu)
    means = audit.class_means(audit.class_samples(hu, label, rng, 10**6))
    assert means[Tissue.OTHER] == pytest.approx(-850, abs=2) and means[Tissue.BONE] == 700  # unseen: the default
    synthetic_vs_source, label_only = audit.source_similarities(noisy, hu, audit.render_labels(label, means))
    assert audit.source_excess(synthetic_vs_source, label_only) > 0.9
    assert audit.source_excess(label_only, label_only) == 0.0


def test_mean_pairwise_ssim_is_one_for_identical_volumes_and_lower_for_different_ones():
    rng = np.random.default_rng(0)
    volume = _chest(rng)[0]
    assert audit.mean_pairwise_ssim([volume] * 4, max_pairs=10, seed=0) == pytest.approx(1.0)
    different = [_chest(np.random.default_rng(k))[0] for k in range(5)]
    assert audit.mean_pairwise_ssim(different, max_pairs=3, seed=0) < 0.9
    assert audit.mean_pairwise_ssim(different[:1], max_pairs=3, seed=0) is None


def test_training_crops_nearest_finds_a_planted_copy_through_the_coarse_search():
    rng = np.random.default_rng(0)
    crops = np.stack([_chest(np.random.default_rng(k))[0] for k in range(12)])[:, :, :, :24]
    crops = np.stack([np.pad(c, ((0, 0), (0, 0), (0, 24)), constant_values=-1000)[:48, :48, :48] for c in crops])
    bank = audit.TrainingCrops([f"crop{k}" for k in range(12)], crops, size=48, grid=8)
    copy = (crops[7] + rng.normal(0, 3, crops[7].shape)).astype(np.int16)
    name, best, rendered = bank.nearest(copy, top_k=2)
    assert name == "crop7" and best > 0.95 and rendered is None
    painted = np.where(crops[7] < -500, -850, 0).astype(np.int16)
    assert bank.nearest(copy, top_k=2, rendering=painted)[2] < best
    assert bank.exhaustive_best(copy) == 7 and bank.coarse_order(copy)[0] == 7
    assert audit.coarse_recall([(bank.coarse_order(copy).tolist(), 7)], top_k=1) == 1.0


def test_privacy_flags_source_copies_and_volumes_nearer_a_crop_than_any_held_out_cube():
    def record(name, source, label_only, nearest, label_only_train=None):
        return {"volume_id": name, "source_similarity": source, "label_only_similarity": label_only,
                "nearest_train_similarity": nearest, "label_only_train_similarity": label_only_train}  # fmt: skip

    records = [
        record("honest", 0.5, 0.45, 0.3, 0.28),
        record("source", 0.95, 0.45, 0.3, 0.3),
        record("crop", 0.4, 0.45, 0.9, 0.3),
        record("overlap", 0.5, 0.45, 0.6, 0.55),  # near a crop, but no nearer than its own label map paints it
        record("no rendering", 0.5, 0.45, 0.6),
    ]
    result = audit.privacy(records, held_out=[0.2, 0.35, 0.31])
    assert result["threshold"] == 0.35
    assert result["flagged"] == ["source", "crop", "no rendering"]
    assert [r["flags"] for r in result["per_volume"]] == [[], ["source"], ["training"], [], ["training"]]
    assert result["per_volume"][2]["train_excess"] == pytest.approx((0.9 - 0.3) / 0.7)
    assert audit.privacy([dict(records[2])], held_out=[])["flagged"] == []  # no GAN data: no threshold


def test_cut_cubes_follows_the_synthetic_label_volumes_rule():
    label = np.full((40, 40, 40), Tissue.OUTSIDE_AIR, np.uint8)
    label[:, :, :20] = Tissue.SOFT_TISSUE  # the upper half has no tissue: cubes reaching into it are refused
    origins = audit.cut_cubes(label, 16, 5, np.random.default_rng(0))
    assert len(origins) == 5 and all(o[2] + 16 <= 20 for o in origins)
    assert audit.cut_cubes(label, 64, 5, np.random.default_rng(0)) == []


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="top_k"):
        audit.AuditConfig(top_k=0)


def test_nodule_patches_centre_on_each_nodule_and_real_volumes_are_measured_on_cubes():
    hu, label, mask = _chest(np.random.default_rng(0))
    (patch,) = audit.nodule_patches(hu, mask)
    assert patch.shape == (audit.PATCH, audit.PATCH) and patch[16, 16] == 50  # the nodule's centre
    assert audit.nodule_patches(hu, np.zeros_like(mask)) == []
    boxes = [(slice(0, 24), slice(0, 24), slice(0, 24)), (slice(24, 48), slice(24, 48), slice(0, 24))]
    every = audit.AuditConfig(voxels_per_class=10**6)
    features = audit.volume_features("v", hu, label, mask, np.random.default_rng(1), every, boxes)
    assert sum(len(v) for v in features.samples.values()) == 2 * 24**3  # the cubes' voxels, not the volume's
    assert len(features.nodule) == 1 and features.contrast == pytest.approx(900, abs=5)  # nodules: whole volume
    whole = audit.volume_features("v", hu, label, mask, np.random.default_rng(1), every)
    assert sum(len(v) for v in whole.samples.values()) == hu.size  # no cube: the whole volume
