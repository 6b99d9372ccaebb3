"""The audit's files: ``audit.json``, the standalone ``audit.html``, its figures, and the blind ``turing.html``.

Figures: ``hu_distributions.png`` (each class's HU histogram, synthetic over real), ``privacy.png`` (each volume's
similarity to its source against the label-only rendering's, with the flag line; the nearest-training-crop
similarities of synthetic volumes against those of held-out real cubes, with the threshold) and ``radiomics.png``
(the radiomic features of lung and nodule patches in the real features' first two principal components).

The Turing page shows real and synthetic axial slices (lung window, all cut to the synthetic cube's size) in an
order drawn by the seed, numbered, with a form whose answers download as CSV; which is which is only in
``audit.json`` (``turing.answers``).
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ctsynth_ray.audit import (
    FEATURES,
    LUNG_WINDOW_HU,
    SOURCE_GAP_FRACTION,
    VolumeFeatures,
    class_name,
    pooled,
)
from ctsynth_ray.html_report import atomic_write, figure_png, html_document, html_table, image_tag, number


def summary_lines(report: dict) -> list[str]:
    """The audit in a few lines, as the CLI prints it."""
    realism, diversity, privacy = report["realism"], report["diversity"], report["privacy"]
    worst = sorted(realism["hu_wasserstein"].items(), key=lambda kv: -kv[1])
    lines = [
        f"audit of {report['n_synthetic']} synthetic volume(s) against {report['n_real']} real volume(s)",
        "realism: HU Wasserstein per class (HU): " + ", ".join(f"{k} {v:.1f}" for k, v in worst),
        f"realism: Frechet radiomics {number(realism['frechet_radiomics'], 2)} (real vs real "
        f"{number(realism['frechet_radiomics_real_vs_real'], 2)}); nodule contrast synthetic "
        f"{number(realism['nodule_contrast']['synthetic'], 0)} HU, real {number(realism['nodule_contrast']['real'], 0)} "
        f"HU; interslice |dHU| synthetic {number(realism['interslice']['synthetic'], 1)}, real "
        f"{number(realism['interslice']['real'], 1)}",
        f"diversity: mean pairwise SSIM synthetic {number(diversity['synthetic_pairwise_ssim'])}, real "
        f"{number(diversity['real_pairwise_ssim'])}",
    ]
    threshold = privacy["threshold"]
    lines.append(
        f"privacy: threshold {number(threshold)} (nearest training crop, from {privacy['held_out_cubes']} held-out "
        f"real cube(s)); source copy beyond {SOURCE_GAP_FRACTION:g} of the label-only gap"
        if threshold is not None
        else "privacy: source-copy check only (no GAN data for the nearest-training-crop check)"
    )
    flagged = [r for r in privacy["per_volume"] if r["flags"]]
    if flagged:
        lines.append(f"FLAGGED as copies: {len(flagged)} volume(s)")
        lines += [f"  {r['volume_id']}: {', '.join(r['flags'])} (source {r['source_similarity']:.3f} vs label-only "
                  f"{r['label_only_similarity']:.3f}; nearest crop {r['nearest_train_volume']} "
                  f"{number(r['nearest_train_similarity'])})" for r in flagged[:20]]  # fmt: skip
    else:
        lines.append("privacy: no volume flagged")
    return lines


# ------------------------------------------------------------------------------------------------- figures


def _hu_figure(synthetic: Sequence[VolumeFeatures], real: Sequence[VolumeFeatures]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours, theirs = pooled([f.samples for f in synthetic]), pooled([f.samples for f in real])
    classes = sorted(set(ours) | set(theirs))
    fig, axes = plt.subplots(1, len(classes), figsize=(3.2 * len(classes), 2.8), squeeze=False)
    for ax, tissue in zip(axes[0], classes):
        values = [v for v in (theirs.get(tissue), ours.get(tissue)) if v is not None]
        low, high = np.percentile(np.concatenate(values), [0.5, 99.5])
        bins = np.linspace(low, high + 1, 50)
        for side, data, colour in (("real", theirs, "tab:blue"), ("synthetic", ours, "tab:orange")):
            if tissue in data:
                ax.hist(data[tissue], bins=bins, density=True, histtype="step", color=colour, label=side)
        ax.set_title(class_name(tissue), fontsize=10)
        ax.set_xlabel("HU", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def _privacy_figure(per_volume: list[dict], held_out: Sequence[float], threshold: float | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    label_only = np.array([r["label_only_similarity"] for r in per_volume])
    source = np.array([r["source_similarity"] for r in per_volume])
    flagged = np.array([bool(r["flags"]) for r in per_volume])
    left.scatter(label_only[~flagged], source[~flagged], s=12, label="synthetic volume")
    left.scatter(label_only[flagged], source[flagged], s=24, color="tab:red", label="flagged")
    line = np.linspace(min(label_only.min(), 0.0), 1.0, 20)
    left.plot(line, line, color="grey", lw=0.8, label="= label-only")
    left.plot(line, line + SOURCE_GAP_FRACTION * (1 - line), color="tab:red", lw=0.8, ls="--", label="flag line")
    left.set_xlabel("label-only rendering vs source CT (SSIM)")
    left.set_ylabel("synthetic vs source CT (SSIM)")
    left.set_title("(1) source copy", fontsize=10)
    left.legend(fontsize=7)
    nearest = [r["nearest_train_similarity"] for r in per_volume if r["nearest_train_similarity"] is not None]
    if nearest or len(held_out):
        values = np.concatenate([nearest, held_out]) if len(held_out) else np.asarray(nearest)
        bins = np.linspace(values.min() - 0.01, values.max() + 0.01, 30)
        right.hist(nearest, bins=bins, alpha=0.6, label="synthetic")
        right.hist(held_out, bins=bins, alpha=0.6, label="held-out real cubes")
        if threshold is not None:
            right.axvline(threshold, color="tab:red", ls="--", label="threshold")
        right.legend(fontsize=7)
    right.set_xlabel("SSIM to the nearest GAN training crop")
    right.set_title("(2) nearest training crop", fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def _radiomics_figure(synthetic: Sequence[VolumeFeatures], real: Sequence[VolumeFeatures]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("lung", "nodule")):
        theirs = np.concatenate([getattr(f, kind) for f in real]) if real else np.zeros((0, len(FEATURES)))
        ours = np.concatenate([getattr(f, kind) for f in synthetic]) if synthetic else np.zeros((0, len(FEATURES)))
        ax.set_title(f"{kind} patches: radiomic features, real PCA", fontsize=10)
        if len(theirs) < 3 or len(ours) == 0:
            ax.text(0.5, 0.5, "too few patches", ha="center", transform=ax.transAxes)
            continue
        mean, scale = theirs.mean(0), theirs.std(0)
        scale[scale < 1e-9] = 1.0
        _, _, axes_ = np.linalg.svd((theirs - mean) / scale, full_matrices=False)
        for data, side in ((theirs, "real"), (ours, "synthetic")):
            projected = ((data - mean) / scale) @ axes_[:2].T
            ax.scatter(projected[:, 0], projected[:, 1], s=10, alpha=0.7, label=side)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def _slice_png(hu: np.ndarray) -> bytes:
    """An axial slice (x, y) in the lung window, as radiologists see it: anterior up, patient's right on the left."""
    import matplotlib.image

    buffer = io.BytesIO()
    low, high = LUNG_WINDOW_HU
    plane = np.asarray(hu, np.float32)[::-1, ::-1].T  # x to the patient's right, y anterior (RAS+), as preview.py
    matplotlib.image.imsave(buffer, plane, cmap="gray", vmin=low, vmax=high, format="png")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------- pages


