"""`ctsynth generate`: thousands of synthetic CT volumes with nodule masks from a trained generator, on Ray.

How the work flows (one driver, CPU label tasks, generator actors):

1. Every volume's source is drawn from (seed, i) before anything is decoded (``planned_source``), and the
   volumes still to make are grouped by source: one label task per group (at most ``chunk`` volumes) decodes
   its source once and returns the label maps, one Ray object per actor call.
2. Generator actors (``ctsynth_ray.generation.VolumeMaker`` on Ray: one per GPU with ``num_gpus``, or one per
   CPU) load the generator once and translate every axial slice of a call's volumes in large batches (bf16,
   channels-last on GPUs; ``torch.compile`` on request), then compress and write them in a thread pool. A GPU
   actor serves two calls at a time (``max_concurrency=2``), so one call's inference overlaps the other's
   compression and writes; a CPU actor serves one (inference is the work there, and two calls would only share
   its core). Actors write their own NIfTI files and return small manifest rows: whole CT volumes never enter the
   object store.
3. Exactly once: a volume's files get names fixed by (seed, i), each written under a temporary name and
   renamed; its manifest row is written last (``SYNTH/.progress/<volume_id>.json``). The manifest is built from
   what is on disk at the end. A dead actor is replaced (a few times at most) and the volumes of its unfinished
   calls are redone; ``--resume`` skips finished volumes. Temporary files of killed writers are removed before
   the manifest is written. SYNTH is a folder every node sees (a shared filesystem, ``file://`` on a mount) or an
   object-store URI (``s3://``...) that every actor writes to directly, one whole object per file, the manifest
   last (``ctsynth_ray.storage``). The model and the source may be URIs too: each node reads a local copy.

Why a plain actor pool and not Ray Data's ``map_batches``: the run must name its files by (seed, i) and redo
exactly the volumes a dead actor did not finish (Ray Data's writers add a UUID to each file name, and a dead
actor in a fixed pool can hang a pipeline, Ray issue 62746); a small scheduler here replaces actors, bounds the
work in flight (memory independent of N) and keeps one long-lived pool instead of a new one per execution.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ctsynth_ray.dataset import (
    MANIFEST_NAME,
    dataset_fingerprint,
    read_manifest,
    write_json,
    write_manifest,
)
from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.generation import (
    StageTimes,
    VolumeMaker,
    check_generator_fits,
    finished_rows,
    generator_fingerprint,
)
from ctsynth_ray.pipelines.runtime import RayOptions, ensure_ray
from ctsynth_ray.pipelines.synth_labels import resolve_bank
from ctsynth_ray.progress import check_same_run, clear_records, remove_temporary_files
from ctsynth_ray.storage import Remote, local_copy, resolved
from ctsynth_ray.synth_labels import SynthLabelConfig, check_sources

RUN_FILE = "generate.json"
VOLUME_FOLDERS = ("images", "masks", "labels")
#: Decoded sources a label worker keeps: work comes grouped by source, so about two LIDC-size ones are enough.
SOURCE_CACHE_BYTES = 1 << 30
#: Bytes on disk per voxel of a finished volume (gzip level 1): CT ~1.1 of its 2 bytes, label + mask ~0.05 of
#: their 2; rounded up, measured on generated phantom CT.
BYTES_PER_VOXEL = 1.4
#: Run settings that must match for ``--resume`` to continue a run (N may grow).
RESUME_KEYS = ("generator_fingerprint", "source", "source_fingerprint", "bank", "size", "seed", "p_nodule",
               "lung_fraction", "augment")  # fmt: skip


@dataclass(frozen=True)
class GenerateOptions:
    n: int
    model: str
    out: str
    source: str | None = None
    bank: str | None = None
    size: int | None = None
    seed: int = 0
    actors: int | None = None  # None: one per GPU (with gpus_per_actor 1), or one per CPU
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    batch: int | None = None  # slices per forward pass (volumes for 3D); None: 512 on GPUs, 16 on CPUs
    compile: bool = False
    resume: bool = False
    p_nodule: float = 0.8
    lung_fraction: float = 0.8
    augment: bool = False
    chunk: int = 8  # volumes per label task and actor call

    def __post_init__(self):
        if self.n < 1 or (self.batch is not None and self.batch < 1) or self.chunk < 1:
            raise ValueError("n, batch and chunk must be at least 1")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be at least 1, got {self.actors}")


@dataclass
class GenerateSummary:
    out: Path
    n: int
    made: int
    skipped: int
    with_nodule: int
    pasted: int
    paste_failed: int
    actors: int
    actors_replaced: int
    seconds: float
    stages: StageTimes = field(default_factory=StageTimes)

    def format(self) -> str:
        rate = self.made / self.seconds if self.seconds else 0.0
        return "\n".join([
            f"{self.n} volume(s) in {self.out}: {self.made} made now ({rate:.2f} volumes/s), {self.skipped} finished before",
            f"nodules: {self.with_nodule} of {self.n} volumes have one; {self.pasted} pasted, {self.paste_failed} "
            f"paste failure(s) (column paste_failed)",
            f"actors: {self.actors}, replaced after failures: {self.actors_replaced}",
            f"seconds per stage, summed over workers: label synthesis {self.stages.labels:.1f}, inference "
            f"{self.stages.inference:.1f}, compression {self.stages.compression:.1f}, writes {self.stages.write:.1f}; "
            f"wall {self.seconds:.1f}",
        ])  # fmt: skip


# ------------------------------------------------------------------------------------------ remote work


def _label_task(source: Path | Remote, fingerprint: str, seed: int, indices: list[int], bank, config: SynthLabelConfig):
    """The label maps of ``indices`` (all cut from one planned source): (items, seconds)."""
    from ctsynth_ray.generation import label_items
    from ctsynth_ray.pipelines.synth_labels import source_cache

    local = str(local_copy(source, "source dataset", fingerprint))  # an object-store source: this node's copy
    return label_items(seed, indices, source_cache(local, fingerprint, config.size, SOURCE_CACHE_BYTES), bank, config)


# ---------------------------------------------------------------------------------------------- driver


def _resolve_inputs(options: GenerateOptions, info: dict) -> tuple[Path | Remote, Path, Path | None, str | None]:
    """The source dataset (as given, and this node's local copy) and template bank (this node's copy, and how the
    run records it: as given): given, or those the generator was trained from."""
    training = info.get("training_data", {})
    if not options.source and not training.get("source_dataset"):
        raise CtsynthError(f"{options.model}: generator.json names no source dataset: pass --source")
    source = resolved(options.source or training.get("source_dataset"))
    if not (source / MANIFEST_NAME).is_file():
        raise CtsynthError(f"{source}: no manifest (pass --source DATASET, the dataset with the label maps)")
    local = local_copy(source, "source dataset")
    if options.p_nodule == 0:
        return source, local, None, None
    trained_with = training.get("bank")
    if not options.bank and trained_with and Path(trained_with).is_file():
        return source, local, Path(trained_with).resolve(), str(Path(trained_with).resolve())
    # --bank, else what prepare last saved for the source: the same rules and errors as synth-labels
    bank = local_copy(options.bank, "template bank") if options.bank else None
    bank_path = resolve_bank(local, bank)
    return source, local, bank_path, str(resolved(options.bank)) if options.bank else str(bank_path)


def _finished_before(out: Path | Remote, settings: dict, resume: bool) -> dict[int, dict]:
    """Check that SYNTH may take this run (new, or the same run resumed) and return the volumes already finished
    {index: row}; writes nothing."""
    if resume:
        check_same_run(out, RUN_FILE, settings, RESUME_KEYS)
    elif out.exists() and any(True for _ in out.iterdir()):
        raise CtsynthError(f"{out}: already exists and is not empty (pass --resume to continue it, or another --out)")
    done = finished_rows(out)
    if (out / MANIFEST_NAME).is_file():  # a finished run: its manifest says what it holds
        for row in read_manifest(out):
            if all((out / row[c]).is_file() for c in ("image", "mask", "label")):
                done.setdefault(int(row["synth_index"]), row)
    return done


def _check_disk(out: Path | Remote, todo: int, size: int) -> None:
    if isinstance(out, Remote):  # an object store has no free space to ask about
        return
    needed = todo * size**3 * BYTES_PER_VOXEL
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise CtsynthError(f"{out}: {todo} volume(s) of {size}^3 need about {needed / 1e9:.1f} GB, but only "
                           f"{free / 1e9:.1f} GB are free")  # fmt: skip


def generate(options: GenerateOptions, ray_options: RayOptions = RayOptions(), echo=print) -> GenerateSummary:
    """Make volumes 0..n-1 of run ``options.seed`` in ``options.out``; see the module docstring."""
    from ctsynth_ray.models.registry import load_generator
    from ctsynth_ray.nodule_bank import load_bank

    started = time.monotonic()
    model, out = resolved(options.model), resolved(options.out)
    local_model = local_copy(model, "generator run")
    _, info = load_generator(local_model)
    source, local_source, bank_path, bank_record = _resolve_inputs(options, info)
    size = options.size or int(info["size"])
    rows = check_sources(local_source, size)
    schemes = sorted({r.get("label_scheme") or "thesis" for r in rows})
    if len(schemes) > 1:
        raise CtsynthError(f"{source}: the train split mixes label schemes ({', '.join(schemes)}): run prepare again")
    check_generator_fits(info, size, schemes[0])
    config = SynthLabelConfig(size=size, p_nodule=options.p_nodule, lung_fraction=options.lung_fraction,
                              augment=options.augment)  # fmt: skip
    bank = load_bank(bank_path) if bank_path else []
    fingerprint = generator_fingerprint(local_model)
    source_fingerprint = dataset_fingerprint(local_source)
    settings = {"generator": str(model), "generator_fingerprint": fingerprint, "source": str(source),
                "source_fingerprint": source_fingerprint, "bank": bank_record,
                "size": size, "seed": options.seed, "n": options.n, "p_nodule": options.p_nodule,
                "lung_fraction": options.lung_fraction, "augment": options.augment}  # fmt: skip
    done = _finished_before(out, settings, options.resume)
    if any(i >= options.n for i in done):
        raise CtsynthError(f"{out}: holds {max(done) + 1} volume(s) or more; --resume can add volumes, not take them "
                           f"away (pass --n {max(done) + 1} or more)")  # fmt: skip
    skipped = len(done)
    _check_disk(out, options.n - skipped, size)
    shape = None
    if skipped < options.n:  # a pool that cannot run is refused before anything is written
        import ray

        ensure_ray(ray_options.address)
        node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        shape = _pool_shape(options, ray.cluster_resources(), [c for c in node_cpus if c > 0])
    if isinstance(out, Path):  # an object store has no folders to make
        out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_FILE, settings)
    remove_temporary_files(out, VOLUME_FOLDERS)  # left by writers killed in an earlier run
    todo = [i for i in range(options.n) if i not in done]
    summary = GenerateSummary(out, options.n, 0, skipped, 0, 0, 0, 0, 0, 0.0)
    if todo:
        work = _Work(model, out, source, source_fingerprint, len(rows), bank, config, fingerprint, todo)
        _run_pool(options, ray_options, work, shape, summary, echo)
    remove_temporary_files(out, VOLUME_FOLDERS)
    done.update(finished_rows(out))  # what is on disk, not what the actors said
    missing = [i for i in range(options.n) if i not in done]
    if missing:
        raise CtsynthError(
            f"{out}: {len(missing)} volume(s) were not made (first: {missing[0]}); run again with --resume"
        )
    final = [done[i] for i in range(options.n)]
    write_manifest(out, final)
    clear_records(out)
    summary.with_nodule = sum(r["n_nodules"] > 0 for r in final)
    summary.pasted = sum(bool(r["inserted_nodule"]) for r in final)
    summary.paste_failed = sum(bool(r["paste_failed"]) for r in final)
    summary.seconds = time.monotonic() - started
    return summary


@dataclass(frozen=True)
class _Work:
    """What the pool makes: the generator, output, source (and its train volumes), bank, label settings."""

    model: Path | Remote
    out: Path | Remote
    source: Path | Remote
    source_fingerprint: str
    n_sources: int
    bank: list
    config: SynthLabelConfig
    generator_fingerprint: str
    todo: list[int]


def _pool_shape(options: GenerateOptions, cluster: dict, node_cpus: list[float] | None = None
                ) -> tuple[int, float, float, float, int]:  # fmt: skip
    """(actors, GPUs per actor, CPUs per actor, CPUs per label task, threads per actor): one clear line when the
    actors asked for cannot all run on the cluster. ``node_cpus`` (CPUs per node) keeps a label task small enough
    for what actors spread over the nodes leave on one of them."""
    gpus = cluster.get("GPU", 0.0)
    per_actor = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    cpus = cluster.get("CPU", 1.0)
    actors = options.actors or (max(1, int(gpus // per_actor)) if per_actor else max(1, int(cpus)))
    if per_actor and actors * per_actor > gpus:
        raise CtsynthError(f"{actors} actor(s) of {per_actor:g} GPU(s) each: the Ray cluster has {gpus:g} GPU(s)")
    if per_actor:  # a GPU actor's CPUs compress and write: half of what is left per GPU, the rest for the labels
        actor_cpus = float(max(1, min(8, int((cpus - 1) // (2 * actors)))))
    else:  # CPU actors: leave half a CPU to the label tasks, or they starve (Ray issue 44687)
        actor_cpus = min(1.0, (cpus - 0.5) / actors)
    if actor_cpus < 0.25 or actors * actor_cpus > cpus - 0.25:
        raise CtsynthError(f"{actors} generator actor(s) do not fit the Ray cluster's {cpus:g} CPU(s) with room for "
                           f"the label tasks: pass fewer --actors")  # fmt: skip
    label_cpus = min(1.0, cpus - actors * actor_cpus)
    if node_cpus and len(node_cpus) > 1:  # e.g. two 1-CPU nodes with an actor each: 0.25 CPU left on each
        per_node = -(-actors // len(node_cpus))
        label_cpus = min(label_cpus, max(max(node_cpus) - per_node * actor_cpus, 0.1))
    return actors, per_actor, actor_cpus, label_cpus, max(1, int(actor_cpus))


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def _run_pool(options: GenerateOptions, ray_options: RayOptions, work: _Work, shape: tuple, summary: GenerateSummary,
              echo) -> None:  # fmt: skip
    """Make the volumes ``work.todo`` with a pool of generator actors of ``shape`` (``_pool_shape``), counting
    them in ``summary``."""
    import uuid

    import ray
    from ray.exceptions import RayActorError, RayError, RayTaskError
    from tqdm import tqdm

    from ctsynth_ray.synth_labels import plan_chunks

    cluster = ray.cluster_resources()
    actors_n, gpus, actor_cpus, label_cpus, threads = shape
    chunks = deque(plan_chunks(options.seed, work.todo, work.n_sources, options.chunk))
    label_task = ray.remote(num_cpus=label_cpus)(_label_task)
    # On a GPU two calls at a time overlap one's inference with the other's writes; on a CPU inference is the work,
    # and two calls would only make two threads share a core.
    concurrency = 2 if gpus else 1
    actor_class = ray.remote(num_cpus=actor_cpus, num_gpus=gpus, max_concurrency=concurrency, max_restarts=0)(
        VolumeMaker
    )
    token = uuid.uuid4().hex[:8]
    extra = {"generator_fingerprint": work.generator_fingerprint, "generator": str(work.model)}
    bank_ref = ray.put(work.bank)
    # Label tasks in flight: enough to keep the actors fed and the free CPUs busy, few enough to bound memory.
    window = 2 * actors_n + max(1, int((cluster.get("CPU", 1.0) - actors_n * actor_cpus) / label_cpus))
    max_replacements = 2 * actors_n + 2  # an actor that cannot start (or a chunk that kills it) must not loop
    spawned = 0

    def new_actor():
        nonlocal spawned
        spawned += 1
        return actor_class.options(name=f"ctsynth-generator-{token}-{spawned}").remote(
            work.model, work.out, options.seed, options.batch, options.compile, threads, extra
        )

    echo(f"generate: {len(work.todo)} volume(s) of {work.config.size}^3 from {work.n_sources} source volume(s) in "
         f"{len(chunks)} chunk(s), {actors_n} actor(s) with {gpus:g} GPU(s) and {actor_cpus:g} CPU(s) each")  # fmt: skip
    actors = [new_actor() for _ in range(actors_n)]
    labels: dict = {}  # label task -> chunk
    ready: deque = deque()  # (label ref, chunk) waiting for an actor
    calls: dict = {}  # actor call -> (slot, actor, label ref, chunk)
    bar = tqdm(total=len(work.todo), desc="generate", unit="vol", disable=not ray_options.progress)
    try:
        while chunks or labels or ready or calls:
            while chunks and len(labels) + len(ready) < window:
                chunk = chunks.popleft()
                task = label_task.remote(work.source, work.source_fingerprint, options.seed, chunk, bank_ref,
                                         work.config)  # fmt: skip
                labels[task] = chunk
            while ready:
                load = [sum(1 for s, a, *_ in calls.values() if s == k and a is actors[k]) for k in range(actors_n)]
                slot = min(range(actors_n), key=load.__getitem__)
                if load[slot] >= 2:  # one call running, one queued behind it (or running too, on a GPU)
                    break
                label_ref, chunk = ready.popleft()
                calls[actors[slot].make.remote(label_ref)] = (slot, actors[slot], label_ref, chunk)
            (finished,), _ = ray.wait([*labels, *calls], num_returns=1)
            if finished in labels:
                ready.append((finished, labels.pop(finished)))
                continue
            slot, actor, label_ref, chunk = calls.pop(finished)
            try:
                rows, times = ray.get(finished)
            except RayActorError as exc:  # the actor died (killed, out of memory, its node lost): replace it, redo
                if actors[slot] is actor:
                    if summary.actors_replaced >= max_replacements:
                        raise CtsynthError(f"{work.out}: generator actors died {summary.actors_replaced + 1} times; "
                                           f"the last: {_one_line(exc)}") from None  # fmt: skip
                    ray.kill(actor)  # it may be unreachable rather than dead: it must not write any more
                    actors[slot] = new_actor()
                    summary.actors_replaced += 1
                ready.appendleft((label_ref, chunk))  # its finished volumes are rewritten, byte for byte the same
                continue
            except RayTaskError as exc:
                if isinstance(exc.cause, CtsynthError):
                    raise CtsynthError(str(exc.cause)) from None
                raise CtsynthError(f"{work.out}: generation failed ({_one_line(exc)}); finished volumes are kept, "
                                   f"--resume continues") from None  # fmt: skip
            except RayError as exc:
                raise CtsynthError(f"{work.out}: generation failed ({_one_line(exc)}); --resume continues") from None
            summary.stages.add(times)
            summary.made += len(rows)
            bar.update(len(rows))
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    summary.actors = actors_n
