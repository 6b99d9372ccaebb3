import numpy as np
import pytest

from ctsynth_ray.dataset import read_manifest, read_nifti
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.labels import Tissue, lung_like
from ctsynth_ray.nodule_bank import augment_template, build_template_bank, load_bank, save_bank
from ctsynth_ray.pipelines.runtime import RayOptions
from ctsynth_ray.synth_labels import SourceCache, SynthLabelConfig, check_sources, make_label_volume

QUIET = RayOptions(progress=False)

SIZE = 48


@pytest.fixture(scope="module")
def setup(labelled_dataset):
    cache = SourceCache(labelled_dataset, check_sources(labelled_dataset, SIZE))
    bank = build_template_bank(labelled_dataset, None)
    return labelled_dataset, cache, bank


def source_cube(cache, extras):
    """The cube of the source's label map and of its own mask file (the cache decodes only the label map)."""
    k = next(k for k in range(len(cache)) if cache.get(k).volume_id == extras["source_volume_id"])
    o = [extras[f"cube_origin_{a}"] for a in "xyz"]
    box = tuple(slice(v, v + SIZE) for v in o)
    return cache.get(k).label[box], read_nifti(cache.root / cache.rows[k]["mask"])[0][box]


def test_bank_holds_nodules_of_the_train_split_with_provenance(setup, tmp_path):
    root, _, bank = setup
    train = {r["volume_id"] for r in read_manifest(root) if r["split"] == "train"}
    assert bank and all(t.source_volume_id in train and t.diameter_mm >= 3 for t in bank)
    for t in bank:
        assert t.mask.shape == t.label.shape == t.hu.shape
        assert np.all(t.label[t.mask > 0] == Tissue.NODULE)
    back = load_bank(save_bank(bank, tmp_path / "bank.parquet"))
    assert [t.template_id for t in back] == [t.template_id for t in bank]
    np.testing.assert_array_equal(back[0].hu, bank[0].hu)
    assert len(build_template_bank(root, 1)) == 1


def test_augmentation_scales_within_20_percent():
    """A large sphere, so that voxelisation hardly moves its size: the scale is the cube root of the volume ratio."""
    from ctsynth_ray.nodule_bank import NoduleTemplate

    grid = np.indices((25, 25, 25)) - 12
    sphere = ((grid**2).sum(axis=0) <= 10**2).astype(np.uint8)
    template = NoduleTemplate("sphere", "v", 20.0, sphere, sphere * Tissue.NODULE, sphere.astype(np.int16))
    rng = np.random.default_rng(0)
    scales = [np.cbrt(augment_template(template, rng).sum() / sphere.sum()) for _ in range(60)]
    assert 0.78 <= min(scales) < 0.86 and 1.14 < max(scales) <= 1.22


def test_label_volume_invariants_and_paste_constraint(setup):
    _, cache, bank = setup
    config = SynthLabelConfig(size=SIZE)
    pasted = 0
    for i in range(40):
        volume, extras = make_label_volume(3, i, cache, bank, config)
        label, mask = volume.label, volume.mask
        assert label.shape == mask.shape == (SIZE,) * 3
        np.testing.assert_array_equal(label == Tissue.NODULE, mask == 1)  # label 5 exactly where mask is 1
        original_label, original_mask = source_cube(cache, extras)
        assert np.all(mask[original_mask > 0] == 1)  # original nodules in the cube stay in the mask
        tissue = (label != Tissue.OTHER) & (label != Tissue.OUTSIDE_AIR)
        assert tissue.any(axis=(0, 1)).all()  # no empty axial slice
        if extras["inserted_nodule"]:
            pasted += 1
            new = (mask > 0) & (original_mask == 0)
            assert new.any()
            assert lung_like(original_label)[new].mean() >= 0.8 - 1e-9  # >= 80 % of the nodule on lung
            assert lung_like(original_label)[tuple(extras[f"nodule_center_{a}"] for a in "xyz")]
    assert pasted > 0


