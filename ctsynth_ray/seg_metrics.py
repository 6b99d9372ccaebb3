"""Per-volume segmentation scores (the thesis' sensitivity, accuracy, Dice, F2) and their paired comparison.

Scores of one volume from its confusion counts (a ratio whose denominator is 0 is NaN, written empty)::

    sensitivity = TP / (TP + FN)        accuracy = (TP + TN) / all
    dice = 2 TP / (2 TP + FP + FN)      f2 = 5 TP / (5 TP + FP + 4 FN)

:func:`compare` pairs two score tables by ``volume_id`` and, over the volumes with a nodule, gives per metric
the median, mean, sample standard deviation (n - 1) and a 95 % confidence interval of the mean of each side, the
paired t-test p-value and the Wilcoxon signed-rank p-value of candidate against baseline. Two intervals:

- ``t`` (the default): mean +- t(0.975, n - 1) x sd(n - 1) / sqrt(n), n the volumes with a value: the interval
  of a mean estimated from n volumes.
- ``thesis``: mean +- 1.96 x sd(n) / sqrt(N), with the population sd (also the reported sd) and N *all* scored
  volumes, those without a nodule included: what reproduces the thesis' tables. With few volumes, or many without a nodule, it is too
  narrow, which is why it is not the default.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np

from ctsynth_ray.dataset import MANIFEST_NAME, read_manifest, read_nifti
from ctsynth_ray.errors import CtsynthError

SCORE_COLUMNS = ("volume_id", "sensitivity", "accuracy", "dice", "f2", "nodule_present", "tp", "fp", "fn", "tn")
COMPARED = ("sensitivity", "dice", "f2")
CI_METHODS = ("t", "thesis")
_TRUE, _FALSE = {"true", "yes", "1", "1.0"}, {"false", "no", "0", "0.0"}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def volume_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Scores of one volume; non-zero voxels are positive."""
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    tn = int(p.size - tp - fp - fn)
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "accuracy": _ratio(tp + tn, p.size),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "f2": _ratio(5 * tp, 5 * tp + fp + 4 * fn),
        "nodule_present": bool(tp + fn),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }  # fmt: skip


def _nifti_ids(folder: Path) -> dict[str, Path]:
    return {p.name[: -len(".nii.gz")]: p for p in sorted(folder.glob("*.nii.gz"))}


def _truth_masks(truth: Path, split: str | None) -> dict[str, Path]:
    """{volume_id: mask path}: a folder of ``<volume_id>.nii.gz``, or a dataset (its ``masks``, of one split)."""
    if (truth / MANIFEST_NAME).is_file():
        rows = [r for r in read_manifest(truth) if split is None or r["split"] == split]
        return {r["volume_id"]: truth / r["mask"] for r in rows}
    if split is not None:
        raise CtsynthError(f"{truth}: a split ({split}) needs a dataset, and this folder has no manifest")
    return _nifti_ids(truth)


def score_folders(pred_dir: str | os.PathLike, truth: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Score every ``<volume_id>.nii.gz`` of ``pred_dir`` against its true mask: the same name in the folder
    ``truth``, or the volume's mask when ``truth`` is a dataset (the volumes of ``split`` when given).

    Raises CtsynthError with one line per problem: a volume without its counterpart, grids that differ.
    """
    pred_dir, truth = Path(pred_dir), Path(truth)
    for folder in (pred_dir, truth):
        if not folder.is_dir():
            raise CtsynthError(f"{folder}: not a folder")
    preds, truths = _nifti_ids(pred_dir), _truth_masks(truth, split)
    if not preds:
        raise CtsynthError(f"{pred_dir}: no <volume_id>.nii.gz masks")
    problems = [
        f"{vid}: no {vid}.nii.gz in {pred_dir}" if vid in truths else f"{vid}: no true mask in {truth}"
        for vid in sorted(set(preds) ^ set(truths))
    ]
    rows = []
    for vid in sorted(set(preds) & set(truths)):
        pred, pred_affine = read_nifti(preds[vid])
        true, true_affine = read_nifti(truths[vid])
        if pred.shape != true.shape or not np.allclose(pred_affine, true_affine, atol=1e-3):
            problems.append(f"{vid}: prediction grid {pred.shape} does not match the truth grid {true.shape} "
                            f"(shape or affine differ)")  # fmt: skip
            continue
        rows.append({"volume_id": vid, **volume_scores(pred, true)})
    if problems:
        raise CtsynthError("\n".join(problems))
    return rows


def write_scores_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write score rows as CSV (NaN as empty), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SCORE_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(buffer.getvalue())
    os.replace(temp, path)
    return path


def read_scores_csv(path: str | os.PathLike) -> dict[str, dict]:
    """A score CSV as {volume_id: row} (nodule_present, the compared metrics and accuracy where present); other
    columns ignored. CtsynthError naming the file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CtsynthError(f"{path}: file not found")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("volume_id", "nodule_present", *COMPARED) if c not in (reader.fieldnames or [])]
        if missing:
            raise CtsynthError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = {}
        for line, raw in enumerate(reader, start=2):
            vid = (raw["volume_id"] or "").strip()
            if not vid:
                raise CtsynthError(f"{path}: line {line}: empty volume_id")
            if vid in rows:
                raise CtsynthError(f"{path}: line {line}: duplicate volume_id {vid!r}")
            present = (raw["nodule_present"] or "").strip().lower()
            if present not in _TRUE | _FALSE:
                raise CtsynthError(
                    f"{path}: line {line}: nodule_present {raw['nodule_present']!r} is not true/false, yes/no or 1/0"
                )
            row = {"volume_id": vid, "nodule_present": present in _TRUE}
            for metric in (*COMPARED, *(["accuracy"] if "accuracy" in reader.fieldnames else [])):
                text = (raw[metric] or "").strip()
                try:
                    row[metric] = float(text) if text else float("nan")
                except ValueError:
                    raise CtsynthError(f"{path}: line {line}: {metric} {text!r} is not a number") from None
                if not math.isnan(row[metric]) and not 0 <= row[metric] <= 1:
                    raise CtsynthError(f"{path}: line {line}: {metric} {row[metric]} is outside [0, 1]")
            rows[vid] = row
    return rows


