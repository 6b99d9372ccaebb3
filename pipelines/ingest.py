"""Ingest a source tree into a dataset, one Ray task per case when asked for more than one worker.

Built for whole collections (LIDC-IDRI's 1,018 scans): each task declares the memory its case needs, each case is
written to its final place and recorded as it finishes, a case that fails (or whose task dies) is reported and the
run goes on, and ``--resume`` continues an interrupted run without redoing finished cases.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ctsynth_ray.dataset import MANIFEST_NAME, TARGET_SPACING_MM, read_manifest, write_bytes, write_manifest
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.ingest.cases import (
    CaseResult,
    NiftiCase,
    error,
    find_lidc_cases,
    find_nifti_cases,
    ingest_lidc_case,
    ingest_nifti_case,
    split_for,
)
from ctsynth_ray.ingest.dicom import safe_id
from ctsynth_ray.ingest.footprint import case_voxels
from ctsynth_ray.pipelines.runtime import RayOptions, parallel_map
from ctsynth_ray.progress import (
    StoredFiles,
    begin_run,
    clear_records,
    read_records,
    remove_temporary_files,
    write_record,
)
from ctsynth_ray.storage import Remote, as_text, resolved

REPORT_NAME = "ingest_report.json"
#: The run's settings, which ``--resume`` must match.
RUN_FILE = "ingest.json"
VOLUME_FOLDERS = ("images", "masks")
#: Peak memory of one case's ingest: the process (Python, numpy, pydicom, nibabel) plus bytes per output voxel
#: (int16 HU, uint8 mask, slabs); measured by benchmarks/ingest_prepare_memory.py.
BASE_MEMORY = 300 << 20
BYTES_PER_OUTPUT_VOXEL = 4


@dataclass
class IngestReport:
    """What an ingest did: ingested volume ids, failures {case, file, reason}, notes."""

    dataset: Path | Remote
    ingested: list[str] = field(default_factory=list)  # every volume of the dataset
    failed: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # volumes an earlier run had finished (--resume)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> str:
        return json.dumps(
            {
                "dataset": str(self.dataset),
                "ingested": self.ingested,
                "kept": self.kept,
                "failed": self.failed,
                "notes": self.notes,
            },
            indent=2,
        )


def _case_task(root: str, kind: str, case, spacing_mm, min_readers: int, split: str) -> CaseResult:
    """Ingest one case into its final place, then record it finished (notes kept for the report)."""
    if kind == "lidc":
        result = ingest_lidc_case(root, case, spacing_mm=spacing_mm, min_readers=min_readers, split=split)
    else:
        result = ingest_nifti_case(root, case, spacing_mm=spacing_mm, split=split)
    if result.row is not None:
        write_record(root, result.case, {"row": result.row, "notes": result.notes})
    return result


def case_memory(case, spacing_mm: Sequence[float]) -> int:
    """Bytes one case's ingest needs at its peak (declared to Ray): the source volume as int16 HU, the output as
    int16 HU plus its uint8 mask and the slabs in between, and the process itself."""
    source, output = case_voxels(case, spacing_mm)
    return BASE_MEMORY + 2 * source + BYTES_PER_OUTPUT_VOXEL * output


def _patient(case) -> str:
    """What a split is drawn by: the patient (every series of a patient lands in one split, or a test scan could
    share a patient with a training scan); a NIfTI case is its own patient."""
    if isinstance(case, NiftiCase):
        return case.volume_id
    return safe_id(case.series.patient_id or case.series.files[0].parent.name)


def _source_file(case) -> Path:
    return case.image if isinstance(case, NiftiCase) else case.series.files[0].parent


def _finished(out: Path | Remote) -> dict[str, dict]:
    """{volume_id: {"row", "notes"}} of the cases finished under ``out``: progress records of this run, and the
    manifest of an earlier one (with its report's notes), whose files are all there."""
    done = read_records(out, lambda _, record, stored: _complete(record["row"], stored))
    if (out / MANIFEST_NAME).is_file():
        stored = StoredFiles(out)
        old = json.loads((out / REPORT_NAME).read_text()) if (out / REPORT_NAME).is_file() else {}
        for row in read_manifest(out):
            if _complete(row, stored):
                notes = [n for n in old.get("notes", []) if n.startswith(f"{row['volume_id']}: ")]
                done.setdefault(row["volume_id"], {"row": row, "notes": notes})
    return done


def _same_series(done: dict[str, dict], cases) -> dict[str, dict]:
    """The finished cases that are still these cases: an LIDC volume id names another series once a patient's
    second scan joins the source (``_1``, ``_2``), so a record counts only for the series it was made from."""
    series = {c.volume_id: None if isinstance(c, NiftiCase) else c.series.series_uid for c in cases}
    return {vid: record for vid, record in done.items()
            if vid in series and (series[vid] is None or record["row"].get("series_uid") == series[vid])}  # fmt: skip


def _complete(row: dict, stored: StoredFiles) -> bool:
    return all(row[c] in stored for c in ("image", "mask") if row.get(c))


def ingest(
    kind: str,
    src: Path,
    out: str | Path,
    *,
    spacing_mm: Sequence[float] = TARGET_SPACING_MM,
    min_readers: int = 3,
    split_fractions: Sequence[float] = (1.0, 0.0, 0.0),
    resume: bool = False,
    source_name: str | None = None,
    ray_options: RayOptions = RayOptions(),
) -> IngestReport:
    """Ingest every case of ``src`` (``kind`` 'lidc' or 'nifti') into ``out``; failures are reported, not raised.

    Each case is written to its final place and recorded (``ctsynth_ray.progress``); the manifest, rebuilt from
    what is on disk, and ``ingest_report.json`` come last. ``resume`` keeps the cases an earlier run with the same
    settings finished and does the rest (failed cases again). A failed case leaves no files. ``source_name``: what
    the run records as its source (the URI the user gave, when ``src`` is this machine's copy of it).
    """
    src = Path(src).resolve()  # Ray workers may run in another working directory
    if kind == "lidc":
        cases, problems = find_lidc_cases(src)
    elif kind == "nifti":
        cases, problems = find_nifti_cases(src)
    else:
        raise ValueError(f"kind must be 'lidc' or 'nifti', got {kind!r}")
    if not cases:  # nothing to ingest: an error, not an empty dataset
        what = "DICOM series" if kind == "lidc" else "image/mask NIfTI pairs (images/ + masks/, or X + X_mask)"
        first = (
            f" ({len(problems)} problem(s); the first: {problems[0]['file']}: {problems[0]['reason']})"
            if problems
            else ""
        )
        raise CtsynthError(f"{src}: no {what} found: nothing to ingest{first}")
    out = resolved(out)
    if isinstance(out, Path) and (out == src or out in src.parents):
        raise CtsynthError(f"{out}: --out holds SRC {src}: write the dataset to a folder of its own")
    settings = {"kind": kind, "source": source_name or str(src), "spacing_mm": [float(s) for s in spacing_mm],
                "min_readers": min_readers if kind == "lidc" else None,
                "split_fractions": [float(f) for f in split_fractions]}  # fmt: skip
    begin_run(out, RUN_FILE, settings, resume=resume, overwrite=ray_options.overwrite)
    remove_temporary_files(out, VOLUME_FOLDERS)  # left by tasks killed in an earlier run
    before = _same_series(_finished(out), cases) if resume else {}
    todo = [c for c in cases if c.volume_id not in before]
    arguments = [(as_text(out), kind, c, tuple(spacing_mm), min_readers, split_for(_patient(c), split_fractions))
                 for c in todo]  # fmt: skip

    def died(k: int, exc: BaseException) -> CaseResult:
        cause = getattr(exc, "cause", None)
        reason = type(exc).__name__ + (f": {type(cause).__name__}: {cause}" if cause is not None else "")
        return CaseResult(todo[k].volume_id, error=error(todo[k].volume_id, _source_file(todo[k]),
                                                         f"the task running it failed ({reason})"))  # fmt: skip

    results = parallel_map(_case_task, arguments, ray_options, description=f"ingest {kind}",
                           memory=[case_memory(c, spacing_mm) for c in todo], on_failure=died)  # fmt: skip
    report = IngestReport(dataset=out, failed=list(problems), kept=sorted(before))
    done = {**before, **_same_series(_finished(out), cases)}  # what is on disk, not what the tasks said
    for result in results:
        if result.case not in done:
            report.failed.append(result.error or error(result.case, out, "its files are missing after the run"))
            for sub in VOLUME_FOLDERS:  # nothing half-written of a failed case
                (out / sub / f"{result.case}.nii.gz").unlink(missing_ok=True)
    rows = []
    for case in cases:
        if case.volume_id in done:
            rows.append(done[case.volume_id]["row"])
            report.ingested.append(case.volume_id)
            report.notes += done[case.volume_id]["notes"]
    write_manifest(out, rows)
    write_bytes(out / REPORT_NAME, report.to_json().encode())
    clear_records(out)
    return report
