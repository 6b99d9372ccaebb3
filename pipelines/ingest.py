"""Ingest a source tree into a dataset, one Ray task per case when asked for more than one worker."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ctsynth_ray.dataset import TARGET_SPACING_MM, staged_dataset, write_manifest
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.ingest.cases import (
    find_lidc_cases,
    find_nifti_cases,
    ingest_lidc_case,
    ingest_nifti_case,
    split_for,
)
from ctsynth_ray.pipelines.runtime import RayOptions, parallel_map
from ctsynth_ray.storage import Remote, as_text, location

REPORT_NAME = "ingest_report.json"


@dataclass
class IngestReport:
    """What an ingest did: ingested volume ids, failures {case, file, reason}, notes."""

    dataset: Path | Remote
    ingested: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> str:
        return json.dumps(
            {"dataset": str(self.dataset), "ingested": self.ingested, "failed": self.failed, "notes": self.notes},
            indent=2,
        )


def _lidc_task(root, case, spacing_mm, min_readers, split):
    return ingest_lidc_case(root, case, spacing_mm=spacing_mm, min_readers=min_readers, split=split)


def _nifti_task(root, case, spacing_mm, split):
    return ingest_nifti_case(root, case, spacing_mm=spacing_mm, split=split)


def ingest(
    kind: str,
    src: Path,
    out: Path,
    *,
    spacing_mm: Sequence[float] = TARGET_SPACING_MM,
    min_readers: int = 3,
    split_fractions: Sequence[float] = (1.0, 0.0, 0.0),
    ray_options: RayOptions = RayOptions(),
) -> IngestReport:
    """Ingest every case of ``src`` (``kind`` 'lidc' or 'nifti') into ``out``; failures are reported, not raised.

    The dataset (with ``ingest_report.json``) is written even when some cases fail; a failed case leaves no files.
    """
    src = Path(src).resolve()  # Ray workers may run in another working directory
    if kind == "lidc":
        cases, problems = find_lidc_cases(src)
    elif kind == "nifti":
        cases, problems = find_nifti_cases(src)
    else:
        raise ValueError(f"kind must be 'lidc' or 'nifti', got {kind!r}")
    if not cases and not problems:  # nothing found at all: an error, not an empty dataset
        what = "DICOM series" if kind == "lidc" else "image/mask NIfTI pairs (images/ + masks/, or X + X_mask)"
        raise CtsynthError(f"{src}: no {what} found: nothing to ingest")
    report = IngestReport(dataset=location(out), failed=list(problems))
    with staged_dataset(out, overwrite=ray_options.overwrite) as stage:
        if kind == "lidc":
            task = _lidc_task
            arguments = [
                (as_text(stage), c, tuple(spacing_mm), min_readers, split_for(c.volume_id, split_fractions))
                for c in cases
            ]
        else:
            task = _nifti_task
            arguments = [(as_text(stage), c, tuple(spacing_mm), split_for(c.volume_id, split_fractions)) for c in cases]
        results = parallel_map(task, arguments, ray_options, description=f"ingest {kind}")
        rows = []
        for result in results:
            report.notes += result.notes
            if result.error is not None:
                report.failed.append(result.error)
            else:
                rows.append(result.row)
                report.ingested.append(result.case)
        write_manifest(stage, rows)
        (stage / REPORT_NAME).write_text(report.to_json())
    return report
