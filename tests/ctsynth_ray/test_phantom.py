import numpy as np
import pytest
from scipy import ndimage

from ctsynth_ray.lidc_sizes import DIAMETER_QUANTILES_MM, sample_diameter_mm
from ctsynth_ray.phantom import TISSUES, PhantomConfig, assign_splits, make_phantom

# Expected mean HU of each tissue's interior (eroded, so the PSF blur at borders does not count).
TISSUE_HU_RANGES = {
    "air": (-1010, -990),
    "lung": (-900, -700),
    "fat": (-120, -80),
    "muscle": (40, 60),
    "liver": (45, 70),
    "marrow": (150, 400),
}


@pytest.fixture(scope="module")
def phantoms():
    config = PhantomConfig()
    return [make_phantom(11, i, config) for i in range(3)]


def test_same_seed_and_index_give_the_same_volume(small_phantom_config):
    a = make_phantom(5, 3, small_phantom_config).volume
    b = make_phantom(5, 3, small_phantom_config).volume
    c = make_phantom(5, 4, small_phantom_config).volume
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.hu, c.hu)


def test_volume_format(phantoms):
    volume = phantoms[0].volume
    assert volume.hu.dtype == np.int16 and volume.mask.dtype == np.uint8
    assert volume.hu.shape == volume.mask.shape == (256, 192, 128)
    assert volume.spacing_mm == pytest.approx((0.48828125, 0.48828125, 1.0))
    assert set(np.unique(volume.mask)) <= {0, 1}


@pytest.mark.parametrize("tissue", sorted(TISSUE_HU_RANGES))
def test_hu_statistics_per_tissue(phantoms, tissue):
    low, high = TISSUE_HU_RANGES[tissue]
    for phantom in phantoms:
        core = ndimage.binary_erosion(phantom.tissues == TISSUES.index(tissue), iterations=2)
        values = phantom.volume.hu[core]
        assert values.size > 1000, tissue
        assert low <= values.mean() <= high, (tissue, values.mean())
        assert 5 < values.std() < 80, (tissue, values.std())  # scanner noise, not flat


def test_cortical_bone_is_dense_and_marrow_lower(phantoms):
    for phantom in phantoms:
        hu, tissues = phantom.volume.hu, phantom.tissues
        cortex = hu[tissues == TISSUES.index("cortical_bone")]
        marrow = hu[ndimage.binary_erosion(tissues == TISSUES.index("marrow"))]
        assert np.percentile(cortex, 75) > 700
        assert marrow.mean() < cortex.mean() - 200


def test_lungs_are_textured_and_hold_vessels(phantoms):
    for phantom in phantoms:
        lung = phantom.tissues == TISSUES.index("lung")
        blood_in_lung = ndimage.binary_dilation(lung, iterations=2) & (phantom.tissues == TISSUES.index("blood"))
        assert blood_in_lung.sum() > 2000  # a vessel tree, not an empty lung
        # Texture: smoothed lung HU varies over space, not only voxel noise.
        smooth = ndimage.uniform_filter(phantom.volume.hu.astype(np.float32), 7)[
            ndimage.binary_erosion(lung, iterations=4)
        ]
        assert smooth.std() > 8


def test_every_thesis_label_class_is_present_in_plausible_proportions(phantoms):
    for phantom in phantoms:
        hu = phantom.volume.hu
        other, fat, water = (hu < -200).mean(), ((hu >= -200) & (hu < 0)).mean(), (hu == 0).mean()
        soft, bone = ((hu > 0) & (hu <= 500)).mean(), (hu > 500).mean()
        assert 0.35 < other < 0.8 and 0.05 < fat < 0.35 and 0.05 < soft < 0.35
        assert 0.002 < bone < 0.06 and 0 < water < 0.01


def test_nodules_are_mostly_in_lung_and_sized_in_mm():
    config = PhantomConfig(shape=(192, 160, 96))
    counts, in_lung, diameters = [], [], []
    for i in range(12):
        phantom = make_phantom(3, i, config)
        counts.append(len(phantom.nodules))
        lung_ish = np.isin(phantom.tissues, [TISSUES.index(t) for t in ("lung", "blood", "airway", "nodule")])
        for nodule in phantom.nodules:
            centre = tuple(round(c) for c in nodule.center_vox)
            in_lung.append(bool(lung_ish[centre]))
            diameters.append(nodule.diameter_mm)
            assert phantom.volume.mask[centre] == 1
    assert 0 in counts and max(counts) <= 3
    assert np.mean(in_lung) > 0.9
    assert min(diameters) >= 3.0 and max(diameters) <= 30.0


def test_nodule_edges_are_partial_volume():
    # The first phantom of seed 0 whose nodules are all solid (index 2 draws two).
    phantom = next(p for p in (make_phantom(0, i, PhantomConfig()) for i in range(10))
                   if p.nodules and all(n.texture == "solid" for n in p.nodules))  # fmt: skip
    mask = phantom.volume.mask.astype(bool)
    edge = ndimage.binary_dilation(mask) & ~mask
    inside = ndimage.binary_erosion(mask, iterations=2)
    hu = phantom.volume.hu
    # Just outside the mask, HU lie between lung and solid nodule.
    assert hu[inside].mean() - 100 > hu[edge].mean() > -850


def test_sizes_follow_the_lidc_distribution():
    rng = np.random.default_rng(0)
    sizes = np.array([sample_diameter_mm(rng, 3.0, 70.0) for _ in range(4000)])
    assert np.median(sizes) == pytest.approx(DIAMETER_QUANTILES_MM[10], rel=0.05)
    assert np.percentile(sizes, 90) == pytest.approx(DIAMETER_QUANTILES_MM[18], rel=0.1)
    clipped = np.array([sample_diameter_mm(rng, 3.0, 30.0) for _ in range(500)])
    assert clipped.min() >= 3.0 and clipped.max() <= 30.0


@pytest.mark.parametrize(
    "n, fractions, expected",
    [(10, (0.8, 0.1, 0.1), {"train": 8, "val": 1, "test": 1}), (3, (0.8, 0.1, 0.1), {"train": 1, "val": 1, "test": 1}),
     (5, (1.0, 0.0, 0.0), {"train": 5})],
)  # fmt: skip
def test_assign_splits_gives_exact_counts(n, fractions, expected):
    splits = assign_splits(n, fractions, seed=1)
    assert {k: splits.count(k) for k in set(splits)} == expected
    assert splits == assign_splits(n, fractions, seed=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"shape": (10, 64, 64)}, "at least 32"), ({"spacing_mm": (0.5, 0, 1)}, "positive"),
     ({"max_nodules": 4}, "0 to 3"), ({"nodule_diameter_mm": (5, 3)}, "low <= high")],
)  # fmt: skip
def test_bad_configurations_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PhantomConfig(**kwargs)
