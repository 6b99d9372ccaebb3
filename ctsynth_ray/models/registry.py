"""The one registry of generators, and the self-describing export: ``generator.pt`` + ``generator.json``.

``generator.pt`` is a plain state dict (loaded with ``torch.load(..., weights_only=True)``);
``generator.json`` holds the architecture and its arguments plus what a user of the generator must know
(dims, label scheme and encoding, HU normalisation, spacing, training data fingerprint).
Generation and evaluation load generators only through :func:`load_generator`.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.models.networks import ResnetGenerator, UnetGenerator

GENERATORS: dict[str, type[nn.Module]] = {"resnet": ResnetGenerator, "unet": UnetGenerator}
WEIGHTS_NAME = "generator.pt"
SPEC_NAME = "generator.json"


@dataclass(frozen=True)
class GeneratorSpec:
    """Which generator and its constructor arguments (besides the three below)."""

    architecture: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    arguments: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.architecture not in GENERATORS:
            raise ValueError(f"architecture must be one of {sorted(GENERATORS)}, got {self.architecture!r}")


def build_generator(spec: GeneratorSpec) -> nn.Module:
    cls = GENERATORS[spec.architecture]
    return cls(spec.spatial_dims, spec.in_channels, spec.out_channels, **spec.arguments)


def export_generator(run_dir: str | os.PathLike, generator: nn.Module, spec: GeneratorSpec, info: dict) -> Path:
    """Write ``run_dir/generator.pt`` and ``run_dir/generator.json`` (each atomically); returns the JSON path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in generator.state_dict().items()}
    tag = uuid.uuid4().hex[:8]
    weights_tmp, spec_tmp = run_dir / f".{tag}.{WEIGHTS_NAME}", run_dir / f".{tag}.{SPEC_NAME}"
    try:
        torch.save(state, weights_tmp)
        spec_tmp.write_text(json.dumps({"generator": asdict(spec), **info}, indent=2, default=str))
        os.replace(weights_tmp, run_dir / WEIGHTS_NAME)
        os.replace(spec_tmp, run_dir / SPEC_NAME)
    finally:
        weights_tmp.unlink(missing_ok=True)
        spec_tmp.unlink(missing_ok=True)
    return run_dir / SPEC_NAME


def load_generator(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The exported generator of ``run_dir`` as a ready ``nn.Module`` (eval mode) and its description."""
    run_dir = Path(run_dir)
    spec_path, weights_path = run_dir / SPEC_NAME, run_dir / WEIGHTS_NAME
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise CtsynthError(f"{path}: not found (is {run_dir} a finished train-gan run?)")
    try:
        info = json.loads(spec_path.read_text())
        spec = GeneratorSpec(**info["generator"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CtsynthError(f"{spec_path}: not a generator description ({exc})") from None
    generator = build_generator(spec)
    state = torch.load(weights_path, map_location=device, weights_only=True)
    try:
        generator.load_state_dict(state)
    except RuntimeError as exc:
        raise CtsynthError(f"{weights_path}: weights do not fit {spec.architecture} as described ({exc})") from None
    return generator.to(device).eval(), info
