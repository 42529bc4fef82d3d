"""How much memory a training step needs, estimated before anything is allocated.

A size that cannot fit (``--batch-size 10000000``, ``--reads 10000``, ``--code-size 1000000``,
``--slots 1000000``) would otherwise end, minutes later, in an allocator traceback, or in
the machine swapping. ``check_training_fits`` refuses it up front, with the number.

The estimate is one *dry run* on PyTorch's ``meta`` device, the same for every model: the model
is built there (parameters have shapes, no storage) and its guide and model are traced on an
empty episode batch, every operation's output counted (``_Outputs``). Nothing is computed or
allocated, so the cost does not depend on the sizes' values: on our loaded 2-core CPU the first
meta operation of a process loads PyTorch's meta kernels (3-4 s, once), then a dry run takes
0.1-0.6 s at the tiny test sizes and 1-4 s at paper sizes (DKM's write loops over T images x
``--dkm-write-iterations`` here too). The training step's footprint is then

    4 x parameter bytes (weights, gradients, Adam's two moments)
    + the bytes of every tensor the forward pass creates (what autograd may keep for backward).

The second term overcounts (temporaries freed during the pass are counted too), so the estimate
is an upper bound rather than a prediction; it is compared with the device's *total* memory, so
only a step that cannot fit whatever else runs is refused. The forward pass is linear in the
batch size B (every episode is read and written on its own), so it is traced at B = 1 and B = 2
and extrapolated, and the dry run's cost does not grow with B (at B = 8 the extrapolation equals
a dry run of the whole batch for K++ and the VAE and exceeds it by under 1% for KM and DKM, tested).
"""
from __future__ import annotations

import dataclasses
import math
import os

import pyro
import torch
from pyro import poutine
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_kpp.config import Config
from pyro_kpp.inference.handlers import reuse_embedding
from pyro_kpp.models import build_model

#: Size options named in the refusal when they exceed their defaults (the ones that scale memory).
SIZE_FIELDS = ("batch_size", "episode_length", "reads", "memory_shape", "window", "writer_channels", "slots",
               "address_size", "code_size", "embed_size", "hidden", "dkm_write_iterations")
#: Weights, gradients and Adam's two moments (LARS keeps no further state).
PARAMETER_COPIES = 4


class _Outputs(TorchDispatchMode):
    """Sums the bytes of every tensor an operation returns inside the context."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def _forward_bytes(model, cfg: Config, batch: int) -> int:
    """Bytes created by one guide + model trace of ``batch`` empty episodes on the meta device."""
    x = torch.empty(batch, cfg.episode_length, *cfg.image_shape, device="meta")   # (B, T, C, H, W)
    outputs = _Outputs()
    with pyro.validation_enabled(False), outputs, reuse_embedding():
        guide = poutine.trace(model.guide).get_trace(x)
        poutine.trace(poutine.replay(model.model, trace=guide)).get_trace(x).log_prob_sum()
        guide.log_prob_sum()
    return outputs.bytes


def training_bytes(cfg: Config) -> int:
    """Estimated bytes of one training step of ``cfg`` (``cfg.image_shape`` set), see the module docstring."""
    with torch.device("meta"):
        model = build_model(cfg)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    one, two = (_forward_bytes(model, cfg, b) for b in (1, 2))
    return PARAMETER_COPIES * params + one + (cfg.batch_size - 1) * max(two - one, 0)


def device_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (physical RAM for the CPU); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _grown_sizes(cfg: Config) -> str:
    """The size options above their defaults, by how many times, the most grown first."""
    defaults = Config(model=cfg.model, preset=cfg.preset, data=cfg.data)
    size = lambda v: math.prod(v) if isinstance(v, tuple) else v     # noqa: E731  (memory_shape: its cells)
    grown = sorted(((size(getattr(cfg, n)) / size(getattr(defaults, n)), n) for n in SIZE_FIELDS
                    if size(getattr(cfg, n)) > size(getattr(defaults, n))), reverse=True)
    return ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)} ({ratio:,.{0 if ratio >= 10 else 1}f}x its default)"
                     for ratio, n in grown)


def check_training_fits(cfg: Config, device: torch.device, world_size: int = 1) -> None:
    """Refuse, before anything is allocated, a config whose training step cannot fit in the
    device's total memory (per process: each of ``world_size`` ranks trains B / world_size episodes)."""
    total = device_bytes(device)
    if total is None:
        return
    per_rank = dataclasses.replace(cfg, batch_size=max(1, -(-cfg.batch_size // world_size)))
    need = training_bytes(per_rank)
    if need > total:
        raise ValueError(f"memory: a training step of this config needs about {need / 2**30:,.1f} GiB (weights, "
                         f"gradients, Adam moments and one batch's activations), more than the "
                         f"{total / 2**30:,.1f} GiB of {device}"
                         + (f"; sizes above their defaults: {grown}" if (grown := _grown_sizes(cfg)) else ""))
