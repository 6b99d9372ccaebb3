"""Generation throughput: the naive path against ctsynth's pipeline, in one run, on the same volumes.

Naive (as the reference CycleGAN test script): label volume by label volume, one slice at a time (batch 1, fp32),
then the volume's files written serially. ctsynth: ``ctsynth generate`` (label tasks, generator actors with
large batches, writes overlapping inference) on a local Ray. Prints volumes/s of each and their ratio, the time
per stage, and the mean absolute HU difference between bf16 and fp32 output of the same generator.

Sources: adult-size phantoms (640 x 480 x 320, like an LIDC case after resampling) prepared as a user would, so
that label synthesis decodes real-sized sources (``--sources``, 50 for the issue's figure; fewer for a quick run).
The generator is ctsynth's default CycleGAN generator (ResNet 32-64-128, 6 blocks), untrained: speed does not
depend on the weights.

    .venv/bin/python benchmarks/generate.py [--n 96] [--naive-n 48] [--sources 50] [--compile] [--batch 16] [--actors 2] [--keep DIR]

GPU machine without Ray (PyTorch only; see ../shared/STACK.md for carrying nibabel and isal wheels):

    PYTHONPATH=.:WHEELS python3 benchmarks/generate.py --no-ray --device cuda [--compile]

drives ``VolumeMaker`` (the generator actor's class, translator + writer pool) and the label synthesis directly,
and reports inference alone (batch 1 fp32, batch 512 bf16 channels-last, compiled) and the CPU side (label
synthesis, compression and writes on a process pool of every core) separately.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctsynth_ray.dataset import write_manifest
from ctsynth_ray.generation import LabelItem, Translator, VolumeMaker, VolumeWriter
from ctsynth_ray.generation import label_items as make_label_items
from ctsynth_ray.labels import HU_SCALE
from ctsynth_ray.models.gan import GanConfig, GanTrainer
from ctsynth_ray.models.registry import GENERATOR_STEM, export_network, load_generator
from ctsynth_ray.nodule_bank import save_bank
from ctsynth_ray.synth_labels import (
    SourceCache,
    SynthLabelConfig,
    check_sources,
    plan_chunks,
    planned_source,
)

SIZE = 128


def _phantom(args):
    from ctsynth_ray.labels import label_map
    from ctsynth_ray.phantom import PhantomConfig, make_phantom

    index, shape = args
    volume = make_phantom(0, index, PhantomConfig(shape=shape)).volume
    volume.label = label_map(volume.hu, volume.mask, "body")
    return volume


def _write_source(args):
    from ctsynth_ray.dataset import Volume, write_volume

    root, volume_id, hu, label, mask, affine = args
    volume = Volume(volume_id, hu, mask, affine, label)
    return write_volume(root, volume, split="train", source="phantom", label_scheme="body")


def make_sources(root: Path, n: int, shape, distinct: int = 4) -> Path:
    """``n`` real-sized sources as `prepare` leaves them, less the image that label synthesis never reads (label
    map + mask): ``distinct`` adult phantoms, each written as several sources, flipped and shifted, so that every
    source is a file of its own to decode. Plus the template bank, cut from the phantoms with their CT."""
    from ctsynth_ray.nodule_bank import build_template_bank

    with ProcessPoolExecutor(os.cpu_count()) as pool:
        bases = list(pool.map(_phantom, [(k, shape) for k in range(min(distinct, n))]))
        rows, workers = [], os.cpu_count() or 1
        for start in range(0, n, workers):  # a few at a time: each source is hundreds of MB in memory
            jobs = []
            for k in range(start, min(start + workers, n)):
                base = bases[k % len(bases)]
                variant = k // len(bases)
                flip = tuple(a for a in range(2) if variant >> a & 1)  # left-right / front-back
                shift = 3 * (variant // 4)

                def moved(array, flip=flip, shift=shift):
                    return np.ascontiguousarray(np.roll(np.flip(array, flip), shift, 2))

                jobs.append((root, f"source-{k:03d}", None, moved(base.label), moved(base.mask), base.affine))
            rows += list(pool.map(_write_source, jobs))
        write_manifest(root, rows)
        with_images = root / "with-images"  # the bank cuts CT around each nodule
        rows = list(pool.map(_write_source, [(with_images, f"base-{k}", b.hu, b.label, b.mask, b.affine)
                                             for k, b in enumerate(bases)]))  # fmt: skip
        write_manifest(with_images, rows)
    save_bank(build_template_bank(with_images, 15, 0), root / "bank.parquet")
    return root


def make_generator(run_dir: Path) -> Path:
    """The default CycleGAN generator (untrained), exported as train-gan would."""
    trainer = GanTrainer(GanConfig(), 2, 1, 1)
    info = {"model": "cyclegan", "dims": "2", "label_scheme": "body", "label_encoding": "scalar", "stack_slices": 3,
            "hu_normalisation": {"scale": HU_SCALE}, "spacing_mm": [0.48828125, 0.48828125, 1.0], "size": SIZE,
            "training_data": {}}  # fmt: skip
    export_network(run_dir, GENERATOR_STEM, trainer.G_A, trainer.spec, info)
    return run_dir


def label_items(cache: SourceCache, bank, indices, seed: int = 0) -> tuple[list[LabelItem], float]:
    return make_label_items(seed, indices, cache, bank, SynthLabelConfig(size=SIZE))


def new_cache(source: Path) -> SourceCache:
    return SourceCache(source, check_sources(source, SIZE))


def grouped(source: Path, n: int, parts: int, chunk: int = 8) -> list[list[list[int]]]:
    """Volumes 0..n-1 in chunks grouped by source (as `generate` plans them), dealt to ``parts`` workers."""
    chunks = plan_chunks(0, range(n), len(check_sources(source, SIZE)), chunk)
    return [chunks[k::parts] for k in range(parts)]


def rendered_ct(label: np.ndarray, index: int) -> np.ndarray:
    """CT-like HU for a label map (each class's typical HU plus 20 HU of noise): what the compressor would get."""
    means = np.array([-850, -100, 0, 40, 700, 30, -1000], np.float32)
    noise = np.random.default_rng(index).normal(0, 20, label.shape).astype(np.float32)
    return np.clip(means[label] + noise, -1024, 3071).astype(np.int16)


def naive(model: Path, source: Path, bank, n: int, out: Path, device: str) -> dict:
    """Volume by volume, as the reference's test script: one slice at a time in fp32, files written serially
    (sources are decoded once, as ctsynth does, so that the comparison is of the generation itself)."""
    generator, info = load_generator(model, device)
    translator = Translator(generator, info, device, batch=1, bf16=False)
    writer = VolumeWriter(out, 0, {})
    times = {"labels": 0.0, "inference": 0.0, "writes": 0.0}
    cache = new_cache(source)
    started = time.perf_counter()
    for index in range(n):
        (item,), seconds = label_items(cache, bank, [index])
        times["labels"] += seconds
        t = time.perf_counter()
        (hu,) = translator.translate([item.label])
        times["inference"] += time.perf_counter() - t
        t = time.perf_counter()
        writer.write(item, hu)
        times["writes"] += time.perf_counter() - t
    return {"volumes_per_s": n / (time.perf_counter() - started), **times}


def pipeline_on_ray(model: Path, source: Path, n: int, out: Path, batch: int, actors: int | None,
                    compile: bool) -> dict:  # fmt: skip
    from ctsynth_ray.pipelines.generate import GenerateOptions, generate
    from ctsynth_ray.pipelines.runtime import RayOptions

    options = GenerateOptions(n=n, model=str(model), out=str(out), source=str(source), bank=str(source / "bank.parquet"),
                              batch=batch, actors=actors, chunk=4, compile=compile)  # fmt: skip
    summary = generate(options, RayOptions(progress=False), echo=lambda *_: None)
    stages = summary.stages
    return {"volumes_per_s": summary.made / summary.seconds, "labels": stages.labels, "inference": stages.inference,
            "compression": stages.compression, "writes": stages.write, "wall": summary.seconds}  # fmt: skip


def bf16_difference(model: Path, source: Path, bank, device: str, n: int = 2) -> float:
    """Mean |HU(bf16) - HU(fp32)| over ``n`` generated volumes."""
    items, _ = label_items(new_cache(source), bank, range(n))
    generator, info = load_generator(model, device)
    labels = [item.label for item in items]
    fp32 = Translator(generator, info, device, 256, bf16=False).translate(labels)
    bf16 = Translator(generator, info, device, 256, bf16=True).translate(labels)
    return float(np.mean([np.abs(a.astype(np.float32) - b).mean() for a, b in zip(fp32, bf16)]))


def inference_alone(model: Path, device: str, compile: bool) -> dict:
    """Slices/s of the generator alone: batch 1 fp32, batch 512 bf16 channels-last, and compiled."""
    generator, info = load_generator(model, device)
    label = np.random.default_rng(0).integers(0, 7, (SIZE, SIZE, SIZE), dtype=np.uint8)
    results = {}
    settings = [("batch 1 fp32", 1, False, False), ("batch 512 bf16", 512, True, False)]
    settings += [("batch 512 bf16 compiled", 512, True, True)] if compile else []
    for name, batch, bf16, compiled in settings:
        translator = Translator(generator, info, device, batch, compiled, bf16)
        volumes = [label] * (4 if batch > 1 else 1)
        translator.translate(volumes)  # warm-up (and compilation)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        translator.translate(volumes)
        if device == "cuda":
            torch.cuda.synchronize()
        slices = len(volumes) * SIZE / (time.perf_counter() - started)
        results[name] = {"slices_per_s": slices, "volumes_per_s": slices / SIZE}
    return results


def _label_and_write(args) -> tuple[int, float, float, float]:
    """One process' share of the CPU side for ``indices``: (volumes, seconds decoding sources, drawing label
    volumes, compressing and writing)."""
    source, bank_path, indices, out = args
    from ctsynth_ray.nodule_bank import load_bank

    cache = new_cache(Path(source))
    started = time.perf_counter()
    for k in {planned_source(0, index, len(cache)) for index in indices}:
        cache.get(k)
    decoded = time.perf_counter()
    items, _ = label_items(cache, load_bank(bank_path), indices)
    drawn = time.perf_counter()
    cts = [rendered_ct(item.label, item.index) for item in items]  # stands in for the generator's output
    rendered = time.perf_counter()
    writer = VolumeWriter(out, 0, {})
    for item, hu in zip(items, cts):
        writer.write(item, hu)
    return len(items), decoded - started, drawn - decoded, time.perf_counter() - rendered


def cpu_side(source: Path, n: int, out: Path, workers: int) -> dict:
    """Label synthesis + compression + writes on ``workers`` processes (no inference): the measured rate, and
    the rate once every source is decoded (per-volume work only), which is what a long run approaches."""
    shares = [[i for chunk in part for i in chunk] for part in grouped(source, n, workers)]
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        parts = list(
            pool.map(_label_and_write, [(str(source), str(source / "bank.parquet"), s, str(out)) for s in shares])
        )
    wall = time.perf_counter() - started
    made, decode, draw, write = (sum(p[k] for p in parts) for k in range(4))
    return {"volumes_per_s": made / wall, "workers": workers, "decode_s": decode, "draw_s": draw, "write_s": write,
            "per_volume_ms": 1000 * (draw + write) / made, "steady_volumes_per_s": workers * made / (draw + write)}  # fmt: skip


def maker_alone(model: Path, source: Path, n: int, out: Path, batch: int, compile: bool) -> dict:
    """The generator actor's class driven directly: inference + writes of prepared label chunks."""
    from concurrent.futures import ThreadPoolExecutor

    maker = VolumeMaker(str(model), str(out), 0, batch, compile, os.cpu_count() or 1, {})
    (chunks,) = grouped(source, n, 1)
    pieces = [(str(source), chunk) for chunk in chunks]
    with ProcessPoolExecutor(os.cpu_count()) as pool:  # the label maps are made beforehand, not timed
        chunks = list(pool.map(_label_chunk, pieces))
    maker.make(chunks[0])  # warm-up (and compilation)
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as calls:  # two calls at a time, as an actor with max_concurrency=2
        made = sum(len(rows) for rows, _ in calls.map(maker.make, chunks))
    return {"volumes_per_s": made / (time.perf_counter() - started)}


def _label_chunk(args) -> tuple[list[LabelItem], float]:
    from ctsynth_ray.nodule_bank import load_bank

    source, indices = args
    return label_items(new_cache(Path(source)), load_bank(Path(source) / "bank.parquet"), indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48, help="volumes per path")
    parser.add_argument("--naive-n", type=int, default=None, help="volumes of the naive path (default: --n)")
    parser.add_argument("--sources", type=int, default=50, help="adult-size phantom sources")
    parser.add_argument("--shape", default="640,480,320")
    parser.add_argument("--batch", type=int, default=None, help="default: 512 on a GPU, 16 on a CPU")
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-ray", action="store_true", help="drive VolumeMaker directly (a machine without Ray)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the sources here (and reuse them)")
    parser.add_argument("--only", default="naive,inference,maker,cpu", help="with --no-ray: which parts to run")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    work = Path(tempfile.mkdtemp(prefix="ctsynth-bench-"))
    try:
        source = args.keep or work / "sources"
        if not (source / "manifest.parquet").is_file():
            started = time.perf_counter()
            make_sources(source, args.sources, shape)
            print(f"made {args.sources} sources of {shape} in {time.perf_counter() - started:.0f} s")
        from ctsynth_ray.nodule_bank import load_bank

        bank = load_bank(source / "bank.parquet")
        model = make_generator(work / "generator")
        results = {"machine": {"cpus": os.cpu_count(), "device": args.device,
                               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
                   "n": args.n, "sources": args.sources}  # fmt: skip
        parts = set(args.only.split(",")) if args.no_ray else {"naive"}
        results["bf16_vs_fp32_mean_abs_hu"] = bf16_difference(model, source, bank, args.device)
        if "naive" in parts:
            results["naive"] = naive(model, source, bank, args.naive_n or args.n, work / "naive", args.device)
        if not args.no_ray:
            results["ctsynth"] = pipeline_on_ray(model, source, args.n, work / "ctsynth", args.batch, args.actors,
                                                 args.compile)  # fmt: skip
            results["ratio"] = results["ctsynth"]["volumes_per_s"] / results["naive"]["volumes_per_s"]
        if "inference" in parts:
            results["inference_alone"] = inference_alone(model, args.device, args.compile)
        if "maker" in parts:
            results["volume_maker"] = maker_alone(model, source, args.n, work / "maker", args.batch, args.compile)
        if "cpu" in parts:
            results["cpu_side"] = cpu_side(source, args.n, work / "cpu", os.cpu_count() or 1)
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
