"""Resumable runs: each finished unit of work (a case, a volume) is written to its final place, then its record.

A stage that may run for hours (``ingest`` and ``prepare`` over a whole collection, ``generate``) writes each
unit's files under their final names (each under a temporary name, then renamed), and only then the unit's record,
``ROOT/.progress/<name>.json``: a unit is finished exactly when its record exists and the files it names do, so a
killed run leaves nothing that looks finished and is not. The run's settings are kept in a run file, which
``--resume`` must match; at the end the manifest is rebuilt from the records, and written last.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.storage import Remote, check_output, location

PROGRESS = ".progress"
#: Records read at once from an object store (each read takes tens of milliseconds there).
REMOTE_READERS = 32


def write_record(root: str | os.PathLike | Remote, name: str, record: dict) -> None:
    """Mark unit ``name`` finished under ``root`` (after its files are written)."""
    from ctsynth_ray.dataset import write_json

    write_json(location(root) / PROGRESS / f"{name}.json", record)


class StoredFiles:
    """Which files exist under ``root``: one listing on an object store, a stat per question on a filesystem."""

    def __init__(self, root: str | os.PathLike | Remote):
        self.root = location(root)
        self.listed = {rel for rel, _, _ in self.root.files()} if isinstance(self.root, Remote) else None

    def __contains__(self, rel: str) -> bool:
        return rel in self.listed if self.listed is not None else (self.root / rel).is_file()

    def records(self) -> list:
        """The paths of the progress records, sorted."""
        if self.listed is not None:
            return [self.root / p for p in sorted(self.listed) if p.startswith(f"{PROGRESS}/") and p.endswith(".json")]
        progress = self.root / PROGRESS
        return sorted(progress.glob("*.json")) if progress.is_dir() else []


def read_records(root: str | os.PathLike | Remote, finished: Callable[[str, dict, StoredFiles], bool]
                 ) -> dict[str, dict]:  # fmt: skip
    """{name: record} of the units finished under ``root``: records for which ``finished(name, record, stored)``
    holds (typically: the files the record names are all there)."""
    stored = StoredFiles(root)

    def read(path) -> tuple[str, dict | None]:
        try:
            return path.name.removesuffix(".json"), json.loads(path.read_text())
        except ValueError:  # cannot happen with whole-file writes; treated as unfinished
            return path.name, None

    paths = stored.records()
    with ThreadPoolExecutor(max_workers=REMOTE_READERS if stored.listed is not None else 1) as pool:
        pairs = list(pool.map(read, paths))
    return {name: record for name, record in pairs if record is not None and finished(name, record, stored)}


def clear_records(root: str | os.PathLike | Remote) -> None:
    """Remove the records once the manifest holds what they said."""
    root = location(root)
    if isinstance(root, Remote):
        (root / PROGRESS).rmtree()
    else:
        shutil.rmtree(root / PROGRESS, ignore_errors=True)


def remove_temporary_files(root: str | os.PathLike | Remote, subfolders: Iterable[str]) -> None:
    """Delete the temporary files that writers killed in an earlier run left in ``subfolders`` of ``root``."""
    root = location(root)
    if isinstance(root, Remote):  # an object store writes whole objects: no temporary names to clean
        return
    for sub in (*subfolders, PROGRESS):
        for temp in (root / sub).glob(".*.tmp.*") if (root / sub).is_dir() else []:
            temp.unlink(missing_ok=True)


def begin_run(out: Path | Remote, run_file: str, settings: dict, *, resume: bool, overwrite: bool,
              commit: str = "manifest.parquet") -> None:  # fmt: skip
    """Let ``out`` take a run with ``settings`` and record them in ``out/run_file``.

    ``resume``: ``out`` must hold a run with the same settings, or nothing at all (a first run: the same command
    can start a job and continue it after any interruption). Otherwise ``out`` must be absent or empty, or
    ``overwrite`` given and ``out`` an earlier output of this kind (its run file, or its ``commit`` file, the one
    written last), whose ``commit`` file is deleted first (it no longer says what is there), then everything else.
    """
    from ctsynth_ray.dataset import write_json

    if resume and overwrite:
        raise CtsynthError(f"{out}: --resume continues a run and --overwrite replaces it: pass one of them")
    check_output(out, replace=True)  # not a file, not a whole bucket
    record = out / run_file
    busy = out.exists() and any(True for _ in out.iterdir())
    if resume and busy:
        check_same_run(out, run_file, settings)
    elif busy and not resume:
        if not overwrite:
            raise CtsynthError(f"{out}: already exists and is not empty (pass --resume to continue it, or "
                               f"--overwrite to replace it)")  # fmt: skip
        if not (record.is_file() or (out / commit).is_file()):
            raise CtsynthError(f"{out}: not an earlier output of this command (no {run_file} or {commit}): "
                               f"refusing to delete it")  # fmt: skip
        _empty(out, commit)
    if isinstance(out, Path):
        out.mkdir(parents=True, exist_ok=True)
    write_json(record, settings)


def check_same_run(out: Path | Remote, run_file: str, settings: dict, keys: Iterable[str] | None = None) -> None:
    """CtsynthError unless ``out/run_file`` records a run with these ``settings`` (``keys`` of them, default all)."""
    record = out / run_file
    if not record.is_file():
        raise CtsynthError(f"{out}: nothing to resume (no {run_file})")
    before = json.loads(record.read_text())
    changed = [k for k in (keys or settings) if before.get(k) != settings.get(k)]
    if changed:
        raise CtsynthError(f"{out}: was made with other settings ({', '.join(changed)} differ): --resume continues "
                           f"the same run only")  # fmt: skip


def _empty(out: Path | Remote, first: str) -> None:
    (out / first).unlink(missing_ok=True)
    if isinstance(out, Remote):
        out.rmtree()
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
