"""Set-ups of a synthetic/real sweep: which real and synthetic volumes each trial of ``ctsynth sweep`` trains on.

Two presets, both nested (one draw order per dataset and seed, set-ups take prefixes of it; see
:func:`ctsynth_ray.segmentation.select_volumes`), so within a seed set-ups differ only in what they add:

- ``thesis``: the thesis' four set-ups scaled to the data available. With R real training volumes (the thesis:
  344; by default as many as both sets hold) and S synthetic ones: ``real-only`` (R real), ``synthetic-same`` (R synthetic), ``synthetic-4x`` (about
  4 R synthetic; the thesis: 1400 = 4.07 x 344), ``mixed`` (R / 6 real from a split the GAN never trained on,
  plus ten times as many synthetic; the thesis: 59 + 590).
- ``ratio``: the total T fixed, the synthetic fraction f varied: ``synthetic-<100 f>%`` trains on
  round(f T) synthetic and the rest real; f = 0 is the ``real-only`` baseline (always included).

``real_sizes`` adds real-only set-ups of other sizes (``real-<n>``): the real learning curve that says how much
real data a synthetic set-up is worth. Every set-up is compared with ``real-only`` of the same seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ctsynth_ray.errors import CtsynthError

BASELINE = "real-only"
PRESETS = ("thesis", "ratio")
DEFAULT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
#: The thesis' sizes: real-344, synthetic-344, synthetic-1400, real-59 + synthetic-590.
THESIS_REAL, THESIS_SYNTH_LARGE, THESIS_MIXED_REAL, THESIS_MIXED_SYNTH = 344, 1400, 59, 590


@dataclass(frozen=True)
class SetUp:
    """One set-up: ``real_n`` volumes of the real spec (``real_split``), ``synthetic_n`` synthetic ones."""

    name: str
    real_n: int
    synthetic_n: int
    real_split: str | None

    def __post_init__(self):
        if self.real_n < 0 or self.synthetic_n < 0 or self.real_n + self.synthetic_n == 0:
            raise ValueError(f"set-up {self.name}: needs at least one training volume")

    @property
    def fraction(self) -> float:
        """The synthetic share of the training set."""
        return self.synthetic_n / (self.real_n + self.synthetic_n)

    def train_specs(self, real: str, synthetic: str) -> tuple[str, ...]:
        """``train-seg``'s ``--train`` specs for the real dataset ``real`` and the synthetic one ``synthetic``."""
        specs = []
        if self.real_n:
            specs.append(f"{real}{':' + self.real_split if self.real_split else ''}:n={self.real_n}")
        if self.synthetic_n:
            specs.append(f"{synthetic}:n={self.synthetic_n}")
        return tuple(specs)

    def as_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction}


def _check_sizes(name: str, need: int, have: int, what: str) -> None:
    if need > have:
        raise CtsynthError(
            f"set-up {name} needs {need} {what} volume(s), but there are {have} (pass a smaller --total)"
        )


def thesis_setups(real_available: int, unseen_available: int, synthetic_available: int, total: int | None = None,
                  real_split: str = "train", unseen_split: str | None = "test") -> list[SetUp]:  # fmt: skip
    """The thesis' four set-ups for ``total`` real training volumes (default: as many as both the real and the
    synthetic set hold), capped by what exists: the large synthetic set at most ``synthetic_available``, the mixed
    set's real part at most the ``unseen_available`` volumes of ``unseen_split`` (None: no such split; the mixed
    set-up is left out)."""
    if not real_available or not synthetic_available:
        raise CtsynthError(f"the thesis preset needs real ({real_split or 'any split'}) and synthetic volumes; there are "
                           f"{real_available} and {synthetic_available}")  # fmt: skip
    real_n = min(real_available, synthetic_available) if total is None else total
    _check_sizes(BASELINE, real_n, real_available, f"real ({real_split})")
    _check_sizes("synthetic-same", real_n, synthetic_available, "synthetic")
    setups = [SetUp(BASELINE, real_n, 0, real_split), SetUp("synthetic-same", 0, real_n, None)]
    large = min(round(real_n * THESIS_SYNTH_LARGE / THESIS_REAL), synthetic_available)
    if large > real_n:
        setups.append(SetUp("synthetic-4x", 0, large, None))
    if unseen_split is not None and unseen_available:
        mixed_real = min(max(1, round(real_n * THESIS_MIXED_REAL / THESIS_REAL)), unseen_available)
        mixed_synthetic = min(mixed_real * THESIS_MIXED_SYNTH // THESIS_MIXED_REAL, synthetic_available)
        setups.append(SetUp("mixed", mixed_real, mixed_synthetic, unseen_split))
    return setups


def ratio_setups(total: int, fractions, real_available: int, synthetic_available: int,
                 real_split: str | None = "train") -> list[SetUp]:  # fmt: skip
    """One set-up per synthetic fraction at a fixed ``total``; fraction 0 (the baseline) is always included."""
    if not real_available and not synthetic_available:
        raise CtsynthError("the ratio preset found no real and no synthetic volume")
    if total < 1:
        raise CtsynthError(f"--total must be at least 1, got {total}")
    bad = [f for f in fractions if not 0 <= f <= 1]
    if bad:
        raise CtsynthError(f"--fractions must lie in [0, 1], got {', '.join(map(str, bad))}")
    setups, seen = [], set()
    for fraction in sorted({0.0, *map(float, fractions)}):
        synthetic_n = round(fraction * total)
        if synthetic_n in seen:
            continue  # two fractions that round to the same set-up at this total
        seen.add(synthetic_n)
        name = BASELINE if synthetic_n == 0 else f"synthetic-{100 * synthetic_n / total:g}%"
        setup = SetUp(name, total - synthetic_n, synthetic_n, real_split if total - synthetic_n else None)
        _check_sizes(name, setup.real_n, real_available, f"real ({real_split or 'any split'})")
        _check_sizes(name, setup.synthetic_n, synthetic_available, "synthetic")
        setups.append(setup)
    return setups


def real_size_setups(sizes, real_available: int, real_split: str | None, existing: list[SetUp]) -> list[SetUp]:
    """Real-only set-ups ``real-<n>`` for ``sizes`` not already among ``existing``' real-only sizes."""
    have = {s.real_n for s in existing if s.synthetic_n == 0}
    setups = []
    for n in sorted(set(sizes)):
        if n < 1:
            raise CtsynthError(f"--real-sizes must be at least 1, got {n}")
        _check_sizes(f"real-{n}", n, real_available, f"real ({real_split or 'any split'})")
        if n not in have:
            setups.append(SetUp(f"real-{n}", n, 0, real_split))
    return setups
