import numpy as np
import pytest

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.ingest.lidc_xml import (
    Annotation,
    consensus_masks,
    consensus_nodules,
    group_annotations,
    outline_to_pixels,
    parse_lidc_xml,
)
from ctsynth_ray.resample import resample_mask, target_shape


def square_outline(x0, y0, size):
    """Pixels of a square outline, in order."""
    top = [(x, y0) for x in range(x0, x0 + size)]
    right = [(x0 + size - 1, y) for y in range(y0 + 1, y0 + size)]
    bottom = [(x, y0 + size - 1) for x in range(x0 + size - 2, x0 - 1, -1)]
    left = [(x0, y) for y in range(y0 + size - 2, y0, -1)]
    return np.array(top + right + bottom + left)


def test_outline_pixels_are_excluded_from_the_nodule():
    pixels = outline_to_pixels(square_outline(10, 20, 6), (64, 64))
    assert sorted(map(tuple, pixels.tolist())) == [(x, y) for x in range(11, 15) for y in range(21, 25)]


def test_tiny_outline_keeps_its_pixels():
    pixels = outline_to_pixels(np.array([[5, 5], [6, 5], [6, 6], [5, 6]]), (16, 16))
    assert len(pixels) >= 1


def test_parse_keeps_contoured_nodules_only(test_data):
    reading = parse_lidc_xml(test_data / "lidc" / "LIDC-IDRI-0001" / "069.xml")
    assert reading.n_readers == 4
    assert reading.series_uid.endswith("179049373636438705059720603192")
    assert reading.nodules and all(any(len(r.points) > 1 for r in n.rois) for n in reading.nodules)
    assert {n.reader for n in reading.nodules} == {0, 1, 2, 3}


def test_malformed_xml_names_the_file(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<LidcReadMessage><unclosed>")
    with pytest.raises(CtsynthError, match=r"bad\.xml: not readable XML"):
        parse_lidc_xml(bad)


def test_non_lidc_xml_is_ignored(tmp_path):
    other = tmp_path / "cxr.xml"
    other.write_text("<IdriReadMessage/>")
    assert parse_lidc_xml(other) is None


def cube(x, size=4, z=2):
    return np.array([(i, j, k) for i in range(x, x + size) for j in range(size) for k in range(z)])


def test_grouping_links_overlapping_readers_and_counts_votes():
    annotations = [
        Annotation(0, cube(10)),
        Annotation(1, cube(11)),
        Annotation(2, cube(12)),
        Annotation(3, cube(40)),  # one reader alone, far away
    ]
    groups = group_annotations(annotations, (1, 1, 1))
    assert sorted(map(sorted, groups)) == [[0, 1, 2], [3]]
    ((mask, readers),) = consensus_masks(annotations, groups, (64, 8, 4), min_readers=3)
    assert readers == 3
    # voxels of x 11..14 are marked by >= 2 of 3 readers; x 10 and 15 by one.
    assert sorted(set(np.argwhere(mask)[:, 0].tolist())) == [11, 12, 13, 14]
    assert consensus_masks(annotations, groups, (64, 8, 4), min_readers=4) == []


def test_same_reader_annotations_are_never_linked_directly():
    groups = group_annotations([Annotation(0, cube(10)), Annotation(0, cube(11))], (1, 1, 1))
    assert len(groups) == 2


def test_consensus_crops_are_the_whole_grid_masks_and_resample_alike():
    # Nodules at the grid's edges too, where the resampled box would reach outside a crop without a margin.
    annotations = [
        Annotation(0, cube(0, size=5, z=3)),
        Annotation(1, cube(1, size=4, z=3)),
        Annotation(2, cube(0, size=3, z=2)),
        Annotation(0, cube(57, size=7, z=4)),
        Annotation(1, cube(58, size=6, z=4)),
        Annotation(3, cube(59, size=5, z=3)),
    ]
    shape, spacing, new_spacing = (64, 8, 4), (0.7, 0.7, 2.5), (0.48828125, 0.48828125, 1.0)
    groups = group_annotations(annotations, spacing)
    nodules = consensus_nodules(annotations, groups, min_readers=3)
    masks = consensus_masks(annotations, groups, shape, min_readers=3)
    assert len(nodules) == len(masks) == 2
    new_shape = target_shape(shape, spacing, new_spacing)
    for nodule, (mask, readers) in zip(nodules, masks):
        assert nodule.n_readers == readers == 3 and nodule.mask.size < mask.size / 4
        whole = np.zeros(shape, np.uint8)
        whole[nodule.box] = nodule.mask
        np.testing.assert_array_equal(whole, mask)
        cropped = resample_mask(nodule.mask, spacing, new_spacing, new_shape, origin=nodule.origin, source_shape=shape)
        np.testing.assert_array_equal(cropped, resample_mask(mask, spacing, new_spacing, new_shape))
        assert cropped.any()