@pytest.mark.parametrize("p", [0.0, 0.5, 0.8])
def test_share_of_pasted_volumes_is_p_within_sampling_error(setup, p):
    _, cache, bank = setup
    n = 150
    flags = [
        make_label_volume(11, i, cache, bank, SynthLabelConfig(size=SIZE, p_nodule=p, augment=False))[1]
        for i in range(n)
    ]
    attempted = sum(f["inserted_nodule"] or f["paste_failed"] for f in flags)
    assert abs(attempted / n - p) <= 3 * np.sqrt(p * (1 - p) / n) + 1e-9


def test_determinism_depends_only_on_seed_and_index(setup):
    _, cache, bank = setup
    config = SynthLabelConfig(size=SIZE)
    a, ea = make_label_volume(5, 7, cache, bank, config)
    b, eb = make_label_volume(5, 7, cache, bank, config)
    c, _ = make_label_volume(5, 8, cache, bank, config)
    np.testing.assert_array_equal(a.label, b.label)
    assert ea == eb and not np.array_equal(a.label, c.label)


def test_cube_affine_places_the_cube_in_the_source(setup):
    _, cache, bank = setup
    volume, extras = make_label_volume(1, 0, cache, bank, SynthLabelConfig(size=SIZE))
    source = next(cache.get(k) for k in range(len(cache)) if cache.get(k).volume_id == extras["source_volume_id"])
    origin = np.array([extras[f"cube_origin_{a}"] for a in "xyz"])
    np.testing.assert_allclose(volume.affine @ [0, 0, 0, 1], source.affine @ [*origin, 1])


def test_clear_errors(setup, tmp_path, copy_dataset):
    root, _, _ = setup
    with pytest.raises(CtsynthError, match="cube is larger than every train volume"):
        check_sources(root, 4096)
    with pytest.raises(CtsynthError, match="run `ctsynth prepare"):
        check_sources(copy_dataset(), SIZE)  # no label maps yet
    with pytest.raises(ValueError, match="p_nodule"):
        SynthLabelConfig(p_nodule=1.5)


def test_no_nodules_and_empty_train_split_are_clear_errors(tmp_path, small_phantom_config):
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctsynth_ray.pipelines.phantoms import make_phantom_dataset
    from ctsynth_ray.pipelines.prepare import write_label_maps

    root = tmp_path / "none"
    config = dataclasses.replace(small_phantom_config, max_nodules=0)
    make_phantom_dataset(root, 2, config=config, split_fractions=(1.0, 0.0, 0.0), ray_options=QUIET)
    write_label_maps(root, "thesis", QUIET)
    with pytest.raises(CtsynthError, match="no nodule >= 3 mm in the train split"):
        build_template_bank(root)
    table = pq.read_table(root / "manifest.parquet")
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(["test"] * table.num_rows))
    pq.write_table(table, root / "manifest.parquet")
    with pytest.raises(CtsynthError, match="the train split is empty"):
        check_sources(root, SIZE)


def test_grouped_label_synthesis_is_bitwise_drawing_one_by_one(setup, tmp_path):
    """synth-labels draws each volume's source from (seed, i) first and works source by source; volume i must be
    exactly what drawing it alone, from a fresh cache, gives."""
    from ctsynth_ray.pipelines.synth_labels import synth_labels
    from ctsynth_ray.synth_labels import plan_chunks, write_label_volumes

    root, cache, bank = setup
    config = SynthLabelConfig(size=SIZE)
    chunks = plan_chunks(4, range(12), len(cache), 5)
    assert len(cache) > 1 and [i for c in chunks for i in c] != list(range(12))  # grouping reorders the work
    grouped = synth_labels(root, tmp_path / "grouped", 12, config=config, bank=save_bank(bank, tmp_path / "b.parquet"),
                           seed=4, ray_options=QUIET, chunk=5)  # fmt: skip
    for row in grouped:
        fresh = SourceCache(root, check_sources(root, SIZE))
        (alone,) = write_label_volumes(tmp_path / "alone", root, 4, [row["synth_index"]], bank, config, fresh)
        assert alone == row
        for column in ("label", "mask"):
            assert (tmp_path / "alone" / alone[column]).read_bytes() == (
                tmp_path / "grouped" / row[column]
            ).read_bytes()
