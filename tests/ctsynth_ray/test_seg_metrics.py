import json
import math

import numpy as np
import pytest
from scipy import stats

from ctsynth_ray.dataset import centred_affine, write_nifti
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.seg_metrics import compare, read_scores_csv, score_folders, volume_scores, write_scores_csv


def masks(tp, fp, fn, tn):
    """1D-as-3D masks with exactly these confusion counts."""
    pred = np.array([1] * tp + [1] * fp + [0] * fn + [0] * tn, np.uint8)
    truth = np.array([1] * tp + [0] * fp + [1] * fn + [0] * tn, np.uint8)
    return pred.reshape(-1, 1, 1), truth.reshape(-1, 1, 1)


@pytest.mark.parametrize(
    "counts, expected",
    [((6, 2, 2, 90), {"sensitivity": 0.75, "accuracy": 0.96, "dice": 12 / 16, "f2": 30 / 40}),
     ((0, 0, 0, 10), {"sensitivity": math.nan, "accuracy": 1.0, "dice": math.nan, "f2": math.nan}),
     ((0, 3, 0, 7), {"sensitivity": math.nan, "accuracy": 0.7, "dice": 0.0, "f2": 0.0}),
     ((0, 0, 4, 6), {"sensitivity": 0.0, "accuracy": 0.6, "dice": 0.0, "f2": 0.0})],
)  # fmt: skip
def test_formulas_on_constructed_masks(counts, expected):
    scores = volume_scores(*masks(*counts))
    assert (scores["tp"], scores["fp"], scores["fn"], scores["tn"]) == counts
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, nan_ok=True), name
    assert scores["nodule_present"] == (counts[0] + counts[2] > 0)


def test_score_folders_and_csv_round_trip(tmp_path):
    affine = centred_affine((4, 4, 4), (1, 1, 1))
    for folder, value in (("pred", 1), ("truth", 1)):
        m = np.zeros((4, 4, 4), np.uint8)
        m[:2] = value
        write_nifti(tmp_path / folder / "a.nii.gz", m, affine)
    write_nifti(tmp_path / "pred" / "b.nii.gz", np.zeros((4, 4, 4), np.uint8), affine)
    write_nifti(tmp_path / "truth" / "b.nii.gz", np.zeros((4, 4, 4), np.uint8), affine)
    rows = score_folders(tmp_path / "pred", tmp_path / "truth")
    assert next(r["dice"] for r in rows) == 1.0 and math.isnan(rows[1]["dice"])
    csv = write_scores_csv(tmp_path / "s.csv", rows)
    text = csv.read_text().splitlines()
    assert text[0] == "volume_id,sensitivity,accuracy,dice,f2,nodule_present,tp,fp,fn,tn"
    assert text[2].startswith("b,,1.0,,,False")  # undefined ratios are empty
    back = read_scores_csv(csv)
    assert back["a"]["dice"] == 1.0 and math.isnan(back["b"]["dice"]) and back["b"]["nodule_present"] is False


