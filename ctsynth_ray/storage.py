"""Where ctsynth reads and writes: local paths, ``file://`` URIs, and any other ``pyarrow.fs`` scheme (``s3://``,
``gs://``, ``hdfs://``, ``abfs://``).

:func:`location` turns what a user typed into a :class:`pathlib.Path` (a plain path or a ``file://`` URI, which
may name a mount every node sees) or a :class:`Remote` (an object-store URI). A ``Remote`` answers the few
``Path`` calls the dataset layer and ``generate`` make (``/``, ``is_file``, ``iterdir``, ``read_bytes``,
``write_bytes``...), so one code path serves both.

Object stores have no rename. Their equivalent of the dataset layout's "temp name, then rename" is that a single
object is written whole or not at all, and a dataset's ``manifest.parquet`` is written last: a folder without a
manifest is not a dataset, and a reader never sees a manifest that names a file not yet written.

Inputs on an object store are read through a node-local copy (:func:`local_copy`): each node downloads a
dataset or model folder once, keyed by its listing, so a changed folder is downloaded again. Credentials come
from the environment the platform provides (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``), never from ctsynth's
options; S3-compatible stores take ``?endpoint_override=host:port&scheme=http`` in the URI.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ctsynth_ray.errors import CtsynthError

#: Node-local cache of object-store inputs (``CTSYNTH_CACHE`` overrides).
DEFAULT_CACHE = Path.home() / ".cache" / "ctsynth"
#: Written last into an object-store output: the commit of a dataset.
COMMIT_LAST = ("manifest.parquet",)


def cache_root() -> Path:
    return Path(os.environ.get("CTSYNTH_CACHE") or DEFAULT_CACHE)


def location(text: str | os.PathLike | Remote) -> Path | Remote:
    """A local :class:`Path` for a path or ``file://`` URI, a :class:`Remote` for any other URI."""
    if isinstance(text, Remote | Path):
        return text
    text = os.fspath(text)
    if "://" not in text:
        return Path(text)
    parts = urlsplit(text)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise CtsynthError(f"{text}: a file:// URI names a path on this machine (file:///path), not a host")
        return Path(unquote(parts.path))
    return Remote(text)


def resolved(text: str | os.PathLike | Remote) -> Path | Remote:
    """:func:`location`, with local paths made absolute (Ray workers may run in another working directory)."""
    where = location(text)
    return where.resolve() if isinstance(where, Path) else where


