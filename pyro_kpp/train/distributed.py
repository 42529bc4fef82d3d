"""Data-parallel training with ``torchrun``: one process (rank) per device, gradients averaged.

``torchrun --nproc_per_node W -m pyro_kpp.svi ...`` starts W copies of the training CLI with
the environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init` reads them and joins the process group (NCCL when the rank has
a GPU, gloo on the CPU). Without them (a plain ``python -m pyro_kpp.svi``) it returns the
single-process :class:`World`, whose collectives are no-ops, so the training loop has one code path.

Choices (the papers train on one device and say nothing about this):

* ``--batch-size B`` is the GLOBAL number of episodes per step. Every rank draws the same
  global batch (same seed, same order, same binarization) and trains on its slice of B/W
  episodes, so the data of a W-rank run are exactly those of a single process.
* Gradients are averaged by ``torch.nn.parallel.DistributedDataParallel`` (:meth:`World.
  data_parallel`), wrapping ``pyro_kpp.inference.bound.TrainingLoss``, a small module whose ``forward``
  returns the training loss (Pyro's ELBO calls the model's ``model``/``guide`` inside it, so
  DDP's hooks see every parameter's gradient): bucketed all-reduces overlapped with
  ``backward``, rank 0's weights broadcast at the start and its buffers at every step. With
  ``find_unused_parameters=True`` a parameter that gets no gradient on some rank counts as a
  zero gradient there, so ranks that differ in which gradients are None never hang. Each
  rank's loss is the mean over its images and the slices are equal, so the mean of the W
  gradients is the gradient of the global per-image mean: the single-process gradient up to
  float summation order. The loss itself is averaged by one more small all-reduce
  (:meth:`World.mean`), so every rank makes the same decisions (clipping, skipping
  non-finite steps).
* Sampling noise: Pyro draws the reparameterisation noise from torch's global RNG, whose
  stream cannot be split into per-episode slices. Each rank therefore draws from its own
  stream, seeded by (seed, rank) after the model is built: the noise of a W-rank run is a
  different, equally valid Monte Carlo draw from that of a single process, so the two loss
  trajectories agree up to Monte Carlo noise, not bit for bit. (Identical seeds on every
  rank would instead correlate the noise of different episodes.)
* Decisions to stop (SIGINT/SIGTERM, which may reach the ranks at different steps, and the
  ``--max-minutes`` budget, timed by each rank) are shared with :meth:`World.any`, so no rank
  is left waiting in an all-reduce the others never join.
* Only rank 0 evaluates (the same test bound as a single process with the same weights),
  writes images, metrics and checkpoints; the other ranks wait in the checkpoint's gather,
  which also checks that all ranks hold the same weights. The checkpoint holds every rank's
  RNG state, so a resumed run with the same world size continues exactly (bit for bit on the
  CPU). Resumed with another world size (allowed: the global batch, hence the data, does not
  change), the ranks start fresh streams seeded by (seed, rank, step).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import numpy as np
import pyro
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pyro_kpp.train.checkpoint import rng_state, set_rng_state
from pyro_kpp.train.device import resolve_device


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``rank`` of ``size``, training on ``device``."""

    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes files and prints progress."""
        return self.rank == 0

    def episodes(self, batch_size: int) -> slice:
        """This rank's episodes of a global batch: r*B/W .. (r+1)*B/W."""
        if batch_size % self.size:
            raise ValueError(f"batch_size: --batch-size is the global number of episodes per step, split "
                             f"evenly over the {self.size} ranks; expected a multiple of {self.size}, "
                             f"got {batch_size}")
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def data_parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` itself in one process; with several ranks, wrapped in DistributedDataParallel
        (which broadcasts rank 0's weights and buffers now, and averages gradients in ``backward``)."""
        if self.size == 1:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a 0-dim tensor over the ranks (e.g. the loss), detached; a 0-dim tensor, so
        that the caller decides when to wait for its value."""
        if self.size == 1:
            return value.detach()
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.size

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank: a decision all ranks share
        (e.g. stopping, which must not leave one rank waiting in an all-reduce)."""
        if self.size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def seed_sampling(self, seed: int) -> None:
        """With several ranks, give this rank its own sampling stream, seeded by (seed, rank).
        A single process keeps the stream ``pyro.set_rng_seed(seed)`` started."""
        if self.size > 1:
            self._seed(seed)

    def _seed(self, seed: int, *keys: int) -> None:
        """Seed torch, numpy and python from (seed, rank, *keys)."""
        pyro.set_rng_seed(int(np.random.SeedSequence([seed, self.rank, *keys]).generate_state(1)[0]))

    def checkpoint_rng(self, model: torch.nn.Module) -> dict:
        """For the checkpoint: this process's RNG state, or with several ranks every rank's.

        On the way it checks that every rank holds the same weights and buffers (weights updated with
        the same averaged gradients, they agree bit for bit): rank 0's checkpoint then stands
        for all of them, and a silent divergence becomes an error.
        """
        state = rng_state()
        if self.size == 1:
            return state
        # Running statistics (batch norm in the paper preset's encoder) follow each rank's own
        # slice of the batch; like DDP's broadcast_buffers, rank 0's stand for all ranks.
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        sums = [float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point()]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, (state, sums))
        differ = [r for r, (_, other) in enumerate(gathered) if other != gathered[0][1]]
        if differ:
            raise RuntimeError(f"distributed: the weights or buffers of ranks {differ} differ from rank 0's; "
                               f"the ranks are out of sync, so no checkpoint is written")
        return {"ranks": [rng for rng, _ in gathered]}

    def restore_rng(self, saved: dict, seed: int, step: int) -> None:
        """Restore this rank's RNG state from a checkpoint written by ``checkpoint_rng``."""
        ranks = saved.get("ranks")
        if ranks is None and self.size == 1:
            set_rng_state(saved)
        elif ranks is not None and len(ranks) == self.size:
            set_rng_state(ranks[self.rank])
        else:  # the world size changed: fresh per-rank streams, distinct from those of step 0
            self._seed(seed, step)


def is_main_rank() -> bool:
    """Whether this process is rank 0 (or not under torchrun), known before :func:`init` joins the
    process group: it alone claims the run directory."""
    return int(os.environ.get("WORLD_SIZE", "1")) == 1 or int(os.environ["RANK"]) == 0


def init(device: str) -> World:
    """Join torchrun's process group, or return the single-process world when not under torchrun.

    ``device`` is the ``--device`` option: under torchrun ``auto``/``cuda`` mean
    ``cuda:LOCAL_RANK`` (one GPU per rank, backend NCCL) and ``cpu`` means gloo.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(rank=0, size=1, device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if resolved.index is not None:
            raise ValueError(f"device: under torchrun rank r uses cuda:LOCAL_RANK; pass --device cuda or auto, "
                             f"got {device!r}")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return World(rank=rank, size=size, device=resolved)
