"""The phantoms audited against real chest CT: the audit's realism and diversity measures, phantom cubes against
cubes of the real chest CT crop of ../shared/data (a CT angiogram, 1.5 mm, resampled to ctsynth's grid as
`ingest nifti` does), plus mid-slice views of a phantom beside the real CT.

    .venv/bin/python benchmarks/phantom_realism.py --out DIR [--phantoms 4] [--cubes 6] [--data ../shared/data]

Writes DIR/phantom-realism.json (the figures) and DIR/phantom-realism.png (axial, coronal and sagittal mid-slices
of phantom 0 and of the real CT, lung window; the HU histograms per class). Cubes are 128^3, cut by the rule
synthetic label volumes are cut by, from adult-size phantoms (640 x 480 x 320) and from the real CT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctsynth_ray.audit import AuditConfig, cut_cubes, mean_pairwise_ssim, realism, volume_features
from ctsynth_ray.labels import label_map

SIZE = 128
ADULT = (640, 480, 320)


def _real_ct(data: Path, work: Path):
    """The chest CT crop on ctsynth's grid: (hu, label map, mask)."""
    import nibabel as nib

    from ctsynth_ray.dataset import load_volume
    from ctsynth_ray.ingest.cases import NiftiCase, ingest_nifti_case

    image = nib.load(data / "ct" / "chest_cta_crop.nii.gz")
    mask = work / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), mask)
    result = ingest_nifti_case(work / "real", NiftiCase("chest_cta_crop", data / "ct" / "chest_cta_crop.nii.gz", mask))
    if result.error:
        raise SystemExit(f"ingest failed: {result.error}")
    volume = load_volume(work / "real", result.row)
    # The crop lies inside the chest: its lungs touch its borders, so the body scheme's body mask (holes filled
    # per slice) would call them outside air. Everything in it is inside the body: the thesis scheme's class 0 is
    # what the body scheme calls lung (class 0) in the phantoms.
    return volume.hu, label_map(volume.hu, volume.mask, "thesis"), volume.mask


def _cubes(hu, label, mask, n, rng):
    boxes = [tuple(slice(o, o + SIZE) for o in origin) for origin in cut_cubes(label, SIZE, n, rng, tries=400)]
    return [(hu[b], label[b], mask[b]) for b in boxes]


def _views(phantom_hu, real_hu, synthetic, real, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctsynth_ray.audit import class_name, pooled

    fig, axes = plt.subplots(3, 4, figsize=(16, 11))
    for row, (name, hu) in enumerate((("phantom", phantom_hu), ("real chest CT (CTA)", real_hu))):
        x, y, z = (n // 2 for n in hu.shape)
        # As ctsynth_ray.preview shows them: the patient's right on the viewer's left, anterior / superior up.
        axial, coronal, sagittal = hu[::-1, ::-1, z].T, hu[::-1, y, ::-1].T, hu[x, :, ::-1].T
        for col, (view, plane) in enumerate((("axial", axial), ("coronal", coronal), ("sagittal", sagittal))):
            axes[row][col].imshow(plane, cmap="gray", vmin=-1350, vmax=150, aspect="equal")
            axes[row][col].set_title(f"{name}: {view}", fontsize=10)
            axes[row][col].axis("off")
        axes[row][3].imshow(axial, cmap="gray", vmin=-160, vmax=240)
        axes[row][3].set_title(f"{name}: axial, soft-tissue window", fontsize=10)
        axes[row][3].axis("off")
    ours, theirs = pooled([f.samples for f in synthetic]), pooled([f.samples for f in real])
    for ax, tissue in zip(axes[2], [k for k in (0, 1, 3, 4) if k in ours and k in theirs]):
        bins = np.linspace(*np.percentile(np.concatenate([ours[tissue], theirs[tissue]]), [0.5, 99.5]), 50)
        ax.hist(theirs[tissue], bins=bins, density=True, histtype="step", label="real")
        ax.hist(ours[tissue], bins=bins, density=True, histtype="step", label="phantom")
        ax.set_title(f"HU of class {class_name(tissue)}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phantoms", type=int, default=4)
    parser.add_argument("--cubes", type=int, default=6)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CTSYNTH_TEST_DATA", "../shared/data")))
    args = parser.parse_args()

    from ctsynth_ray.phantom import PhantomConfig, make_phantom

    args.out.mkdir(parents=True, exist_ok=True)
    config = AuditConfig()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        real_hu, real_label, real_mask = _real_ct(args.data, Path(work))
    real_cubes = _cubes(real_hu, real_label, real_mask, args.cubes * args.phantoms, rng)
    phantom_cubes, first = [], None
    for k in range(args.phantoms):
        volume = make_phantom(0, k, PhantomConfig(shape=ADULT)).volume
        label = label_map(volume.hu, volume.mask, "body")
        first = volume.hu if first is None else first
        phantom_cubes += _cubes(volume.hu, label, volume.mask, args.cubes, rng)
        print(f"phantom {k}: {len(phantom_cubes)} cubes so far", flush=True)
    real = [volume_features(f"real-{k}", *c, np.random.default_rng((1, k)), config) for k, c in enumerate(real_cubes)]
    synthetic = [volume_features(f"phantom-{k}", *c, np.random.default_rng((0, k)), config)
                 for k, c in enumerate(phantom_cubes)]  # fmt: skip
    figures = {
        "real_cubes": len(real_cubes),
        "phantom_cubes": len(phantom_cubes),
        "realism": realism(synthetic, real, seed=0),
        "diversity": {
            "phantom_pairwise_ssim": mean_pairwise_ssim([c[0] for c in phantom_cubes], 100, 0),
            "real_pairwise_ssim": mean_pairwise_ssim([c[0] for c in real_cubes], 100, 0),
        },
    }
    (args.out / "phantom-realism.json").write_text(json.dumps(figures, indent=2, default=float))
    _views(first, real_hu, synthetic, real, args.out / "phantom-realism.png")
    print(json.dumps({k: figures[k] for k in ("realism", "diversity")}, indent=2, default=float))


if __name__ == "__main__":
    main()