def _turing_page(slices: dict[str, list], seed: int) -> tuple[str, list[dict]]:
    """The blind page and its answer key: real and synthetic slices in an order drawn by ``seed``."""
    items = [(side, vid, z, image) for side in ("real", "synthetic") for vid, z, image in slices[side]]
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4,))).permutation(len(items))
    answers, cells = [], []
    for number_, k in enumerate(order, start=1):
        side, vid, z, image = items[k]
        answers.append({"number": number_, "truth": side, "volume_id": vid, "z": int(z)})
        choices = "".join(f"<label><input type='radio' name='s{number_}' value='{c}'> {c}</label> "
                          for c in ("real", "synthetic"))  # fmt: skip
        tag = image_tag(_slice_png(image), f"slice {number_}", 'width="320" ')
        cells.append(f"<figure><figcaption>{number_}</figcaption>{tag}{choices}</figure>")
    style = ("body{font-family:sans-serif;margin:2em;background:#111;color:#eee}figure{display:inline-block;"
             "margin:8px;text-align:center}figcaption{font-size:18px}img{display:block;margin:4px auto}")  # fmt: skip
    script = ("<script>function download(){const rows=['number,answer'];"
              f"for(let i=1;i<={len(items)};i++){{const c=document.querySelector(`input[name=s${{i}}]:checked`);"
              "rows.push(i+','+(c?c.value:''));}const a=document.createElement('a');"
              "a.href=URL.createObjectURL(new Blob([rows.join('\\n')],{type:'text/csv'}));"
              "a.download='turing-answers.csv';a.click();}</script>")  # fmt: skip
    intro = (f"<h1>Real or synthetic?</h1><p>{len(items)} axial CT slices (lung window W 1500 / L -600), some from "
             "patients and some generated, in random order. Mark each one, then "
             "<button onclick='download()'>download your answers</button> (CSV) and send them back.</p>")  # fmt: skip
    return html_document("Real or synthetic? A visual Turing test", [intro, *cells], style, script), answers


TABLE_ROWS = 100


def _most_suspicious(per_volume: list[dict]) -> list[dict]:
    """Every flagged volume, then the others by their larger excess (source or training crop), up to TABLE_ROWS."""

    def suspicion(r):
        return (not r["flags"], -max(r["source_excess"], r["train_excess"] if r["train_excess"] is not None else -1e9))

    ranked = sorted(per_volume, key=suspicion)
    return ranked[: max(TABLE_ROWS, sum(bool(r["flags"]) for r in per_volume))]


