"""The one registry of networks, and their self-describing export: ``<stem>.pt`` + ``<stem>.json``.

A trained network is two files in its run folder: ``<stem>.pt``, a plain state dict (loaded with
``torch.load(..., weights_only=True)``), and ``<stem>.json``, the architecture and its arguments under
``"network"`` plus what a user of the network must know (dims, label scheme and encoding, HU normalisation,
spacing, training data). Generators are ``generator.pt`` / ``generator.json`` (:func:`load_generator`),
segmenters ``model.pt`` / ``model.json`` (:func:`load_segmenter`); nothing else loads a network.
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
from ctsynth_ray.segmentation import UNet

#: Architecture name -> class. Generators map label maps to CT; ``segmenter`` maps CT to nodule logits.
NETWORKS: dict[str, type[nn.Module]] = {"resnet": ResnetGenerator, "unet": UnetGenerator, "segmenter": UNet}
GENERATORS = ("resnet", "unet")
SEGMENTERS = ("segmenter",)
GENERATOR_STEM = "generator"
SEGMENTER_STEM = "model"


@dataclass(frozen=True)
class NetworkSpec:
    """Which network and its constructor arguments (besides the three below)."""

    architecture: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    arguments: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.architecture not in NETWORKS:
            raise ValueError(f"architecture must be one of {sorted(NETWORKS)}, got {self.architecture!r}")


def build_network(spec: NetworkSpec) -> nn.Module:
    cls = NETWORKS[spec.architecture]
    return cls(spec.spatial_dims, spec.in_channels, spec.out_channels, **spec.arguments)


def export_network(run_dir: str | os.PathLike, stem: str, network: nn.Module, spec: NetworkSpec, info: dict) -> Path:
    """Write ``run_dir/<stem>.pt`` and ``run_dir/<stem>.json`` (each atomically: temp name, then rename; the
    JSON last, so a description never points at missing weights); returns the JSON path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    tag = uuid.uuid4().hex[:8]
    weights_tmp, spec_tmp = run_dir / f".{tag}.{stem}.pt", run_dir / f".{tag}.{stem}.json"
    try:
        torch.save(state, weights_tmp)
        spec_tmp.write_text(json.dumps({"network": asdict(spec), **info}, indent=2, default=str))
        os.replace(weights_tmp, run_dir / f"{stem}.pt")
        os.replace(spec_tmp, run_dir / f"{stem}.json")
    finally:
        weights_tmp.unlink(missing_ok=True)
        spec_tmp.unlink(missing_ok=True)
    return run_dir / f"{stem}.json"


def load_network(run_dir: str | os.PathLike, stem: str, architectures, what: str,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:  # fmt: skip
    """The network exported as ``<stem>`` in ``run_dir``, in eval mode, and its description. CtsynthError naming
    the file when it is missing, not a description, not one of ``architectures``, or its weights do not fit."""
    run_dir = Path(run_dir)
    spec_path, weights_path = run_dir / f"{stem}.json", run_dir / f"{stem}.pt"
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise CtsynthError(f"{path}: not found (is {run_dir} a finished {what} run?)")
    try:
        info = json.loads(spec_path.read_text())
        spec = NetworkSpec(**info["network"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CtsynthError(f"{spec_path}: not a network description ({exc})") from None
    if spec.architecture not in architectures:
        raise CtsynthError(f"{spec_path}: describes a {spec.architecture} network, not a {what} model")
    network = build_network(spec)
    state = torch.load(weights_path, map_location=device, weights_only=True)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise CtsynthError(f"{weights_path}: weights do not fit {spec.architecture} as described ({exc})") from None
    return network.to(device).eval(), info


def load_generator(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The exported generator of a ``train-gan`` run as a ready ``nn.Module`` (eval mode: dropout off, batch
    norm with its running statistics) and its description."""
    return load_network(run_dir, GENERATOR_STEM, GENERATORS, "train-gan", device)


def load_segmenter(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The U-Net of a ``train-seg`` run as a ready ``nn.Module`` (eval mode) and its description (``patch``,
    ``spacing_mm``, HU normalisation, the training sets)."""
    return load_network(run_dir, SEGMENTER_STEM, SEGMENTERS, "train-seg", device)
