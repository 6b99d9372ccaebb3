"""Sweep set-ups (thesis and ratio presets) and the sweep report's tables and figures."""

import math

import numpy as np
import pytest

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.sweep import BASELINE, SetUp, ratio_setups, real_size_setups, thesis_setups
from ctsynth_ray.sweep_report import TrialScores, comparisons, setup_means, write_report


def test_thesis_preset_reproduces_the_thesis_sizes_and_scales_down():
    setups = thesis_setups(real_available=344, unseen_available=80, synthetic_available=2000)
    assert [(s.name, s.real_n, s.synthetic_n, s.real_split) for s in setups] == [
        (BASELINE, 344, 0, "train"),
        ("synthetic-same", 0, 344, None),
        ("synthetic-4x", 0, 1400, None),
        ("mixed", 59, 590, "test"),
    ]
    small = thesis_setups(real_available=12, unseen_available=1, synthetic_available=30)
    assert [(s.name, s.real_n, s.synthetic_n) for s in small] == [
        (BASELINE, 12, 0), ("synthetic-same", 0, 12), ("synthetic-4x", 0, 30), ("mixed", 1, 10)]  # fmt: skip
    # No split the GAN never saw: no mixed set-up. Too little synthetic data for the same size: a clear error.
    assert "mixed" not in [s.name for s in thesis_setups(12, 0, 60, unseen_split=None)]
    assert thesis_setups(12, 3, 5)[0].real_n == 5  # by default as many as both sets hold
    with pytest.raises(CtsynthError, match=r"synthetic-same needs 12 synthetic volume.*smaller --total"):
        thesis_setups(12, 3, 5, total=12)
    with pytest.raises(CtsynthError, match="needs 20 real"):
        thesis_setups(12, 3, 50, total=20)


def test_ratio_preset_keeps_the_total_and_always_runs_the_baseline():
    setups = ratio_setups(8, [0.25, 0.5, 1.0, 0.3], real_available=10, synthetic_available=8)
    assert [(s.name, s.real_n, s.synthetic_n) for s in setups] == [
        (BASELINE, 8, 0), ("synthetic-25%", 6, 2), ("synthetic-50%", 4, 4), ("synthetic-100%", 0, 8)]  # fmt: skip
    assert [round(s.fraction, 3) for s in setups] == [0.0, 0.25, 0.5, 1.0]  # 0.3 rounds to 2 of 8: run once
    assert setups[1].train_specs("/r", "/s") == ("/r:train:n=6", "/s:n=2")
    assert setups[3].train_specs("/r", "/s") == ("/s:n=8",)
    with pytest.raises(CtsynthError, match="synthetic-100% needs 8 synthetic"):
        ratio_setups(8, [1.0], 10, 5)
    with pytest.raises(CtsynthError, match=r"must lie in \[0, 1\]"):
        ratio_setups(8, [1.5], 10, 10)
    extra = real_size_setups([2, 8, 4], 10, "train", setups)
    assert [(s.name, s.real_n) for s in extra] == [("real-2", 2), ("real-4", 4)]  # 8 is the baseline already
    with pytest.raises(CtsynthError, match="real-12 needs 12 real"):
        real_size_setups([12], 10, "train", setups)
    with pytest.raises(ValueError):
        SetUp("empty", 0, 0, None)


def _scores(values: dict[str, float], absent=()) -> dict[str, dict]:
    return {vid: {"volume_id": vid, "nodule_present": vid not in absent, "sensitivity": v, "dice": v, "f2": v,
                  "accuracy": 0.99} for vid, v in values.items()}  # fmt: skip


def _trials():
    volumes = [f"v{k}" for k in range(6)]
    rng = np.random.default_rng(0)
    trials = []
    for seed in (0, 1):
        base = {v: 0.5 + 0.05 * k + 0.01 * seed for k, v in enumerate(volumes)}
        trials.append(TrialScores(BASELINE, seed, 6, 0, _scores(base)))
        better = {v: base[v] + 0.2 + 0.01 * rng.standard_normal() for v in volumes}
        trials.append(TrialScores("synthetic-50%", seed, 3, 3, _scores(better)))
        trials.append(TrialScores("synthetic-100%", seed, 0, 6, _scores(dict(base))))
    return trials


def test_comparisons_pair_each_setup_with_the_baseline_of_its_seed_and_pool_over_seeds():
    rows = comparisons(_trials())
    dice = {(r["setup"], r["seed"]): r for r in rows if r["metric"] == "dice"}
    assert set(dice) == {(s, k) for s in ("synthetic-50%", "synthetic-100%") for k in ("pooled", 0, 1)}
    better = dice[("synthetic-50%", "pooled")]
    assert better["mean_difference"] == pytest.approx(0.2, abs=0.02) and better["p_value"] < 1e-3
    assert better["n"] == 6 and better["ci_low"] < better["mean"] < better["ci_high"]
    same = dice[("synthetic-100%", 0)]
    assert same["mean_difference"] == 0 and same["p_value"] == 1.0 and same["wilcoxon_p"] == 1.0
    means = setup_means(_trials())
    assert list(means) == [BASELINE, "synthetic-50%", "synthetic-100%"]
    assert means[BASELINE]["dice"]["n"] == 6 and means[BASELINE]["seeds"] == 2  # volumes, each averaged over seeds
    assert means[BASELINE]["dice"]["mean"] == pytest.approx(np.mean([0.505 + 0.05 * k for k in range(6)]))
    assert means[BASELINE]["accuracy"]["mean"] == pytest.approx(0.99)
    with pytest.raises(CtsynthError, match="no real-only trial finished"):
        comparisons([t for t in _trials() if t.setup != BASELINE])


def test_report_holds_the_tables_and_embedded_figures(tmp_path):
    trials = _trials()
    trials[0].scores["v5"]["nodule_present"] = False  # a volume without a nodule counts only for accuracy
    trials[0].scores["v5"]["dice"] = math.nan
    written = write_report(trials, tmp_path / "report", "Sweep test", "a test")
    markdown = written["report"].read_text()
    for text in ("Mean of each metric per set-up", "pooled over seeds", "per seed", "synthetic-50%", "Wilcoxon p",
                 "![Mean and standard error per set-up](setups.png)", "fraction.png"):  # fmt: skip
        assert text in markdown, text
    for name in ("setups.png", "fraction.png", "volumes-synthetic-50_.png", "volumes-synthetic-100_.png"):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = written["html"].read_text()
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page and 'src="setups.png"' not in page
    lines = written["results"].read_text().splitlines()
    assert lines[0].startswith("setup,seed,metric,n,") and len(lines) == 1 + 2 * 3 * 3
    with pytest.raises(CtsynthError, match="no finished trial"):
        write_report([], tmp_path / "empty", "x", "nowhere")
