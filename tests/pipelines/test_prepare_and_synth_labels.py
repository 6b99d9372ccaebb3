import json
import shutil

import numpy as np
import pytest

from ctsynth_ray.dataset import read_manifest, read_nifti, read_prepare_record
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.nodule_bank import build_template_bank, load_bank, save_bank
from ctsynth_ray.pipelines.prepare import prepare
from ctsynth_ray.pipelines.runtime import RayOptions
from ctsynth_ray.pipelines.synth_labels import synth_labels
from ctsynth_ray.synth_labels import SynthLabelConfig

QUIET = RayOptions(progress=False)


@pytest.fixture(scope="module")
def bank_path(labelled_dataset, tmp_path_factory):
    """Every nodule of the labelled dataset's train split, saved as a bank."""
    return save_bank(build_template_bank(labelled_dataset, None), tmp_path_factory.mktemp("bank") / "bank.parquet")


def test_prepare_writes_labels_bank_and_shards_readable_by_ray_data(copy_dataset, tmp_path, ray_session):
    dataset = copy_dataset()
    description = prepare(dataset, tmp_path / "gan", scheme="thesis", size=32, n_templates=2, ray_options=QUIET)
    rows = read_manifest(dataset)
    assert all(r["label"] == f"labels/{r['volume_id']}.nii.gz" and r["label_scheme"] == "thesis" for r in rows)
    label, _ = read_nifti(dataset / rows[0]["label"])
    assert label.dtype == np.uint8 and label.max() <= 5
    assert len(description["templates"]) == 2 and description["counts"]["train"]["2d"] > 0
    described = json.loads((tmp_path / "gan" / "gan_data.json").read_text())
    assert described["scheme"] == "thesis" and described["crops"] == "one"
    assert described["spacing_mm"] == [rows[0][f"spacing_{a}"] for a in "xyz"]
    trained = [r for r in rows if r["split"] == "train" and r["n_nodules"]]
    assert description["counts"]["train"]["3d"] == len(trained)  # one crop per volume, as the thesis
    import ray.data

    for kind, shape in (("2d", (32, 32)), ("2p5d", (3, 32, 32)), ("3d", (32, 32, 32))):
        shards = sorted(str(p) for p in (tmp_path / "gan" / "train").glob(f"{kind}-*.parquet"))
        batch = ray.data.read_parquet(shards).take_batch(2)
        assert batch["label"].shape[1:] == shape and batch["label"].dtype == np.uint8
        assert batch["hu"].dtype == np.int16


def test_prepare_records_the_gan_split_and_bank_in_the_dataset(copy_dataset, tmp_path):
    dataset = copy_dataset()
    prepare(dataset, tmp_path / "gan", size=32, kinds=["3d"], n_templates=2, crops="per-nodule", ray_options=QUIET)
    record = read_prepare_record(dataset)
    rows = read_manifest(dataset)
    assert record["gan_data"] == str((tmp_path / "gan").resolve()) and record["gan_train_split"] == "train"
    assert record["gan_train_volumes"] == [r["volume_id"] for r in rows if r["split"] == "train" and r["n_nodules"]]
    assert [t.template_id for t in load_bank(record["bank"])] == [
        t["template_id"] for t in json.loads((tmp_path / "gan" / "gan_data.json").read_text())["templates"]
    ]


def test_synth_labels_is_independent_of_worker_count(labelled_dataset, bank_path, tmp_path, ray_session):
    config = SynthLabelConfig(size=48)
    one = synth_labels(labelled_dataset, tmp_path / "one", 6, config=config, bank=bank_path, seed=4,
                       ray_options=QUIET, chunk=4)  # fmt: skip
    two = synth_labels(labelled_dataset, tmp_path / "two", 6, config=config, bank=bank_path, seed=4,
                       ray_options=RayOptions(workers=2, progress=False), chunk=2)  # fmt: skip
    assert [r["volume_id"] for r in one] == [r["volume_id"] for r in two]
    for a, b in zip(one, two):
        assert a == b
        for column in ("label", "mask"):
            np.testing.assert_array_equal(
                read_nifti(tmp_path / "one" / a[column])[0], read_nifti(tmp_path / "two" / b[column])[0]
            )
    assert all(r["image"] is None and r["source"] == "synthetic" for r in one)


