import json

import numpy as np

from ctsynth_ray.dataset import read_manifest, read_nifti
from ctsynth_ray.pipelines.prepare import prepare
from ctsynth_ray.pipelines.synth_labels import synth_labels
from ctsynth_ray.synth_labels import SynthLabelConfig


def test_prepare_writes_labels_bank_and_shards_readable_by_ray_data(copy_dataset, tmp_path, ray_session):
    dataset = copy_dataset()
    description = prepare(dataset, tmp_path / "gan", scheme="thesis", size=32, n_templates=2, progress=False)
    rows = read_manifest(dataset)
    assert all(r["label"] == f"labels/{r['volume_id']}.nii.gz" and r["label_scheme"] == "thesis" for r in rows)
    label, _ = read_nifti(dataset / rows[0]["label"])
    assert label.dtype == np.uint8 and label.max() <= 5
    assert len(description["templates"]) == 2 and description["counts"]["train"]["2d"] > 0
    assert json.loads((tmp_path / "gan" / "gan_data.json").read_text())["scheme"] == "thesis"
    import ray.data

    for kind, shape in (("2d", (32, 32)), ("2p5d", (3, 32, 32)), ("3d", (32, 32, 32))):
        shards = sorted(str(p) for p in (tmp_path / "gan" / "train").glob(f"{kind}-*.parquet"))
        batch = ray.data.read_parquet(shards).take_batch(2)
        assert batch["label"].shape[1:] == shape and batch["label"].dtype == np.uint8
        assert batch["hu"].dtype == np.int16


def test_synth_labels_is_independent_of_worker_count(labelled_dataset, tmp_path, ray_session):
    config = SynthLabelConfig(size=48)
    one = synth_labels(labelled_dataset, tmp_path / "one", 6, config=config, seed=4, progress=False, chunk=4)
    two = synth_labels(labelled_dataset, tmp_path / "two", 6, config=config, seed=4, workers=2, progress=False, chunk=2)
    assert [r["volume_id"] for r in one] == [r["volume_id"] for r in two]
    for a, b in zip(one, two):
        assert {k: v for k, v in a.items()} == {k: v for k, v in b.items()}
        for column in ("label", "mask"):
            np.testing.assert_array_equal(
                read_nifti(tmp_path / "one" / a[column])[0], read_nifti(tmp_path / "two" / b[column])[0]
            )
    assert all(r["image"] is None and r["source"] == "synthetic" for r in one)
