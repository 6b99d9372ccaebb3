"""The real LIDC-IDRI-0001 case (133 DICOM slices + 4-reader XML) from the shared test data."""

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from ctsynth_ray.dataset import read_manifest, read_nifti
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.ingest.dicom import LPS_TO_RAS
from ctsynth_ray.ingest.lidc_xml import parse_lidc_xml
from ctsynth_ray.pipelines.ingest import ingest
from ctsynth_ray.pipelines.runtime import RayOptions

QUIET = RayOptions(progress=False)


@pytest.fixture(scope="module")
def lidc_case(test_data, tmp_path_factory):
    src = test_data / "lidc" / "LIDC-IDRI-0001"
    out = tmp_path_factory.mktemp("lidc") / "ds"
    report = ingest("lidc", src, out, ray_options=QUIET)
    assert report.ok, report.failed
    (row,) = read_manifest(out)
    hu, affine = read_nifti(out / row["image"])
    mask, _mask_affine = read_nifti(out / row["mask"])
    return src, row, hu, affine, mask


def test_grid_spacing_dtype(lidc_case):
    _, row, hu, affine, mask = lidc_case
    assert row["volume_id"] == "LIDC-IDRI-0001" and row["source"] == "lidc"
    # 512 px x 0.703125 mm -> 736 px x 0.48828125 mm; 133 slices x 2.5 mm -> 331 slices x 1 mm.
    assert hu.shape == mask.shape == (736, 736, 331)
    assert hu.dtype == np.int16 and mask.dtype == np.uint8
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), (0.48828125, 0.48828125, 1.0))
    assert row["series_uid"] == "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    assert row["n_readers"] == 4 and row["n_slices_dicom"] == 133


def test_affine_is_ras_from_the_dicom_geometry(lidc_case):
    src, _, _, affine, _ = lidc_case
    first = min((pydicom.dcmread(p, stop_before_pixels=True) for p in (src / "dicom").glob("*.dcm")),
                key=lambda d: float(d.ImagePositionPatient[2]))  # fmt: skip
    lps = np.array([float(v) for v in first.ImagePositionPatient])
    np.testing.assert_allclose(affine[:3, 3], lps * np.array([-1, -1, 1]), atol=1e-4)
    assert affine[0, 0] < 0 and affine[1, 1] < 0 and affine[2, 2] > 0  # DICOM LPS rows/cols flipped to RAS


def test_hu_range(lidc_case):
    _, _, hu, _, _ = lidc_case
    assert hu.min() >= -1024 and hu.max() <= 1900
    corner = hu[:40, :40, :]  # outside the scan field: was -2048 HU, now air
    assert np.all(corner == -1000)
    sample = hu[::4, ::4, ::4]
    lung, soft, bone = (
        ((sample > -950) & (sample < -700)).mean(),
        ((sample > 0) & (sample < 100)).mean(),
        (sample > 500).mean(),
    )
    assert lung > 0.05 and soft > 0.05 and 0.001 < bone < 0.05, (lung, soft, bone)


def test_consensus_mask_sits_where_the_readers_drew(lidc_case):
    src, row, _, affine, mask = lidc_case
    reading = parse_lidc_xml(src / "069.xml")
    headers = {
        str(d.SOPInstanceUID): d
        for d in (pydicom.dcmread(p, stop_before_pixels=True) for p in (src / "dicom").glob("*.dcm"))
    }
    points = []  # every reader's outline point of a nodule >= 3 mm, in RAS mm
    for nodule in reading.nodules:
        for roi in nodule.rois:
            d = headers[roi.sop_uid]
            ipp = np.array([float(v) for v in d.ImagePositionPatient])
            dr, dc = (float(v) for v in d.PixelSpacing)
            for x, y in roi.points:
                lps = ipp + np.array([x * dc, y * dr, 0.0])
                points.append(LPS_TO_RAS[:3, :3] @ lps)
    points = np.array(points)
    assert row["n_nodules"] == 1 and row["nodules"][0]["n_readers"] == 4
    # Outline points lie next to the consensus mask (they are drawn just outside it): half within a voxel,
    # 95 % within one source slice (2.5 mm; the end slices of a nodule are marked by fewer readers) ...
    index = np.rint(np.linalg.solve(affine, np.c_[points, np.ones(len(points))].T)[:3].T).astype(int)
    lo = np.minimum(index.min(0), np.argwhere(mask).min(0)) - 5  # a crop keeps the distance transform quick
    hi = np.maximum(index.max(0), np.argwhere(mask).max(0)) + 6
    crop = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    distance_mm = ndimage.distance_transform_edt(crop == 0, sampling=(0.48828125, 0.48828125, 1.0))
    near = distance_mm[tuple((index - lo).T)]
    assert np.median(near) <= 0.5 and np.percentile(near, 95) <= 2.5, np.percentile(near, [50, 95, 100])
    # ... and the mask's centroid is the outlines' centre.
    centre = np.array([row["nodules"][0][f"center_{a}_mm"] for a in "xyz"])
    assert np.linalg.norm(centre - points.mean(0)) < 3.0
    assert 15 < row["nodules"][0]["diameter_mm"] < 35


def test_a_folder_with_only_an_orphan_xml_is_one_error_and_writes_nothing(test_data, tmp_path):
    with pytest.raises(CtsynthError, match=r"no DICOM series found: nothing to ingest \(1 problem\(s\); the first: "
                                           r".*071.xml: no DICOM series with SeriesInstanceUID"):  # fmt: skip
        ingest("lidc", test_data / "lidc" / "xml-only", tmp_path / "ds", ray_options=QUIET)
    assert not (tmp_path / "ds").exists()


def test_jpeg2000_series_decodes(test_data, tmp_path):
    report = ingest("lidc", test_data / "ct" / "abdomen_dicom_j2k", tmp_path / "ds", ray_options=QUIET)
    assert report.ok, report.failed
    assert any("no LIDC reader XML" in n for n in report.notes)
    (row,) = read_manifest(tmp_path / "ds")
    hu, _ = read_nifti(tmp_path / "ds" / row["image"])
    assert row["n_nodules"] == 0 and row["source_spacing_z"] == pytest.approx(2.0)
    assert hu.shape == (1023, 1023, 39)
    assert np.percentile(hu, 99) > 100 and hu.min() >= -1024  # real tissue decoded, not zeros


def test_a_second_copy_of_a_reader_xml_counts_once(test_data, tmp_path):
    """TCIA's image download and its XML zip can both hold a series' XML: four readers, not eight."""
    import shutil

    from ctsynth_ray.ingest.cases import find_lidc_cases

    case = shutil.copytree(test_data / "lidc" / "LIDC-IDRI-0001", tmp_path / "LIDC-IDRI-0001")
    (tmp_path / "tcia-lidc-xml" / "157").mkdir(parents=True)
    shutil.copy(case / "069.xml", tmp_path / "tcia-lidc-xml" / "157" / "069.xml")
    (found,), problems = find_lidc_cases(tmp_path)
    assert found.xml_paths == [case / "069.xml"] and not problems
