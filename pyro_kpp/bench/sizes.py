"""What is benchmarked: model configurations at the two size presets, batches, steps.

Presets (choice; every model shares the encoder and decoder classes of ``pyro_kpp.nets.conv``):

* ``paper``: K++ Appendix E's sizes with the ``cpu`` networks: a 3 x 64 x 64 memory, K = 2
  reads, a writer with 256 base channels and dense heads of 512 units; KM and DKM with their
  default slots (64 and 32);
* ``recipe``: ``--preset paper``, Appendix E's networks at those sizes (TSM-ResNet18 encoder,
  EvoNormS0 decoder, spectral-norm heads); timed with Adam, not LARS(Adam), like the others;
* ``cpu``: the package's ``Config`` defaults (the same memory and reads, a 64-channel writer,
  256-unit heads), i.e. what ``python -m pyro_kpp.svi`` trains.

All use T = 32 images per episode and B = 8 episodes per step (``Config`` defaults).
``--quick`` replaces them by tiny sizes that only exercise the code paths.

``shared_nets="linear"`` replaces the encoder and decoder that all models share by one linear
layer each (``LinearEncoder``, ``LinearDecoder``): what is left of a step is each model's own
memory machinery, heads and ELBO, i.e. the part where the models differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from torch import nn

from pyro_kpp.config import Config
from pyro_kpp.data import ImageData
from pyro_kpp.data.episodes import Episodes
from pyro_kpp.inference.bound import log_weights, make_elbo, training_loss
from pyro_kpp.models import MODELS, build_model
from pyro_kpp.models.base import EpisodicModel
from pyro_kpp.train import speed

MODEL_NAMES = tuple(MODELS)                         # kpp, km, dkm, vae
#: The speed options off (pyro_kpp.train.speed): what the benchmark's figures are relative to.
PLAIN = dict(precision="fp32", channels_last=False, compile=False)
PRESETS = {
    "paper": dict(writer_channels=256, hidden=512),
    "recipe": dict(preset="paper"),                 # sizes by config.PRESET_DEFAULTS["paper"]
    "cpu": {},
}
TINY = dict(memory_shape=(3, 16, 16), window=8, writer_channels=16, code_size=8, embed_size=32, hidden=32,
            episode_length=4, batch_size=2)
TINY_PRESETS = {"paper": dict(writer_channels=32, hidden=64),
                "recipe": dict(preset="paper", writer_channels=32, hidden=64), "cpu": {}}


@dataclass
class Sizes:
    """The sizes a run benchmarks: full (the defaults) or ``--quick`` (tiny)."""

    quick: bool

    def config(self, model: str, preset: str = "cpu", **overrides) -> Config:
        """``model``'s config at ``preset``: float32 in PyTorch's default layout unless ``overrides``
        say otherwise (the plain step every section's ratios are taken against; the ``speed``,
        ``options``, ``quality`` and ``gpu`` sections time the speed options on top of it)."""
        base = {**TINY, **TINY_PRESETS[preset]} if self.quick else dict(PRESETS[preset])
        return Config(model=model, data="omniglot", **{**PLAIN, **base, **overrides})

    @property
    def areas(self) -> list[int]:
        """K++ memory side H = W, at the preset's fixed window."""
        return [16, 32] if self.quick else [16, 32, 64, 128]

    @property
    def slots(self) -> list[int]:
        return [16, 32] if self.quick else [16, 32, 64, 128, 256, 512]

    @property
    def lengths(self) -> list[int]:
        return [4, 8] if self.quick else [8, 16, 32, 64, 128]

    @property
    def matmul_size(self) -> int:
        return 256 if self.quick else 2048


def batch(data: ImageData, cfg: Config, device: torch.device) -> torch.Tensor:
    """One real, binarized training batch (B, T, 1, 28, 28) for ``cfg``."""
    episodes = Episodes(data, cfg.episode_length, cfg.batch_size, seed=cfg.seed, device=device)
    return next(iter(episodes.train_epoch(0)))


class LinearEncoder(nn.Module):
    """Stand-in for the shared f_enc: one linear map of the flattened image, (N, C, H, W) -> (N, D)."""

    mixes_episode = False

    def __init__(self, image_shape: tuple[int, int, int], embed_size: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(image_shape), embed_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearDecoder(nn.Module):
    """Stand-in for the shared decoder: one linear map, (N, L) -> (N, C', H, W)."""

    def __init__(self, code_size: int, image_shape: tuple[int, int, int], out_channels: int):
        super().__init__()
        shape = (out_channels, *image_shape[1:])
        self.net = nn.Sequential(nn.Linear(code_size, math.prod(shape)), nn.Unflatten(1, shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


SHARED_NETS = ("conv", "linear")


def fresh_model(cfg: Config, data: ImageData, device: torch.device, shared_nets: str = "conv") -> EpisodicModel:
    """A new model for ``cfg``; with ``shared_nets="linear"``, its encoder and decoder replaced by
    ``LinearEncoder`` and ``LinearDecoder``."""
    if shared_nets not in SHARED_NETS:
        raise ValueError(f"shared_nets: expected one of {SHARED_NETS}, got {shared_nets!r}")
    cfg.image_shape = tuple(data.image_shape)
    pyro.set_rng_seed(cfg.seed)
    model = build_model(cfg)
    if shared_nets == "linear":
        out_channels = model.likelihood.out_channels(cfg.image_shape[0])
        model.encoder = LinearEncoder(cfg.image_shape, cfg.embed_size)
        model.decoder = LinearDecoder(cfg.code_size, cfg.image_shape, out_channels)
    return model.to(device).train()


@dataclass
class Bench:
    """A model with its batch, optimizer and the closures the sections time."""

    model: EpisodicModel
    x: torch.Tensor

    @classmethod
    def build(cls, cfg: Config, data: ImageData, device: torch.device, shared_nets: str = "conv") -> "Bench":
        return cls(fresh_model(cfg, data, device, shared_nets), batch(data, cfg, device))

    def __post_init__(self):
        # as pyro_kpp.svi does (pyro_kpp.train.speed); empty where compilation is unavailable
        cfg = self.model.cfg
        self.compiled = speed.prepare(self.model, cfg.precision, cfg.compile, self.x.device, cfg.channels_last)[0]
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.model.cfg.lr)
        self.elbo = make_elbo(self.model.cfg.elbo)

    @property
    def images(self) -> int:
        return self.x.shape[0] * self.x.shape[1]

    def pyro_loss(self) -> torch.Tensor:
        # as pyro_kpp.svi after a run's first step: no validation, the config's precision
        with pyro.validation_enabled(False), speed.autocast(self.model.cfg.precision, self.x.device):
            return training_loss(self.model, self.x, self.elbo)

    def step_with(self, loss_fn) -> None:
        """One training step as ``pyro_kpp.svi`` takes it: loss, backward, Adam update."""
        loss = loss_fn()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def train_step(self) -> None:
        self.step_with(self.pyro_loss)

    def forward_backward(self) -> None:
        """The loss and its gradient only (what FlopCounterMode counts)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.pyro_loss().backward()

    @torch.no_grad()
    def eval_step(self) -> None:
        """One evaluation batch: the ELBO's log weights, as ``pyro_kpp.inference.bound.evaluate`` computes them."""
        self.model.eval()
        log_weights(self.model, self.x, samples=1)
        self.model.train()
