"""CycleGAN and pix2pix training, in the reference's structure and step order, independent of Ray.

A :class:`GanTrainer` owns the networks, optimisers, image pools and the step counter. ``train_step`` runs the
model's ``optimize_parameters`` as the reference does: CycleGAN steps G (D frozen) then D on pooled fakes;
pix2pix steps D then G. Both discriminators learn through one ``backward_D_basic(D, real, fake)`` that detaches
the fake, so no discriminator step reaches a generator (with or without an image pool). ``state_dict`` /
``load_state_dict`` hold everything a resume needs (the learning rate is derived from the step). Data order
comes from :func:`epoch_batches`, a function of (seed, epoch, rank, world size), so a resumed run sees exactly
the batches it would have seen.

With several workers, gradients are averaged with ``torch.distributed.all_reduce`` after each backward
(data-parallel training: the same update as DDP) and batch-norm buffers follow rank 0's, as DDP's
``broadcast_buffers`` does. DDP wrappers are not used because each step freezes one network while the other
steps, which DDP's gradient hooks do not allow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ctsynth_ray.models.networks import NORMS, PatchDiscriminator, init_weights
from ctsynth_ray.models.registry import NetworkSpec, build_network

MODELS = ("cyclegan", "pix2pix")
GAN_MODES = ("lsgan", "vanilla")
#: The reference's per-model defaults (its ``modify_commandline_options``): what a field left as None becomes.
MODEL_DEFAULTS = {
    "cyclegan": {"gan_mode": "lsgan", "pool_size": 50, "norm": "instance"},
    "pix2pix": {"gan_mode": "vanilla", "pool_size": 0, "norm": "batch"},
}


@dataclass(frozen=True)
class GanConfig:
    """Training hyper-parameters (the thesis' by default) and the generator's shape.

    ``gan_mode``, ``pool_size`` and ``norm`` default to the reference's choice for ``model`` (see
    :data:`MODEL_DEFAULTS`): CycleGAN least squares, a 50-image pool, instance norm; pix2pix vanilla (BCE), no
    pool, batch norm. ``lambda_identity`` is a fraction of ``lambda_cycle``, as in the reference.
    """

    model: str = "cyclegan"
    epochs: int = 100
    decay_epochs: int = 100
    batch: int = 32
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    gan_mode: str | None = None
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.0
    lambda_l1: float = 100.0
    pool_size: int | None = None
    norm: str | None = None
    generator_widths: tuple[int, int, int] = (32, 64, 128)
    residual_blocks: int = 6
    unet_width: int = 64
    unet_downs: int = 7
    discriminator_width: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        for name, value in MODEL_DEFAULTS[self.model].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.gan_mode not in GAN_MODES:
            raise ValueError(f"gan_mode must be one of {GAN_MODES}, got {self.gan_mode!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.epochs < 0 or self.decay_epochs < 0 or self.epochs + self.decay_epochs < 1:
            raise ValueError(
                f"epochs and decay_epochs must be >= 0 with a positive sum, got {self.epochs}, {self.decay_epochs}"
            )
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {self.pool_size}")
        if self.lambda_identity < 0:
            raise ValueError(f"lambda_identity must be >= 0, got {self.lambda_identity}")

    def generator_spec(self, spatial_dims: int, in_channels: int, out_channels: int) -> NetworkSpec:
        """CycleGAN: ResNet generator; pix2pix: U-Net generator."""
        if self.model == "cyclegan":
            arguments = {"widths": list(self.generator_widths), "n_blocks": self.residual_blocks, "norm": self.norm}
            return NetworkSpec("resnet", spatial_dims, in_channels, out_channels, arguments)
        return NetworkSpec("unet", spatial_dims, in_channels, out_channels,
                           {"width": self.unet_width, "n_down": self.unet_downs, "norm": self.norm})  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)


class GANLoss(nn.Module):
    """Least-squares (MSE to 1 / 0) or vanilla (BCE with logits) GAN loss against a constant target."""

    def __init__(self, mode: str = "lsgan"):
        super().__init__()
        self.loss = nn.MSELoss() if mode == "lsgan" else nn.BCEWithLogitsLoss()

    def forward(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        target = torch.ones_like(prediction) if target_is_real else torch.zeros_like(prediction)
        return self.loss(prediction, target)


class ImagePool:
    """The reference's history of generated images (Shrivastava et al.): with probability 1/2 the
    discriminator sees an older fake instead of the newest. Its random choices come from its own seeded
    generator, saved in checkpoints."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = np.random.default_rng(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif self.rng.random() < 0.5:
                k = int(self.rng.integers(self.size))
                out.append(self.images[k].clone())
                self.images[k] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        return {"images": [i.cpu() for i in self.images], "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict, device) -> None:
        self.images = [i.to(device) for i in state["images"]]
        self.rng.bit_generator.state = state["rng"]


def epoch_batches(n_items: int, batch: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                  stream: int = 0) -> list[np.ndarray]:  # fmt: skip
    """This worker's batches of item indices for ``epoch``: a permutation by (seed, epoch, stream), split
    evenly across ``world`` workers, cut into full batches. Every worker gets the same number of batches."""
    order = np.random.default_rng((seed, epoch, stream)).permutation(n_items)
    per_worker = n_items // world
    mine = order[rank * per_worker : (rank + 1) * per_worker]
    return [mine[k : k + batch] for k in range(0, len(mine) - batch + 1, batch)]


def _set_requires_grad(nets, flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients(nets) -> None:
    """Average the gradients of ``nets`` over the workers of the process group (a no-op for one)."""
    if not _distributed():
        return
    world = dist.get_world_size()
    for net in nets:
        for p in net.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world


def broadcast_buffers(nets) -> None:
    """Give every worker rank 0's buffers (batch-norm running statistics), as DDP does before each forward."""
    if not _distributed():
        return
    for net in nets:
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)


class GanTrainer:
    """CycleGAN (``G_A``: label -> CT, ``G_B``: CT -> label, ``D_A`` on CT, ``D_B`` on labels) or pix2pix
    (``G_A``: label -> CT, conditional ``D_A`` on (label, CT)). Tensors are (N, C, *spatial), CT as HU / 2000."""

    def __init__(self, config: GanConfig, spatial_dims: int, label_channels: int, ct_channels: int = 1,
                 steps_per_epoch: int = 1, device: str | torch.device = "cpu"):  # fmt: skip
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
        if config.model == "cyclegan" and config.lambda_identity > 0 and label_channels != ct_channels:
            raise ValueError("the identity loss needs as many label channels as CT channels")
        self.config = config
        self.device = torch.device(device)
        self.steps_per_epoch = steps_per_epoch
        self.step = 0
        torch.manual_seed(config.seed)  # the same initial weights on every worker
        self.spec = config.generator_spec(spatial_dims, label_channels, ct_channels)

        def discriminator(in_channels: int) -> nn.Module:
            return init_weights(PatchDiscriminator(spatial_dims, in_channels, config.discriminator_width,
                                                   norm=config.norm))  # fmt: skip

        self.G_A = init_weights(build_network(self.spec)).to(self.device)
        if config.model == "cyclegan":
            self.G_B = init_weights(build_network(config.generator_spec(spatial_dims, ct_channels, label_channels)))
            self.D_A, self.D_B = discriminator(ct_channels), discriminator(label_channels)
            self.G_B, self.D_A, self.D_B = (m.to(self.device) for m in (self.G_B, self.D_A, self.D_B))
            self.generators, self.discriminators = [self.G_A, self.G_B], [self.D_A, self.D_B]
        else:
            self.D_A = discriminator(label_channels + ct_channels).to(self.device)
            self.generators, self.discriminators = [self.G_A], [self.D_A]
        betas = (config.beta1, config.beta2)
        self.optimizer_G = torch.optim.Adam(
            [p for g in self.generators for p in g.parameters()], config.lr, betas=betas
        )
        self.optimizer_D = torch.optim.Adam(
            [p for d in self.discriminators for p in d.parameters()], config.lr, betas=betas
        )
        self.pool_fake_ct = ImagePool(config.pool_size, config.seed * 2 + 1)
        self.pool_fake_label = ImagePool(config.pool_size, config.seed * 2 + 2)
        self.criterion_gan = GANLoss(config.gan_mode).to(self.device)
        self.autocast = self.device.type == "cuda"  # bf16 on GPUs; fp32 on CPUs, where it is exact
        # channels-last helps 2D convolutions on GPUs (tensor cores); on this CPU it was slower.
        self.memory_format = torch.channels_last if self.autocast and spatial_dims == 2 else torch.contiguous_format
        for net in self.generators + self.discriminators:
            net.to(memory_format=self.memory_format)

    def learning_rate(self, step: int | None = None) -> float:
        """Constant for ``epochs`` epochs, then linear decay to 0 over ``decay_epochs`` (per epoch, as the reference)."""
        epoch = (self.step if step is None else step) // self.steps_per_epoch
        c = self.config
        return c.lr * (1.0 - max(0, epoch + 1 - c.epochs) / float(c.decay_epochs + 1))

    def total_steps(self) -> int:
        return (self.config.epochs + self.config.decay_epochs) * self.steps_per_epoch

    def _gan(self, net: nn.Module, x: torch.Tensor, real: bool) -> torch.Tensor:
        return self.criterion_gan(net(x).float(), real)

    def train_step(self, label: torch.Tensor, ct: torch.Tensor, ct_unpaired: torch.Tensor | None = None) -> dict:
        """One optimisation step of the model. CycleGAN uses ``ct_unpaired`` (CT of other slices: the thesis
        trained unpaired) when given; pix2pix uses the pair. Returns the losses and the learning rate."""
        lr = self.learning_rate()
        for optimizer in (self.optimizer_G, self.optimizer_D):
            for group in optimizer.param_groups:
                group["lr"] = lr
        broadcast_buffers(self.generators + self.discriminators)
        real_A = label.to(self.device, memory_format=self.memory_format)
        real_B = ct if ct_unpaired is None or self.config.model == "pix2pix" else ct_unpaired
        real_B = real_B.to(self.device, memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.config.model == "cyclegan":
                losses = self._optimize_cyclegan(real_A, real_B)
            else:
                losses = self._optimize_pix2pix(real_A, real_B)
        self.step += 1
        return {name: value.item() for name, value in losses.items()} | {"lr": lr}

    def backward_D_basic(self, D: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """D's loss on a real and a fake batch, back-propagated; the fake is detached so that no gradient
        reaches the generator that made it."""
        loss_real = self._gan(D, real, True)
        loss_fake = self._gan(D, fake.detach(), False)
        loss = (loss_real + loss_fake) * 0.5
        loss.backward()
        return loss

    def _step(self, optimizer: torch.optim.Optimizer, nets) -> None:
        average_gradients(nets)
        optimizer.step()

    # ----------------------------------------------------------------------------------------- CycleGAN

    def _optimize_cyclegan(self, real_A, real_B) -> dict:
        fake_B = self.G_A(real_A)  # label -> CT
        rec_A = self.G_B(fake_B)  # G_B(G_A(A))
        fake_A = self.G_B(real_B)  # CT -> label
        rec_B = self.G_A(fake_A)  # G_A(G_B(B))
        # G_A and G_B, with the discriminators frozen.
        _set_requires_grad(self.discriminators, False)
        self.optimizer_G.zero_grad(set_to_none=True)
        losses = self._backward_G_cyclegan(real_A, real_B, fake_A, fake_B, rec_A, rec_B)
        self._step(self.optimizer_G, self.generators)
        # D_A and D_B, on fakes from the image pools.
        _set_requires_grad(self.discriminators, True)
        self.optimizer_D.zero_grad(set_to_none=True)
        losses["loss_D_A"] = self.backward_D_basic(self.D_A, real_B, self.pool_fake_ct.query(fake_B.float()))
        losses["loss_D_B"] = self.backward_D_basic(self.D_B, real_A, self.pool_fake_label.query(fake_A.float()))
        self._step(self.optimizer_D, self.discriminators)
        return losses

    def _backward_G_cyclegan(self, real_A, real_B, fake_A, fake_B, rec_A, rec_B) -> dict:
        c = self.config
        zero = torch.zeros((), device=self.device)
        loss_idt_A = loss_idt_B = zero
        if c.lambda_identity > 0:
            loss_idt_A = (
                (self.G_A(real_B).float() - real_B).abs().mean() * c.lambda_cycle * c.lambda_identity
            )  # || G_A(B) - B ||
            loss_idt_B = (
                (self.G_B(real_A).float() - real_A).abs().mean() * c.lambda_cycle * c.lambda_identity
            )  # || G_B(A) - A ||
        loss_G_A = self._gan(self.D_A, fake_B, True)  # GAN loss D_A(G_A(A))
        loss_G_B = self._gan(self.D_B, fake_A, True)  # GAN loss D_B(G_B(B))
        loss_cycle_A = (rec_A.float() - real_A).abs().mean() * c.lambda_cycle  # forward cycle || G_B(G_A(A)) - A ||
        loss_cycle_B = (rec_B.float() - real_B).abs().mean() * c.lambda_cycle  # backward cycle || G_A(G_B(B)) - B ||
        loss_G = loss_G_A + loss_G_B + loss_cycle_A + loss_cycle_B + loss_idt_A + loss_idt_B
        loss_G.backward()
        return {"loss_G": loss_G, "loss_G_A": loss_G_A, "loss_G_B": loss_G_B, "loss_cycle_A": loss_cycle_A,
                "loss_cycle_B": loss_cycle_B, "loss_idt": loss_idt_A + loss_idt_B}  # fmt: skip

    # ------------------------------------------------------------------------------------------ pix2pix

    def _optimize_pix2pix(self, real_A, real_B) -> dict:
        fake_B = self.G_A(real_A)  # G(A)
        # D first, as the reference's pix2pix: on (A, B) against (A, G(A)) from the pool.
        _set_requires_grad(self.discriminators, True)
        self.optimizer_D.zero_grad(set_to_none=True)
        fake_AB = self.pool_fake_ct.query(torch.cat([real_A, fake_B.float()], 1))
        loss_D = self.backward_D_basic(self.D_A, torch.cat([real_A, real_B], 1), fake_AB)
        self._step(self.optimizer_D, self.discriminators)
        # Then G, with D frozen.
        _set_requires_grad(self.discriminators, False)
        self.optimizer_G.zero_grad(set_to_none=True)
        losses = self._backward_G_pix2pix(real_A, real_B, fake_B)
        self._step(self.optimizer_G, self.generators)
        return {**losses, "loss_D": loss_D}

    def _backward_G_pix2pix(self, real_A, real_B, fake_B) -> dict:
        loss_G_gan = self._gan(self.D_A, torch.cat([real_A, fake_B], 1), True)  # GAN loss D(A, G(A))
        loss_G_l1 = (fake_B.float() - real_B).abs().mean() * self.config.lambda_l1  # || G(A) - B ||_1
        loss_G = loss_G_gan + loss_G_l1
        loss_G.backward()
        return {"loss_G": loss_G, "loss_G_gan": loss_G_gan, "loss_G_l1": loss_G_l1}

    @torch.no_grad()
    def generate(self, label: torch.Tensor) -> torch.Tensor:
        """G_A in eval mode (dropout off): label input -> CT (HU / 2000), on CPU."""
        self.G_A.eval()
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                return self.G_A(label.to(self.device)).float().cpu()
        finally:
            self.G_A.train()

    def state_dict(self) -> dict:
        nets = {name: getattr(self, name).state_dict() for name in ("G_A", "G_B", "D_A", "D_B") if hasattr(self, name)}
        return {
            "step": self.step,
            "nets": nets,
            "optimizer_G": self.optimizer_G.state_dict(),
            "optimizer_D": self.optimizer_D.state_dict(),
            "pools": [self.pool_fake_ct.state_dict(), self.pool_fake_label.state_dict()],
            "torch_rng": torch.get_rng_state(),
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        for name, weights in state["nets"].items():
            getattr(self, name).load_state_dict(weights)
        self.optimizer_G.load_state_dict(state["optimizer_G"])
        self.optimizer_D.load_state_dict(state["optimizer_D"])
        self.pool_fake_ct.load_state_dict(state["pools"][0], self.device)
        self.pool_fake_label.load_state_dict(state["pools"][1], self.device)
        torch.set_rng_state(state["torch_rng"])