def _audit_page(report: dict, figures: dict[str, tuple[str, bytes]]) -> str:
    realism, diversity, privacy = report["realism"], report["diversity"], report["privacy"]
    parts = [f"<h1>Audit of {html.escape(report['synthetic'])}</h1>",
             f"<p>{report['n_synthetic']} synthetic volume(s) against {report['n_real']} real volume(s) of "
             f"{html.escape(report['real'])}; {report['n_training_crops']} GAN training crop(s).</p>",
             "<h2>Realism</h2>",
             html_table(["class", "HU Wasserstein (HU)"], list(realism["hu_wasserstein"].items())),
             html_table(["measure", "synthetic", "real / baseline"], [
                 ["Frechet radiomics distance (real vs real: two halves of the real set)",
                  realism["frechet_radiomics"], realism["frechet_radiomics_real_vs_real"]],
                 ["nodule - lung contrast (HU)", realism["nodule_contrast"]["synthetic"],
                  realism["nodule_contrast"]["real"]],
                 ["inter-slice mean |dHU|", realism["interslice"]["synthetic"], realism["interslice"]["real"]],
             ]),
             "<h2>Diversity</h2>",
             html_table(["mean pairwise SSIM", "synthetic", "real"],
                        [["pairs of volumes", diversity["synthetic_pairwise_ssim"], diversity["real_pairwise_ssim"]]]),
             "<h2>Privacy</h2>",
             f"<p>(1) Source copy: a volume is flagged when it closes more than {SOURCE_GAP_FRACTION:g} of the gap "
             "between the label-only rendering's similarity to its source CT and an exact copy's. (2) Nearest "
             f"training crop: flagged above the threshold {html.escape(number(privacy['threshold']))}, the highest "
             f"similarity any of {privacy['held_out_cubes']} held-out real cube(s) reaches to its own nearest "
             f"training crop, when it is also nearer that crop than its own label-only rendering is, by more than "
             f"{SOURCE_GAP_FRACTION:g} of the gap to a copy (generated CT is smoother than real CT, and SSIM rewards "
             "smoothness). A flag means: this volume is closer to a patient than what its label map explains, or "
             "than any unseen patient comes; inspect it and do not release it.</p>",
             f"<p><b>{len(privacy['flagged'])} flagged</b>: {html.escape(', '.join(privacy['flagged'][:50]))}</p>",
             f"<p>Flagged volumes first, then the most similar to their source or a training crop "
             f"({min(len(privacy['per_volume']), TABLE_ROWS)} of {len(privacy['per_volume'])}; every volume is in "
             "audit.json).</p>",
             html_table(["volume", "source SSIM", "label-only SSIM", "excess", "nearest crop", "nearest SSIM",
                         "crop excess", "flags"],
                        [[r["volume_id"], r["source_similarity"], r["label_only_similarity"], r["source_excess"],
                          f"{r['nearest_train_volume']} #{r['nearest_train_crop']}" if r["nearest_train_volume"] else "-",
                          r["nearest_train_similarity"], r["train_excess"], ", ".join(r["flags"])]
                         for r in _most_suspicious(privacy["per_volume"])])]  # fmt: skip
    for caption, png in figures.values():
        parts += [f"<h2>{html.escape(caption)}</h2>", image_tag(png, caption)]
    return html_document(f"ctsynth audit: {report['synthetic']}", parts)


def write_audit(report: dict, per_volume: list[dict], held_out: Sequence[float], real: Sequence[VolumeFeatures],
                synthetic: Sequence[VolumeFeatures], slices: dict[str, list], out: str | Path,
                seed: int) -> dict[str, Path]:  # fmt: skip
    """Write audit.json, audit.html, the figures and (with slices) turing.html into ``out``; ``report`` gains the
    Turing answer key. Returns {what: path}."""
    out = Path(out)
    figures = {
        "hu_distributions.png": ("HU per tissue class, synthetic over real", _hu_figure(synthetic, real)),
        "privacy.png": (
            "Privacy: source copies and nearest training crops",
            _privacy_figure(per_volume, held_out, report["privacy"]["threshold"]),
        ),
        "radiomics.png": ("Radiomic features of lung and nodule patches", _radiomics_figure(synthetic, real)),
    }
    files = {}
    for name, (_, png) in figures.items():
        files[name] = atomic_write(out / name, png)
    if slices["real"] or slices["synthetic"]:
        page, answers = _turing_page(slices, seed)
        files["turing"] = atomic_write(out / "turing.html", page.encode())
        report["turing"] = {"page": "turing.html", "real": len(slices["real"]), "synthetic": len(slices["synthetic"]),
                            "answers": answers}  # fmt: skip
    files["html"] = atomic_write(out / "audit.html", _audit_page(report, figures).encode())
    files["json"] = atomic_write(out / "audit.json", json.dumps(report, indent=2, default=float).encode())
    return files
