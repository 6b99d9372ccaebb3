"""Label volumes per second per core for `synth-labels`, and where the time goes.

    .venv/bin/python benchmarks/synth_labels.py [--n 200] [--size 128]

Makes a small phantom dataset with label maps (not timed), then times N label volumes in one process
(one core): drawing (cube, checks, template paste) and writing (NIfTI, gzip) separately. Prints the rate
and its ratio to the 20 volumes/s/core target.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ctsynth_ray.dataset import write_volume
from ctsynth_ray.nodule_bank import build_template_bank
from ctsynth_ray.pipelines.phantoms import make_phantom_dataset
from ctsynth_ray.pipelines.prepare import write_label_maps
from ctsynth_ray.pipelines.runtime import RayOptions
from ctsynth_ray.synth_labels import SourceCache, SynthLabelConfig, check_sources, make_label_volume

QUIET = RayOptions(progress=False)

TARGET_PER_CORE = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "phantoms"
        make_phantom_dataset(source, 6, seed=0, split_fractions=(1.0, 0.0, 0.0), ray_options=QUIET)
        write_label_maps(source, "body", QUIET)
        config = SynthLabelConfig(size=args.size)
        cache = SourceCache(source, check_sources(source, config.size))
        bank = build_template_bank(source, 15)
        t = time.perf_counter()
        for k in range(len(cache)):
            cache.get(k)
        decode = time.perf_counter() - t
        out = Path(tmp) / "out"
        draw = write = 0.0
        for index in range(args.n):
            t = time.perf_counter()
            volume, extras = make_label_volume(0, index, cache, bank, config)
            draw += time.perf_counter() - t
            t = time.perf_counter()
            write_volume(out, volume, split="train", source="synthetic", **extras)
            write += time.perf_counter() - t
    total = draw + write
    rate = args.n / total
    print(f"synth-labels, {args.n} volumes of {args.size}^3 on one core (sources decoded once: {decode:.2f} s)")
    print(f"  draw (cube, checks, paste)  {1000 * draw / args.n:6.1f} ms/volume  ({draw / total:5.1%})")
    print(f"  write (2 x NIfTI .nii.gz)   {1000 * write / args.n:6.1f} ms/volume  ({write / total:5.1%})")
    print(f"  rate {rate:.1f} volumes/s/core = {rate / TARGET_PER_CORE:.2f} x the {TARGET_PER_CORE:.0f}/s target")


if __name__ == "__main__":
    main()
