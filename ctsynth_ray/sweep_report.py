"""The report of a sweep: the thesis' tables and figures over set-ups and seeds, as Markdown and one HTML page.

Input: one :class:`TrialScores` per (set-up, seed), the per-volume scores its U-Net got on the real validation
set. Every set-up is compared with the baseline (``real-only``) of the same seed, over the volumes with a nodule
(:func:`ctsynth_ray.seg_metrics.compare`: paired t-test and Wilcoxon). *Pooled* over seeds, a volume's score is
its mean over the seeds both set-ups ran, and the test pairs volumes: the volumes are the independent units, the
seeds only average out training noise.

Written to the output folder: ``report.md``, ``report.html`` (standalone, figures embedded), ``results.csv``
(one row per set-up, seed and metric) and the figures:

- ``setups.png``: mean with its standard error per set-up and metric (the thesis' Fig. 5.9);
- ``volumes-<set-up>.png``: per-volume Dice and sensitivity of a set-up, the baseline's mean as a line;
- ``fraction.png``: each metric against the synthetic fraction, mean with its 95 % confidence band.
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.html_report import (
    atomic_write,
    figure_png,
    html_document,
    html_table,
    image_tag,
    markdown_table,
    number,
)
from ctsynth_ray.seg_metrics import compare, describe
from ctsynth_ray.sweep import BASELINE

METRICS = ("sensitivity", "accuracy", "dice", "f2")
RESULT_COLUMNS = ("setup", "seed", "metric", "n", "baseline_mean", "median", "mean", "std", "ci_low", "ci_high",
                  "mean_difference", "p_value", "wilcoxon_p")  # fmt: skip


@dataclass
class TrialScores:
    """A trial's set-up, seed and per-volume scores ({volume_id: row with nodule_present and the metrics})."""

    setup: str
    seed: int
    real_n: int
    synthetic_n: int
    scores: dict[str, dict] = field(repr=False)

    @property
    def fraction(self) -> float:
        return self.synthetic_n / max(self.real_n + self.synthetic_n, 1)


def _setups(trials: Sequence[TrialScores]) -> list[str]:
    """Set-up names in a stable order: the baseline first, then by synthetic fraction, then by size."""
    first = {}
    for t in trials:
        first.setdefault(t.setup, (t.setup != BASELINE, t.fraction, t.real_n + t.synthetic_n, t.setup))
    return sorted(first, key=first.get)


def _volume_value(row: dict, metric: str) -> float:
    if metric != "accuracy" and not row["nodule_present"]:
        return float("nan")
    return float(row.get(metric, float("nan")))


def _seed_mean(trials: Sequence[TrialScores]) -> dict[str, dict]:
    """Per volume, each metric's mean over ``trials`` (the seeds of one set-up; NaN where none has a value)."""
    volumes = sorted(set().union(*(t.scores for t in trials)))
    out = {}
    for vid in volumes:
        rows = [t.scores[vid] for t in trials if vid in t.scores]
        row = {"volume_id": vid, "nodule_present": any(r["nodule_present"] for r in rows)}
        for metric in METRICS:
            values = [float(r[metric]) for r in rows if metric in r and not math.isnan(float(r[metric]))]
            row[metric] = float(np.mean(values)) if values else float("nan")
        out[vid] = row
    return out


def _describe_volumes(volumes: dict[str, dict], metric: str) -> dict:
    """describe() of a metric over volumes (accuracy over all, the others over those with a nodule)."""
    values = np.array([_volume_value(row, metric) for row in volumes.values()], float)
    return describe(values[~np.isnan(values)])


def setup_means(trials: Sequence[TrialScores]) -> dict[str, dict]:
    """{set-up: {metric: describe() over volumes of each volume's mean over seeds, "seeds": k, sizes}}: accuracy
    over every volume, the other metrics over the volumes with a nodule."""
    out = {}
    for setup in _setups(trials):
        mine = [t for t in trials if t.setup == setup]
        volumes = _seed_mean(mine)
        entry = {"seeds": len(mine), "real_n": mine[0].real_n, "synthetic_n": mine[0].synthetic_n,
                 "fraction": mine[0].fraction}  # fmt: skip
        for metric in METRICS:
            entry[metric] = _describe_volumes(volumes, metric)
        out[setup] = entry
    return out