def test_mismatched_grids_and_missing_counterparts_name_the_volume(tmp_path):
    write_nifti(tmp_path / "pred" / "a.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    write_nifti(tmp_path / "truth" / "a.nii.gz", np.zeros((4, 4, 5), np.uint8), np.eye(4))
    with pytest.raises(CtsynthError, match=r"^a: prediction grid"):
        score_folders(tmp_path / "pred", tmp_path / "truth")
    write_nifti(tmp_path / "truth" / "c.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    with pytest.raises(CtsynthError, match=r"^c: no c\.nii\.gz in"):
        score_folders(tmp_path / "pred", tmp_path / "truth")


def write_csv(path, rows, header="volume_id,sensitivity,dice,f2,nodule_present,extra"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_compare_against_hand_computed_statistics_and_scipy(tmp_path):
    base_dice, cand_dice = [0.2, 0.5, 0.4, 0.7, 0.6], [0.3, 0.55, 0.6, 0.65, 0.9]
    base = write_csv(tmp_path / "b.csv", [f"v{k},0.5,{d},0.4,yes,x" for k, d in enumerate(base_dice)] + ["n0,,,,no,x"])
    cand = write_csv(tmp_path / "c.csv", [f"v{k},0.6,{d},0.5,1,y" for k, d in enumerate(cand_dice)] + ["n0,,,,0,y"])
    result = compare(read_scores_csv(base), read_scores_csv(cand))
    assert result["n_volumes"] == 6 and result["n_with_nodule"] == 5
    dice = result["metrics"]["dice"]
    assert dice["baseline"]["mean"] == pytest.approx(0.48) and dice["baseline"]["median"] == pytest.approx(0.5)
    sd = float(np.std(base_dice, ddof=1))
    assert dice["baseline"]["std"] == pytest.approx(sd)
    half = stats.t.ppf(0.975, 4) * sd / np.sqrt(5)
    assert dice["baseline"]["ci95"] == pytest.approx([0.48 - half, 0.48 + half])
    assert dice["p_value"] == pytest.approx(stats.ttest_rel(cand_dice, base_dice).pvalue)
    assert dice["wilcoxon_p"] == pytest.approx(stats.wilcoxon(cand_dice, base_dice).pvalue)
    assert result["metrics"]["sensitivity"]["p_value"] == 0.0  # a constant shift of 0.1: no variance
    json.dumps(result)


@pytest.mark.parametrize(
    "rows, header, message",
    [(["a,0.5,0.5,0.5,maybe"], "volume_id,sensitivity,dice,f2,nodule_present", "nodule_present 'maybe'"),
     (["a,0.5,x,0.5,yes"], "volume_id,sensitivity,dice,f2,nodule_present", "dice 'x' is not a number"),
     (["a,0.5,1.5,0.5,yes"], "volume_id,sensitivity,dice,f2,nodule_present", "outside \\[0, 1\\]"),
     (["a,0.5,0.5,yes"], "volume_id,sensitivity,f2,nodule_present", "missing column\\(s\\) dice"),
     (["a,0.5,0.5,0.5,yes", "a,0.5,0.5,0.5,yes"], "volume_id,sensitivity,dice,f2,nodule_present", "duplicate")],
)  # fmt: skip
def test_bad_csvs_are_clear_errors(tmp_path, rows, header, message):
    path = write_csv(tmp_path / "bad.csv", rows, header)
    with pytest.raises(CtsynthError, match=f"bad.csv: .*{message}"):
        read_scores_csv(path)


def test_thesis_interval_divides_the_population_sd_by_all_volumes(tmp_path):
    base_dice, cand_dice = [0.2, 0.5, 0.4, 0.7, 0.6], [0.3, 0.55, 0.6, 0.65, 0.9]
    base = write_csv(tmp_path / "b.csv", [f"v{k},0.5,{d},0.4,yes,x" for k, d in enumerate(base_dice)]
                     + ["n0,,,,no,x", "n1,,,,no,x", "n2,,,,no,x"])  # fmt: skip
    cand = write_csv(tmp_path / "c.csv", [f"v{k},0.6,{d},0.5,1,y" for k, d in enumerate(cand_dice)]
                     + ["n0,,,,0,y", "n1,,,,0,y", "n2,,,,0,y"])  # fmt: skip
    thesis = compare(read_scores_csv(base), read_scores_csv(cand), ci="thesis")
    half = 1.96 * np.std(base_dice, ddof=0) / np.sqrt(8)  # 8 volumes scored, 5 with a nodule
    assert thesis["ci"] == "thesis"
    assert thesis["metrics"]["dice"]["baseline"]["ci95"] == pytest.approx([0.48 - half, 0.48 + half])
    assert thesis["metrics"]["dice"]["baseline"]["std"] == pytest.approx(np.std(base_dice, ddof=0))
    t = compare(read_scores_csv(base), read_scores_csv(cand))
    assert (
        t["ci"] == "t"
        and t["metrics"]["dice"]["baseline"]["ci95"][0] < thesis["metrics"]["dice"]["baseline"]["ci95"][0]
    )
    assert t["metrics"]["dice"]["p_value"] == thesis["metrics"]["dice"]["p_value"]  # the tests do not change
    with pytest.raises(ValueError, match="ci must be one of"):
        compare(read_scores_csv(base), read_scores_csv(cand), ci="z")


def test_score_reports_every_problem_one_line_each(tmp_path):
    affine = centred_affine((4, 4, 4), (1, 1, 1))
    cube = np.zeros((4, 4, 4), np.uint8)
    for name in ("a", "b"):
        write_nifti(tmp_path / "pred" / f"{name}.nii.gz", cube, affine)
    write_nifti(tmp_path / "truth" / "a.nii.gz", np.zeros((4, 4, 5), np.uint8), affine)
    write_nifti(tmp_path / "truth" / "c.nii.gz", cube, affine)
    with pytest.raises(CtsynthError) as error:
        score_folders(tmp_path / "pred", tmp_path / "truth")
    lines = str(error.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("b: no true mask in") and lines[1].startswith(f"c: no c.nii.gz in {tmp_path / 'pred'}")
    assert lines[2].startswith("a: prediction grid (4, 4, 4) does not match the truth grid (4, 4, 5)")


def test_score_against_a_dataset_split(phantom_dataset, tmp_path):
    from ctsynth_ray.dataset import read_manifest, read_nifti

    test_rows = [r for r in read_manifest(phantom_dataset) if r["split"] == "test"]
    for row in test_rows:  # a perfect prediction of the test split
        mask, affine = read_nifti(phantom_dataset / row["mask"])
        write_nifti(tmp_path / "pred" / f"{row['volume_id']}.nii.gz", mask, affine)
    rows = score_folders(tmp_path / "pred", phantom_dataset, "test")
    assert [r["volume_id"] for r in rows] == sorted(r["volume_id"] for r in test_rows)
    assert all(r["accuracy"] == 1.0 for r in rows)
    with pytest.raises(CtsynthError, match=r"no .*nii\.gz in"):
        score_folders(tmp_path / "pred", phantom_dataset)  # every split: the other volumes have no prediction
    with pytest.raises(CtsynthError, match="needs a dataset"):
        score_folders(tmp_path / "pred", tmp_path / "pred", "test")
