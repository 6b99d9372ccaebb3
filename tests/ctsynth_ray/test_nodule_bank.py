import numpy as np
import pytest
from scipy import ndimage

from ctsynth_ray.dataset import Volume, centred_affine, load_volume, read_manifest
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.nodule_bank import (
    MARGIN_VOX,
    NoduleTemplate,
    build_template_bank,
    choose_templates,
    nodule_components,
    volume_templates,
)


def nodule_volume() -> Volume:
    """Nodules at the borders (their margin clipped), touching diagonally, and one too small (2 voxels at 1 mm)."""
    rng = np.random.default_rng(4)
    mask = np.zeros((25, 22, 19), np.uint8)
    mask[0:3, 4:7, 5:8] = 1  # at x = 0
    mask[10:14, 18:22, 0:3] = 1  # at the y end and z = 0
    mask[14, 17, 3] = 1  # diagonal neighbour of the one above
    mask[20:23, 8:11, 16:19] = 1  # at the z end
    mask[5, 15, 10:12] = 1  # 2 voxels: 1.56 mm, no template
    hu = rng.integers(-1024, 3071, mask.shape).astype(np.int16)
    label = rng.integers(0, 7, mask.shape).astype(np.uint8)
    return Volume("v", np.asfortranarray(hu), np.asfortranarray(mask), centred_affine(mask.shape, (1.0, 1.0, 1.0)),
                  np.asfortranarray(label))  # fmt: skip


def reference_templates(volume: Volume) -> list[NoduleTemplate]:
    """Templates as one whole-volume labelling finds them (what the bounding-box version must equal bit for bit)."""
    labelled, _ = ndimage.label(volume.mask > 0, structure=np.ones((3, 3, 3), bool))
    out = []
    for k, box in enumerate(ndimage.find_objects(labelled), start=1):
        diameter = float((6 * (labelled[box] == k).sum() * 1.0 / np.pi) ** (1 / 3))
        if diameter >= 3.0:
            grown = tuple(slice(max(s.start - MARGIN_VOX, 0), min(s.stop + MARGIN_VOX, n))
                          for s, n in zip(box, volume.mask.shape))  # fmt: skip
            out.append(NoduleTemplate(f"v#{k}", "v", diameter, (labelled[grown] == k).astype(np.uint8),
                                      volume.label[grown].copy(), volume.hu[grown].copy()))  # fmt: skip
    return out


def test_templates_are_those_of_a_whole_volume_labelling():
    volume = nodule_volume()
    got, expected = volume_templates(volume), reference_templates(volume)
    assert [t.template_id for t in got] == [t.template_id for t in expected] == ["v#1", "v#3", "v#4"]  # 2: small
    for template, reference in zip(got, expected):
        assert (template.template_id, template.diameter_mm) == (reference.template_id, reference.diameter_mm)
        for field in ("mask", "label", "hu"):
            a, b = getattr(template, field), getattr(reference, field)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes() and a.shape == b.shape
    assert volume_templates(Volume("empty", volume.hu, np.zeros_like(volume.mask), volume.affine, volume.label)) == []
    with pytest.raises(CtsynthError, match="v: needs an image and a label map"):
        volume_templates(Volume("v", volume.hu, volume.mask, volume.affine))


def test_components_are_labelled_in_the_grown_bounding_box_as_in_the_whole_volume():
    mask = nodule_volume().mask
    whole, count = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), bool))
    for margin in (0, 2, 40):
        origin, labelled, n = nodule_components(mask, margin)
        assert n == count
        box = tuple(slice(o, o + s) for o, s in zip(origin, labelled.shape))
        np.testing.assert_array_equal(labelled, whole[box])
        assert (whole[box] > 0).sum() == mask.sum()  # nothing outside the box
    origin, labelled, n = nodule_components(np.zeros((4, 4, 4), np.uint8))
    assert n == 0 and labelled.size == 0


def test_choice_keeps_the_candidates_order_and_names_the_dataset_when_empty():
    candidates = [NoduleTemplate(f"t{k}", "v", 3.0, *[np.zeros((1, 1, 1), np.uint8)] * 3) for k in range(10)]
    assert [t.template_id for t in choose_templates(candidates, 3, 0, "ds")] == ["t4", "t5", "t7"]  # pinned
    assert [t.template_id for t in choose_templates(candidates, 3, 4, "ds")] == ["t0", "t1", "t2"]
    assert choose_templates(candidates, None, 0, "ds") == candidates == choose_templates(candidates, 10, 0, "ds")
    with pytest.raises(CtsynthError, match=r"^/data/ds: no nodule >= 3 mm in the train split"):
        choose_templates([], 15, 0, "/data/ds")


def test_the_bank_is_the_choice_over_each_train_volumes_candidates(labelled_dataset):
    """What a per-volume pipeline assembles: candidates of each train volume in manifest order, then the choice."""
    candidates = [template for row in read_manifest(labelled_dataset) if row["split"] == "train" and row["n_nodules"]
                  for template in volume_templates(load_volume(labelled_dataset, row))]  # fmt: skip
    for n_templates, seed in ((None, 0), (2, 1)):
        bank = build_template_bank(labelled_dataset, n_templates, seed)
        chosen = choose_templates(candidates, n_templates, seed, labelled_dataset)
        assert [t.template_id for t in bank] == [t.template_id for t in chosen]
        assert all(a.hu.tobytes() == b.hu.tobytes() and a.mask.tobytes() == b.mask.tobytes()
                   for a, b in zip(bank, chosen))  # fmt: skip