def describe(values: np.ndarray, ci: str = "t", n_all: int | None = None) -> dict:
    """median, mean, sd and the 95 % CI of the mean by ``ci`` (see the module docstring): ``t`` reports the sample
    sd (n - 1); ``thesis`` the population sd (n) and divides by sqrt(``n_all``), all scored volumes."""
    from scipy import stats

    if ci not in CI_METHODS:
        raise ValueError(f"ci must be one of {CI_METHODS}, got {ci!r}")
    n = len(values)
    mean = float(np.mean(values)) if n else float("nan")
    sd = float(np.std(values, ddof=1)) if n > 1 else float("nan")
    if ci == "thesis":  # the thesis' population sd, also in the table, so that its numbers can be checked
        sd = float(np.std(values, ddof=0)) if n else float("nan")
        half = 1.96 * sd / math.sqrt(n_all or n) if n else float("nan")
    else:
        half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    return {"median": float(np.median(values)) if n else float("nan"), "mean": mean, "std": sd,
            "ci95": [mean - half, mean + half], "n": n}  # fmt: skip


def compare(baseline: dict[str, dict], candidate: dict[str, dict], ci: str = "t") -> dict:
    """Paired comparison over the volumes (present in both) with a nodule; see the module docstring."""
    from scipy import stats

    shared = sorted(set(baseline) & set(candidate))
    if not shared:
        raise CtsynthError("the two score tables share no volume_id")
    with_nodule = [v for v in shared if baseline[v]["nodule_present"] or candidate[v]["nodule_present"]]
    result = {"n_volumes": len(shared), "n_with_nodule": len(with_nodule), "ci": ci, "metrics": {}}
    for metric in COMPARED:
        pairs = np.array([(baseline[v][metric], candidate[v][metric]) for v in with_nodule], float).reshape(-1, 2)
        pairs = pairs[~np.isnan(pairs).any(axis=1)]
        a, b = pairs[:, 0], pairs[:, 1]
        p_value = wilcoxon_p = float("nan")
        if len(pairs) > 1:
            differences = b - a
            if np.allclose(differences, differences[0]):
                p_value = 1.0 if differences[0] == 0 else 0.0  # no variance: identical, or a constant shift
            else:
                p_value = float(stats.ttest_rel(b, a).pvalue)
            wilcoxon_p = 1.0 if not np.any(differences) else float(stats.wilcoxon(b, a).pvalue)
        result["metrics"][metric] = {
            "baseline": describe(a, ci, len(shared)), "candidate": describe(b, ci, len(shared)),
            "p_value": p_value, "wilcoxon_p": wilcoxon_p, "test": "paired t-test",
        }  # fmt: skip
    return result


def format_comparison(result: dict) -> str:
    """A human-readable table of :func:`compare`'s result."""
    interval = "95% CI (t)" if result.get("ci", "t") == "t" else "95% CI (thesis)"
    lines = [f"{result['n_volumes']} paired volume(s), {result['n_with_nodule']} with a nodule", "",
             f"{'metric':<12}{'side':<11}{'median':>8}{'mean':>8}{'sd':>8}{interval:>20}{'t-test p':>11}{'Wilcoxon p':>12}"]  # fmt: skip
    for metric, m in result["metrics"].items():
        for side in ("baseline", "candidate"):
            d = m[side]
            tail = f"{m['p_value']:>11.4f}{m['wilcoxon_p']:>12.4f}" if side == "candidate" else ""
            interval = "[{:.3f}, {:.3f}]".format(*d["ci95"])
            name = metric if side == "baseline" else ""
            lines.append(
                f"{name:<12}{side:<11}{d['median']:>8.3f}{d['mean']:>8.3f}{d['std']:>8.3f}{interval:>20}{tail}"
            )
    return "\n".join(lines)