@functools.lru_cache(maxsize=16)
def _filesystem(root: str):
    """(pyarrow filesystem, path of ``root`` in it); one filesystem object per root and process."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(root)
    except Exception as exc:  # unknown scheme, bad query, missing credentials: pyarrow raises many types
        raise CtsynthError(f"{masked(root)}: not a usable filesystem URI ({_first_line(exc)})") from None


#: Query parameters whose values are secrets (``abfs://...?client_secret=``, SAS tokens, keys).
_SECRET_PARAMETER = re.compile(r"(?i)([?&][^=&]*(?:secret|key|token|password|passwd|sig|credential)[^=&]*=)[^&]*")


def masked(text: str) -> str:
    """``text`` with the credentials of any URI in it masked: user:password@ and secret query values."""
    text = re.sub(r"([a-z][a-z0-9+.-]*://)[^/@\s]*@", r"\1***@", str(text))
    return _SECRET_PARAMETER.sub(r"\1***", text)


def has_credentials(text: str) -> bool:
    return masked(text) != str(text)


def as_text(where: Path | Remote | str) -> str:
    """What to pass to a Ray task or another process for ``where``: the whole URI of a Remote (``str()`` masks its
    credentials), the path of a local one."""
    return where.uri if isinstance(where, Remote) else str(where)


def _file_type():
    import pyarrow.fs

    return pyarrow.fs.FileType


def _first_line(exc: BaseException) -> str:
    lines = masked(str(exc)).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class Remote:
    """A file or folder on a ``pyarrow.fs`` filesystem, named by the user's root URI and a relative part.

    Only strings are kept (it pickles to Ray workers); the filesystem is made once per process and root.
    """

    __slots__ = ("rel", "root")

    def __init__(self, root: str, rel: str = ""):
        self.root = root.split("?")[0].rstrip("/") + (f"?{root.split('?', 1)[1]}" if "?" in root else "")
        self.rel = rel.strip("/")

    # ------------------------------------------------------------------------------ naming
    def __truediv__(self, part: str | os.PathLike) -> Remote:
        part = os.fspath(part).strip("/")
        return Remote(self.root, f"{self.rel}/{part}" if self.rel else part)

    @property
    def uri(self) -> str:
        """The whole URI, credentials included where the user put them in it (``s3://KEY:SECRET@bucket``)."""
        base, _, query = self.root.partition("?")
        text = f"{base}/{self.rel}" if self.rel else base
        return f"{text}?{query}" if query else text

    def __str__(self) -> str:
        """The URI for messages and records: credentials in it are masked."""
        return masked(self.uri)

    __fspath__ = None  # not a local path: os.fspath() must refuse it

    def __repr__(self) -> str:
        return f"Remote({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Remote) and (self.root, self.rel) == (other.root, other.rel)

    def __hash__(self) -> int:
        return hash((self.root, self.rel))

    @property
    def name(self) -> str:
        return (self.rel or urlsplit(self.root.split("?")[0]).path).rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Remote:
        return Remote(self.root, self.rel.rsplit("/", 1)[0] if "/" in self.rel else "")

    @property
    def fs(self):
        return _filesystem(self.root)[0]

    @property
    def path(self) -> str:
        """This object's path inside its filesystem."""
        base = _filesystem(self.root)[1].rstrip("/")
        return f"{base}/{self.rel}" if self.rel else base

    # ------------------------------------------------------------------------------ queries
    def _info(self):
        try:
            return self.fs.get_file_info(self.path)
        except CtsynthError:
            raise
        except Exception as exc:
            raise CtsynthError(f"{self}: cannot be reached ({_first_line(exc)})") from None

    def exists(self) -> bool:
        return self._info().type != _file_type().NotFound

    def is_file(self) -> bool:
        return self._info().type == _file_type().File

    def iterdir(self) -> Iterator[Remote]:
        for info in self._list(recursive=False):
            yield self / info.path[len(self.path) + 1 :]

    def files(self) -> list[tuple[str, int, str]]:
        """Every file below this folder: (relative path, size, modification time), sorted."""
        import pyarrow.fs

        return sorted(
            (info.path[len(self.path) + 1 :], info.size, str(info.mtime))
            for info in self._list(recursive=True)
            if info.type == pyarrow.fs.FileType.File
        )

    def _list(self, recursive: bool):
        import pyarrow.fs

        try:
            return self.fs.get_file_info(pyarrow.fs.FileSelector(self.path, allow_not_found=True, recursive=recursive))
        except Exception as exc:
            raise CtsynthError(f"{self}: cannot be listed ({_first_line(exc)})") from None

    # ------------------------------------------------------------------------------ bytes
    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise CtsynthError(f"{self}: file not found") from None
        except Exception as exc:
            raise CtsynthError(f"{self}: cannot be read ({_first_line(exc)})") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Write one object whole (an object store never shows half of it)."""
        try:
            with self.fs.open_output_stream(self.path) as stream:
                stream.write(data)
        except Exception as exc:
            raise CtsynthError(f"{self}: cannot be written ({_first_line(exc)})") from None

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise CtsynthError(f"{self}: file not found") from None
        except Exception as exc:
            raise CtsynthError(f"{self}: cannot be deleted ({_first_line(exc)})") from None

    def rmtree(self) -> None:
        """Delete everything under this prefix; a prefix with nothing under it is already gone."""
        try:
            self.fs.delete_dir(self.path)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise CtsynthError(f"{self}: cannot be deleted ({_first_line(exc)})") from None


# -------------------------------------------------------------------------------- whole folders


#: This process' copies of versioned inputs: {(URI, version): local path} (see :func:`local_copy`).
_COPIES: dict[tuple[str, str], Path] = {}


def local_copy(text: str | os.PathLike | Remote, what: str = "folder", version: str | None = None) -> Path:
    """A local path for ``text``: itself when local; for an object-store folder (or file), a copy in this node's
    cache, downloaded once per content (its listing's sizes and times key the copy) and renamed into place whole,
    so concurrent tasks on a node never read half a copy. ``version`` (e.g. a dataset's manifest fingerprint, which
    changes with its content): a process asks the store for that version's listing once, not at every call (a
    generation worker calls this for every chunk)."""
    where = resolved(text)
    if isinstance(where, Path):
        return where
    if version is not None and (where.uri, version) in _COPIES:
        return _COPIES[(where.uri, version)]
    target = _copied(where, what)
    if version is not None:
        _COPIES[(where.uri, version)] = target
    return target


def _copied(where: Remote, what: str) -> Path:
    info = where._info()
    if info.type == _file_type().File:
        listing = [("", info.size, str(info.mtime))]
        files = [""]
    else:
        listing = where.files()
        files = [rel for rel, _, _ in listing]
        if not files:
            raise CtsynthError(f"{where}: no such {what} (nothing stored under it)")
    key = hashlib.sha256(repr((str(where), listing)).encode()).hexdigest()[:20]
    target = cache_root() / "remote" / key / (where.name or "root")
    if target.exists():
        return target
    stage = target.parent / f".{uuid.uuid4().hex[:8]}.download"
    stage.mkdir(parents=True)
    try:
        for rel in files:
            local = stage / target.name / rel if rel else stage / target.name
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes((where / rel).read_bytes() if rel else where.read_bytes())
        try:
            os.replace(stage / target.name, target)
        except OSError:  # another task on this node finished the same copy first
            if not target.exists():
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def check_output(where: Path | Remote, *, replace: bool, flag: str = "--overwrite") -> None:
    """Refuse an existing, non-empty output unless ``replace``: one line naming it and the flag that allows it."""
    if isinstance(where, Path):
        if where.exists() and not where.is_dir():
            raise CtsynthError(f"{where}: exists and is not a folder")
        busy = where.is_dir() and any(where.iterdir())
    else:
        if "/" not in where.path.strip("/") and urlsplit(where.uri).scheme in ("s3", "gs", "gcs", "abfs", "az"):
            raise CtsynthError(f"{where}: a whole bucket; give a folder in it (s3://bucket/folder)")
        busy = any(True for _ in where.iterdir())
    if busy and not replace:
        raise CtsynthError(f"{where}: already exists and is not empty (pass {flag} to replace it)")


def upload(local: Path, where: Remote, *, replace: bool = False) -> None:
    """Copy the folder ``local`` to ``where``: the old manifest goes first (a reader never sees it name a mix of old
    and new files), every other file next, files of an older content that this one lacks after, the manifest last."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    relative = [p.relative_to(local).as_posix() for p in files]
    old = [rel for rel, _, _ in where.files()] if replace else []
    for name in COMMIT_LAST:
        if name in old:
            (where / name).unlink(missing_ok=True)
    for rel, path in zip(relative, files):
        if rel not in COMMIT_LAST:
            (where / rel).write_bytes(path.read_bytes())
    for rel in set(old) - set(relative):
        (where / rel).unlink(missing_ok=True)
    for rel, path in zip(relative, files):
        if rel in COMMIT_LAST:
            (where / rel).write_bytes(path.read_bytes())


@contextlib.contextmanager
def output_folder(text: str | os.PathLike | Remote, *, replace: bool = False, marker: str | None = None
                  ) -> Iterator[Path]:  # fmt: skip
    """A local folder for an output the driver alone writes (an audit's report), named ``text``: the path itself
    when local; for an object store, a staging folder under this node's cache, uploaded (:func:`upload`) when the
    block succeeds and removed either way. ``marker``: a stored prefix may be replaced only when it holds this file
    (an earlier output of the same kind), never a prefix holding anything else."""
    where = resolved(text)
    if isinstance(where, Path):
        yield where
        return
    if marker and any(True for _ in where.iterdir()) and not (where / marker).is_file():
        raise CtsynthError(f"{where}: is not empty and holds no {marker}: choose another --out")
    check_output(where, replace=replace)
    stage = cache_root() / "staging" / uuid.uuid4().hex[:12]
    local = stage / (where.name or "out")
    try:
        yield local
        if local.exists():
            upload(local, where, replace=replace)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def remote_dataset(where: Remote, *, overwrite: bool = False) -> Iterator[Remote]:
    """The object-store form of building a dataset in a staging folder and renaming it into place: the prefix
    itself, written to directly by every task (each file one whole object), the block writing the manifest last.
    A non-empty prefix is refused unless ``overwrite``, which deletes the old manifest, then the old files, before
    anything new is written; a block that fails removes what it wrote, so no prefix is left half a dataset."""
    check_output(where, replace=overwrite)
    (where / COMMIT_LAST[0]).unlink(missing_ok=True)
    where.rmtree()
    try:
        yield where
    except BaseException:
        with contextlib.suppress(CtsynthError):
            where.rmtree()
        raise