def comparisons(trials: Sequence[TrialScores], ci: str = "t") -> list[dict]:
    """One row per (set-up other than the baseline, seed or "pooled", metric): the set-up's median, mean, sd and
    CI, the baseline's mean, the mean paired difference and the p-values. CtsynthError without a baseline."""
    by_key = {(t.setup, t.seed): t for t in trials}
    seeds = sorted({t.seed for t in trials})
    if not any(t.setup == BASELINE for t in trials):
        raise CtsynthError(f"no {BASELINE} trial finished: nothing to compare the set-ups with")
    rows = []
    for setup in _setups(trials):
        if setup == BASELINE:
            continue
        paired = [s for s in seeds if (setup, s) in by_key and (BASELINE, s) in by_key]
        groups = [(s, [by_key[(BASELINE, s)]], [by_key[(setup, s)]]) for s in paired]
        if len(paired) > 1:
            groups.insert(0, ("pooled", [by_key[(BASELINE, s)] for s in paired], [by_key[(setup, s)] for s in paired]))
        for seed, base, cand in groups:
            result = compare(_seed_mean(base), _seed_mean(cand), ci)
            for metric, m in result["metrics"].items():
                d, b = m["candidate"], m["baseline"]
                rows.append({"setup": setup, "seed": seed, "metric": metric, "n": d["n"], "baseline_mean": b["mean"],
                             "median": d["median"], "mean": d["mean"], "std": d["std"], "ci_low": d["ci95"][0],
                             "ci_high": d["ci95"][1], "mean_difference": d["mean"] - b["mean"],
                             "p_value": m["p_value"], "wilcoxon_p": m["wilcoxon_p"]})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------------- figures