def test_synth_labels_pastes_from_the_bank_prepare_saved(copy_dataset, tmp_path):
    dataset = copy_dataset()
    prepare(dataset, tmp_path / "gan", size=32, kinds=["3d"], n_templates=1, seed=5, ray_options=QUIET)
    (template,) = load_bank(tmp_path / "gan" / "nodule_bank.parquet")
    config = SynthLabelConfig(size=48, p_nodule=1.0)
    rows = synth_labels(dataset, tmp_path / "sl", 8, config=config, seed=1, ray_options=QUIET)
    assert {r["template_id"] for r in rows if r["inserted_nodule"]} == {template.template_id}
    other = save_bank([t for t in build_template_bank(dataset, None) if t.template_id != template.template_id],
                      tmp_path / "other.parquet")  # fmt: skip
    rows = synth_labels(dataset, tmp_path / "sl2", 8, config=config, bank=other, seed=1, ray_options=QUIET)
    assert template.template_id not in {r["template_id"] for r in rows}
    with pytest.raises(CtsynthError, match="no such template bank"):
        synth_labels(dataset, tmp_path / "sl3", 2, config=config, bank=tmp_path / "missing.parquet", ray_options=QUIET)


def test_synth_labels_without_a_bank_says_how_to_get_one(labelled_dataset, tmp_path):
    with pytest.raises(CtsynthError, match=r"no template bank: run `ctsynth prepare .*` or pass --bank"):
        synth_labels(labelled_dataset, tmp_path / "sl", 2, config=SynthLabelConfig(size=48), ray_options=QUIET)
    rows = synth_labels(labelled_dataset, tmp_path / "none", 2, config=SynthLabelConfig(size=48, p_nodule=0.0),
                        ray_options=QUIET)  # fmt: skip
    assert not any(r["inserted_nodule"] for r in rows)  # no nodule to paste: no bank needed


def test_a_dataset_rewritten_in_place_is_not_served_from_the_cache(labelled_dataset, bank_path, tmp_path,
                                                                  small_phantom_config):  # fmt: skip
    """One process, two calls, the same source path: the second must cut its cubes from the new volumes."""
    from ctsynth_ray.pipelines.phantoms import make_phantom_dataset
    from ctsynth_ray.pipelines.prepare import write_label_maps

    source = tmp_path / "source"
    shutil.copytree(labelled_dataset, source)
    config = SynthLabelConfig(size=48)
    first = synth_labels(source, tmp_path / "a", 3, config=config, bank=bank_path, ray_options=QUIET)
    shutil.rmtree(source)
    make_phantom_dataset(source, 4, config=small_phantom_config, seed=99, split_fractions=(1.0, 0.0, 0.0),
                         ray_options=QUIET)  # fmt: skip
    write_label_maps(source, "body", QUIET)
    second = synth_labels(source, tmp_path / "b", 3, config=config, bank=bank_path, ray_options=QUIET)
    new_ids = {r["volume_id"] for r in read_manifest(source)}
    assert {r["source_volume_id"] for r in second} <= new_ids
    assert not {r["source_volume_id"] for r in first} & new_ids
    for row in second:
        source_row = next(r for r in read_manifest(source) if r["volume_id"] == row["source_volume_id"])
        origin = [row[f"cube_origin_{a}"] for a in "xyz"]
        cube = read_nifti(source / source_row["label"])[0][tuple(slice(o, o + 48) for o in origin)]
        label = read_nifti(tmp_path / "b" / row["label"])[0]
        np.testing.assert_array_equal(label[label != 5], cube[label != 5])