def _setups_figure(means: dict[str, dict]) -> bytes:
    """Mean with its standard error per set-up, one panel per metric (the thesis' Fig. 5.9)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(means)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], METRICS):
        mean = [means[s][metric]["mean"] for s in names]
        se = [means[s][metric]["std"] / math.sqrt(means[s][metric]["n"]) if means[s][metric]["n"] > 1 else 0.0
              for s in names]  # fmt: skip
        ax.errorbar(range(len(names)), mean, yerr=np.nan_to_num(se), fmt="o", capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("mean +- standard error over volumes per set-up (a volume's score: its mean over seeds)", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def _volumes_figure(trials: Sequence[TrialScores], setup: str) -> bytes:
    """Per-volume Dice and sensitivity of ``setup`` (mean over seeds), the baseline's mean as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = _seed_mean([t for t in trials if t.setup == setup])
    base = _seed_mean([t for t in trials if t.setup == BASELINE])
    volumes = [v for v in sorted(mine) if mine[v]["nodule_present"]]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 0.35 * len(volumes) + 3), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], ("dice", "sensitivity")):
        ax.bar(range(len(volumes)), [mine[v][metric] for v in volumes], color="tab:blue")
        values = [base[v][metric] for v in base if base[v]["nodule_present"] and not math.isnan(base[v][metric])]
        if values:
            ax.axhline(np.mean(values), color="tab:red", linewidth=1, label=f"{BASELINE} mean {np.mean(values):.3f}")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(volumes)), volumes, rotation=90, fontsize=6)
        ax.set_ylim(0, 1)
        ax.set_title(f"{setup}: {metric} per volume", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def _fraction_figure(means: dict[str, dict]) -> bytes:
    """Each metric against the synthetic fraction: one point per set-up (mean over volumes of their mean over
    seeds) with its 95 % CI; the set-ups of the baseline's size joined by a line and a confidence band, the others
    (other sizes) labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = means[BASELINE]["real_n"] + means[BASELINE]["synthetic_n"] if BASELINE in means else None
    family = sorted((m["fraction"], s) for s, m in means.items() if m["real_n"] + m["synthetic_n"] == size)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], METRICS):
        for setup, m in means.items():
            d = m[metric]
            low, high = (np.nan_to_num(v, nan=d["mean"]) for v in d["ci95"])
            in_family = (m["fraction"], setup) in family
            ax.errorbar([m["fraction"]], [d["mean"]], yerr=[[d["mean"] - low], [high - d["mean"]]], fmt="o",
                        capsize=3, color="tab:blue" if in_family else "tab:orange")  # fmt: skip
            if not in_family:
                ax.annotate(setup, (m["fraction"], d["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if len(family) > 1:
            stats = [means[s][metric] for _, s in family]
            mean = np.array([d["mean"] for d in stats])
            low = np.array([np.nan_to_num(d["ci95"][0], nan=d["mean"]) for d in stats])
            high = np.array([np.nan_to_num(d["ci95"][1], nan=d["mean"]) for d in stats])
            fractions = [f for f, _ in family]
            ax.plot(fractions, mean, "-", color="tab:blue")
            ax.fill_between(fractions, low, high, alpha=0.2, color="tab:blue")
        ax.set_xlabel("synthetic fraction", fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"metric against synthetic fraction: mean and 95 % CI over volumes; line: set-ups of {size} volumes",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    return figure_png(fig)


# ----------------------------------------------------------------------------------------------------- tables


def _tables(trials: Sequence[TrialScores], means: dict[str, dict], rows: list[dict]) -> list[tuple[str, list, list]]:
    """(title, header, rows) of every table of the report."""
    tables = [(
        "Mean of each metric per set-up (over volumes, a volume's score its mean over seeds; accuracy over every volume, the others over "
        "the volumes with a nodule)",
        ["set-up", "real", "synthetic", "fraction", "seeds", *METRICS],
        [[s, m["real_n"], m["synthetic_n"], m["fraction"], m["seeds"], *(m[k]["mean"] for k in METRICS)]
         for s, m in means.items()],
    )]  # fmt: skip
    for seed_kind, title in (("pooled", "pooled over seeds"), ("per-seed", "per seed")):
        chosen = [r for r in rows if (r["seed"] == "pooled") == (seed_kind == "pooled")]
        if seed_kind == "pooled" and not chosen:  # one seed: the per-seed table says it all
            continue
        tables.append((
            f"Each set-up against {BASELINE}, {title}: median, mean, sd and 95 % CI of the set-up; the mean paired "
            f"difference; paired t-test and Wilcoxon p-values",
            ["set-up", "seed", "metric", "n", "median", "mean", "sd", "95% CI", f"{BASELINE} mean", "difference",
             "t-test p", "Wilcoxon p"],
            [[r["setup"], r["seed"], r["metric"], r["n"], r["median"], r["mean"], r["std"],
              f"[{number(r['ci_low'])}, {number(r['ci_high'])}]", r["baseline_mean"], r["mean_difference"],
              r["p_value"], r["wilcoxon_p"]] for r in chosen],
        ))  # fmt: skip
    return tables


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_report(trials: Sequence[TrialScores], out: str | os.PathLike, title: str, source: str,
                 ci: str = "t") -> dict[str, Path]:  # fmt: skip
    """Write the report of ``trials`` into ``out``; returns {what: path}. ``source`` says where the results came
    from (a sweep folder or an MLflow experiment). CtsynthError when there is nothing to report."""
    if not trials:
        raise CtsynthError(f"{source}: no finished trial to report")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    means = setup_means(trials)
    rows = comparisons(trials, ci)
    figures = {"setups.png": ("Mean and standard error per set-up", _setups_figure(means))}
    for setup in means:
        if setup != BASELINE:
            figures[f"volumes-{_slug(setup)}.png"] = (f"{setup} per volume", _volumes_figure(trials, setup))
    figures["fraction.png"] = ("Metrics against the synthetic fraction", _fraction_figure(means))
    tables = _tables(trials, means, rows)
    seeds = sorted({t.seed for t in trials})
    intro = (f"{len(trials)} trial(s): {len(means)} set-up(s) x seeds {', '.join(map(str, seeds))}; "
             f"scores of the real validation volumes; results from {source}.")  # fmt: skip
    markdown = [f"# {title}", "", intro, ""]
    page = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for caption, header, body in tables:
        markdown += [f"## {caption}", "", markdown_table(header, body), ""]
        page += [f"<h2>{html.escape(caption)}</h2>", html_table(header, body)]
    for name, (caption, png) in figures.items():
        atomic_write(out / name, png)
        markdown += [f"## {caption}", "", f"![{caption}]({name})", ""]
        page += [f"<h2>{html.escape(caption)}</h2>", image_tag(png, caption)]
    document = html_document(title, page)
    atomic_write(out / "report.md", "\n".join(markdown).encode())
    atomic_write(out / "report.html", document.encode())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(RESULT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows)
    atomic_write(out / "results.csv", buffer.getvalue().encode())
    return {"report": out / "report.md", "html": out / "report.html", "results": out / "results.csv",
            **{name: out / name for name in figures}}  # fmt: skip
