"""Training CLI: ``python -m pyro_kpp.svi --data omniglot [--model kpp] ...``.

One explicit loop (nanoGPT style). The loss is Pyro's ``Trace_ELBO`` (or
``TraceMeanField_ELBO``) used as a differentiable loss with a plain torch optimizer over the
model's parameters (``pyro_kpp.optim.build_optimizer``: a foreach Adam, or LARS(Adam) with a
one-cycle schedule for ``--preset paper``): one optimizer for the whole model and global
gradient-norm clipping, which Pyro's per-tensor ``PyroOptim``/``ClippedAdam`` do not give.
A KL warm-up (``--kl-warmup``) weights the KL terms of the training loss only.

Each epoch: train on every training image once (random episodes; binarized data get a fresh
binarization, 8-bit data for ``--likelihood dmol`` are used as they are), evaluate the negative
conditional bound on the fixed test episodes (in nats/image, and in bits/dim for 8-bit data),
write image grids, append a line to ``metrics.jsonl`` and save ``checkpoint.pt`` (atomically).

Under ``torchrun --nproc_per_node W -m pyro_kpp.svi ...`` the loop runs data-parallel on W
ranks (``--batch-size`` is then the global batch): see pyro_kpp.distributed.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from . import data as data_lib
from . import distributed, rundir
from .api import model_from_state
from .bound import evaluate, make_elbo, training_loss
from .checkpoint import (CHECKPOINT_NAME, RESUME_KEYS, ensure_writable, load_checkpoint, nonfinite_entries,
                         save_checkpoint)
from .cliargs import finite_float
from .config import KM_READ_WRITE, KPP_WRITES, PRESET_DEFAULTS, Config
from .interrupts import StopRequests
from .likelihoods import LIKELIHOODS, bits_per_dim
from .memory_use import diagnose
from .optim import build_optimizer
from .plots import reconstruction_rows, sample_rows, save_rows
from .registry import MODELS, build_model
from .spatial import KEY_MAPS
from .schedules import key_free_nats, key_kl_weight, kl_weight

# CLI flag -> Config field, for the options that map one to one.
FLAGS = {
    "model": "model", "preset": "preset", "data": "data", "data_dir": "data_dir", "likelihood": "likelihood",
    "episode_length": "episode_length", "batch_size": "batch_size", "reads": "reads",
    "memory_shape": "memory_shape", "window": "window", "writer_channels": "writer_channels",
    "kpp_write": "kpp_write", "key_map": "key_map", "kpp_posterior": "kpp_posterior",
    "kpp_block_res": "kpp_block_res", "key_min_scale": "key_min_scale", "key_kl_start": "key_kl_start", "key_kl_hold": "key_kl_hold",
    "key_kl_ramp": "key_kl_ramp", "key_free_nats": "key_free_nats",
    "slots": "slots", "address_size": "address_size", "km_read_write": "km_read_write",
    "dkm_write_iterations": "dkm_write_iterations",
    "code_size": "code_size", "embed_size": "embed_size", "hidden": "hidden", "elbo": "elbo",
    "lr": "lr", "clip_norm": "clip_norm", "kl_warmup": "kl_warmup", "kl_weight": "kl_weight",
    "valid_images": "valid_images", "max_nonfinite": "max_nonfinite",
    "validate_every_step": "validate_every_step", "epochs": "epochs", "max_steps": "max_steps",
    "max_minutes": "max_minutes", "seed": "seed", "device": "device", "eval_episodes": "eval_episodes",
}
# Options that may change when resuming a run (they do not change the model or data order).
RESUMABLE = {"epochs", "max_steps", "max_minutes", "max_nonfinite", "validate_every_step", "device",
             "eval_episodes", "data_dir"}


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,64,64), got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes C,H,W, got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m pyro_kpp.svi", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--model", choices=sorted(MODELS), help=f"model (default {d.model})")
    p.add_argument("--preset", choices=sorted(PRESET_DEFAULTS),
                   help="networks and optimiser: cpu = small conv nets and Adam; paper = K++ Appendix E "
                        f"(TSM-ResNet18, EvoNorm decoder, LARS(Adam), one-cycle cosine) (default {d.preset})")
    p.add_argument("--data", choices=data_lib.DATASETS, help=f"data set (default {d.data})")
    p.add_argument("--data-dir", help="data root (default: $PYRO_KPP_DATA, else a per-user cache folder)")
    p.add_argument("--likelihood", choices=sorted(LIKELIHOODS),
                   help="bernoulli: binarized data; dmol: 8-bit data under a discretized mixture of "
                        "logistics (default: dmol for cifar10, else bernoulli)")
    p.add_argument("-T", "--episode-length", type=int, help=f"images per episode (default {d.episode_length})")
    p.add_argument("-B", "--batch-size", type=int, help=f"episodes per step (default {d.batch_size})")
    p.add_argument("-K", "--reads", type=int, help=f"K++ reads per image (default {d.reads})")
    p.add_argument("--memory-shape", type=parse_shape, help="K++ memory C,H,W (default 3,64,64)")
    p.add_argument("--window", type=int, help=f"K++ read window h=w (default {d.window})")
    p.add_argument("--writer-channels", type=int, help="base channels of f_mem (default by preset: cpu 64, paper 256)")
    p.add_argument("--kpp-write", choices=KPP_WRITES,
                   help="K++ write: pooled = f_mem(mean e) (§3.3, literal); addressed = also each image's block "
                        "where its mean keys read; addressed-mean = the same, overlaps averaged "
                        f"(default {d.kpp_write})")
    p.add_argument("--slots", type=int, help="KM/DKM memory rows K (default: KM 64, DKM 32)")
    p.add_argument("--address-size", type=int, help=f"KM size S of y and of the keys f(y) (default {d.address_size})")
    p.add_argument("--km-read-write", choices=KM_READ_WRITE,
                   help="KM memory access: mean = sampled codes written, mean-field memory read (KM §3.3-3.4); "
                        f"distribution = KM Appendix F (default {d.km_read_write})")
    p.add_argument("--dkm-write-iterations", type=int,
                   help=f"DKM solves of w per written image (default {d.dkm_write_iterations})")
    p.add_argument("--code-size", type=int, help=f"dimension L of z (default {d.code_size})")
    p.add_argument("--embed-size", type=int, help=f"embedding size (default {d.embed_size})")
    p.add_argument("--hidden", type=int, help="units of dense heads (default by preset: cpu 256, paper 512)")
    p.add_argument("--elbo", choices=["trace", "meanfield"], help=f"Pyro ELBO (default {d.elbo})")
    p.add_argument("--kl-warmup", type=int, help=f"steps over which the KL weight rises from 0 to 1 "
                                                 f"(0 = none; default {d.kl_warmup})")
    p.add_argument("--kpp-block-res", type=int, help="K++ addressed write: resolution of each written block, "
                                                     "upsampled to the window (default 0: the window's)")
    p.add_argument("--key-min-scale", type=finite_float, help="K++: added to every standard deviation of q(y|X) "
                                                              "(default 0: the paper's family)")
    p.add_argument("--kpp-posterior", choices=["x", "read"],
                   help="K++ code posterior: x = q(z|X) (§3.5); read = q(z|X,M,y), also given the mean of "
                        f"p(z|M,y) at the sampled keys (default {d.kpp_posterior})")
    p.add_argument("--kl-weight", type=finite_float, help="training-only constant weight of every KL after the "
                                                          "warm-up, for experiments; reported bounds use 1 (default 1)")
    p.add_argument("--key-map", choices=KEY_MAPS,
                   help="K++ keys -> windows: tanh = each component squashed by tanh; uniform = the key prior "
                        f"spread uniformly over the memory at scales near window/memory (default {d.key_map})")
    p.add_argument("--key-kl-start", type=finite_float, help="training-only weight of the key/address KL at the "
                                                      f"start (default {d.key_kl_start}: none)")
    p.add_argument("--key-kl-hold", type=int, help="steps the key KL weight stays at --key-kl-start "
                                                   f"(default {d.key_kl_hold})")
    p.add_argument("--key-kl-ramp", type=int, help="steps of the cosine ramp of the key KL weight to 1 "
                                                   f"(default {d.key_kl_ramp})")
    p.add_argument("--key-free-nats", type=finite_float, help="training-only free nats of the key/address KL per image "
                                                       f"through the hold, falling to 0 over the ramp (default {d.key_free_nats})")
    p.add_argument("--lr", type=finite_float, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--clip-norm", type=finite_float, help=f"global grad-norm clip, 0 = off (default {d.clip_norm})")
    p.add_argument("--max-nonfinite", type=int, help="stop after this many non-finite losses or gradients "
                                                     f"in a row, each skipped (default {d.max_nonfinite})")
    p.add_argument("--validate-every-step", action="store_true", default=None,
                   help="run Pyro's validation and the input value checks on every training step "
                        "(default: on the first step of the run or resume only; they cost host syncs)")
    p.add_argument("--epochs", type=int, help=f"epochs (default {d.epochs})")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    p.add_argument("--max-minutes", type=finite_float, help="stop after this much training time (minutes, "
                                                      "evaluation excluded); checked after every step")
    p.add_argument("--seed", type=int, help=f"seed (default {d.seed})")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--valid-images", type=int, help="hold this many training images out as validation episodes; "
                                                    "each epoch's figures are then on them, not on the test split "
                                                    "(default 0)")
    p.add_argument("--eval-episodes", type=int, help="test episodes evaluated each epoch (default: all)")
    p.add_argument("--run-dir", help="where to write checkpoints, metrics and images "
                                     "(default runs/<data>-<model>-<time>, or the resumed run)")
    p.add_argument("--resume", help="run directory or checkpoint file to resume from")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --run-dir that holds a run, deleting that run (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-steps", action="store_true", help="append each step's loss (the global mean over "
                                                           "ranks) and gradient norm to steps.jsonl")
    return p


def config_from_args(args: argparse.Namespace, resume_state: dict | None) -> Config:
    """The run's config: defaults <- checkpoint (when resuming) <- explicit CLI options."""
    given = {FLAGS[k]: v for k, v in vars(args).items() if k in FLAGS}
    if resume_state is None:
        return Config(**given)
    base = Config.from_dict(resume_state["config"])
    changed = sorted(k for k, v in given.items() if k not in RESUMABLE and getattr(base, k) != v)
    if changed:
        raise ValueError(f"--resume: options {changed} differ from the checkpoint's config; a resumed run "
                         f"keeps its model and data (only {sorted(RESUMABLE)} may change)")
    return Config(**{**base.to_dict(), **given})


def make_episodes(cfg: Config, data: data_lib.ImageData, device: torch.device) -> data_lib.Episodes:
    """The run's episodes: binarized for a binary likelihood, 8-bit grey levels k/255 otherwise."""
    binarize = LIKELIHOODS[cfg.likelihood].binarized
    return data_lib.Episodes(data, cfg.episode_length, cfg.batch_size, seed=cfg.seed, binarize=binarize,
                             device=device, valid_images=cfg.valid_images)


def check_resume_targets(cfg: Config, resume_state: dict | None) -> None:
    """A resumed run must have something left to do: contradictory targets are errors."""
    if resume_state is None:
        return
    done = resume_state["step"]
    if cfg.max_steps is not None and cfg.max_steps <= done:
        raise ValueError(f"--max-steps: the checkpoint is already at step {done}; "
                         f"ask for more than {done} steps to continue")
    if cfg.epochs <= resume_state["epoch"]:
        raise ValueError(f"--epochs: the checkpoint has finished {resume_state['epoch']} epochs; "
                         f"ask for more than {resume_state['epoch']} to continue")


def test_batches(episodes: data_lib.Episodes, max_episodes: int | None, split: str = "test"):
    """The fixed test (or, ``split="valid"``, validation) episodes, capped at ``max_episodes`` episodes."""
    fixed = episodes.valid_episodes() if split == "valid" else episodes.test_episodes()
    if max_episodes is None:
        yield from fixed
        return
    left = max_episodes
    for x in fixed:
        if left <= 0:
            return
        yield x[:left]
        left -= x.shape[0]


class NonFiniteTraining(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def nonfinite_stop(what: str, run_dir: Path) -> NonFiniteTraining:
    """The error that stops training on non-finite values, saying truthfully what is left."""
    path = run_dir / CHECKPOINT_NAME
    kept = f"The last good checkpoint is kept at {path}" if path.exists() else "No checkpoint was written"
    return NonFiniteTraining(f"training: {what}; stopped. {kept} (try a lower --lr or --clip-norm)")


def check_finite_weights(model, step: int, run_dir: Path) -> None:
    """Weights turned non-finite (an overflowing update) are never evaluated or saved; checked
    once per epoch or stop, not per step (it waits for the device)."""
    bad = nonfinite_entries(model.state_dict())
    if bad:
        raise nonfinite_stop(f"the weights became non-finite by step {step} (e.g. {bad[0]})", run_dir)


def write_images(model, x: torch.Tensor, run_dir: Path, epoch: int, seed: int) -> None:
    images = run_dir / "images"
    images.mkdir(exist_ok=True)
    was_training = model.training
    model.eval()
    save_rows(reconstruction_rows(model, x), images / f"reconstructions_{epoch:04d}.png")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    save_rows(sample_rows(model, x, generator=gen), images / f"samples_{epoch:04d}.png")
    model.train(was_training)


def train(cfg: Config, run_dir: str | Path, resume_state: dict | None = None,
          progress: bool = True, log_steps: bool = False, world: distributed.World | None = None) -> list[dict]:
    """Train ``cfg`` in ``run_dir``; returns the metrics of every epoch run here.

    Under torchrun (``world``, see pyro_kpp.distributed) every rank trains on its slice of each
    global batch of ``cfg.batch_size`` episodes with averaged gradients; only rank 0 evaluates
    and writes files, and only rank 0 returns metrics. The caller holds ``run_dir`` (the CLI
    does, with ``rundir.claim``: a lock against other writers, no overwriting of another run).
    """
    run_dir = Path(run_dir)
    world = world or distributed.init(cfg.device)
    device = world.device
    mine = world.episodes(cfg.batch_size)                   # this rank's slice of every global batch
    data = data_lib.load_dataset(cfg.data, cfg.data_dir)
    fingerprint = rundir.data_fingerprint(data)
    if resume_state is not None:
        rundir.check_same_data(resume_state.get("data"), fingerprint, cfg.data_dir)
    cfg.image_shape = tuple(data.image_shape)
    episodes = make_episodes(cfg, data, device)

    pyro.set_rng_seed(cfg.seed)
    if resume_state is None:
        model = build_model(cfg).to(device)
    else:
        model = model_from_state(resume_state, device)
    world.broadcast_parameters(model)
    world.seed_sampling(cfg.seed)                           # per-rank noise (a no-op in one process)
    steps_per_epoch = episodes.steps_per_epoch()
    optimizer, scheduler = build_optimizer(cfg, model, steps_per_epoch)   # by cfg.preset
    epoch, epoch_step, step = 0, 0, 0
    loss_sum, loss_count = 0.0, 0
    skipped, nonfinite_in_row = 0, 0
    train_seconds_total = 0.0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume_state["scheduler"])
        epoch, epoch_step, step = resume_state["epoch"], resume_state["epoch_step"], resume_state["step"]
        loss_sum, loss_count = resume_state["epoch_loss"]
        train_seconds_total = resume_state["train_seconds"]
        skipped, nonfinite_in_row = resume_state["skipped"]
        world.restore_rng(resume_state["rng"], cfg.seed, step)
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if world.is_main:
        ensure_writable(run_dir, needed_bytes=3 * state_bytes + 2**20)   # a new one: weights + Adam moments
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    elbo = make_elbo(cfg.elbo)
    metrics_path = run_dir / "metrics.jsonl"
    if resume_state is not None and world.is_main:
        rundir.repair_metrics(metrics_path, step)
        rundir.repair_metrics(run_dir / "steps.jsonl", step)
    history = []
    # Per-epoch figures come from validation episodes held out of the train split when
    # cfg.valid_images > 0 (for choosing designs), else from the test episodes.
    split = "valid" if cfg.valid_images else "test"
    first_test = next(iter(test_batches(episodes, None, split)))
    start_time = time.time()

    def checkpoint():
        """Save everything needed to resume exactly; a failed write leaves the old file intact."""
        try:
            write_checkpoint()
        except OSError as exc:
            raise OSError(f"checkpoint: could not write {run_dir / CHECKPOINT_NAME} ({exc.strerror or exc}); "
                          f"the previous checkpoint is intact") from None

    def write_checkpoint():
        rng = world.checkpoint_rng(model)                   # every rank's; checks they agree
        if not world.is_main:
            return
        save_checkpoint(run_dir / CHECKPOINT_NAME, {
            "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "epoch": epoch, "epoch_step": epoch_step, "step": step, "epoch_loss": (loss_sum, loss_count),
            "train_seconds": train_seconds_total, "skipped": (skipped, nonfinite_in_row),
            "rng": rng, "pyro_kpp_version": __import__("pyro_kpp").__version__, "data": fingerprint,
        })

    def budget_left(seconds_this_epoch: float = 0.0) -> bool:
        if cfg.max_steps is not None and step >= cfg.max_steps:
            return False
        spent = train_seconds_total + seconds_this_epoch
        return cfg.max_minutes is None or not world.any(spent >= 60 * cfg.max_minutes)

    first_step = step                                        # validated (see Config.validate_every_step)
    model.train()
    with StopRequests() as stop:
        while epoch < cfg.epochs and budget_left():
            epoch_start = time.time()
            batches = episodes.train_epoch(epoch, start_step=epoch_step)
            bar = tqdm(batches, total=steps_per_epoch, initial=epoch_step, desc=f"epoch {epoch}",
                       unit="step", disable=not (progress and world.is_main), dynamic_ncols=True)
            running, interrupted = None, False
            for x in bar:
                x = x[mine]
                beta, key_beta = kl_weight(cfg, step), key_kl_weight(cfg, step)
                with pyro.validation_enabled(cfg.validate_every_step or step == first_step):
                    loss = training_loss(model, x, elbo, kl_scale=beta, key_kl_scale=key_beta,
                                         key_free_nats=key_free_nats(cfg, step))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                loss = world.average_gradients(model.parameters(), loss)   # global mean loss and gradient
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.clip_norm if cfg.clip_norm > 0 else math.inf)
                value, norm = torch.stack([loss, grad_norm]).tolist()   # the step's one host sync
                if math.isfinite(value) and math.isfinite(norm):
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    nonfinite_in_row = 0
                    loss_sum, loss_count = loss_sum + value, loss_count + 1
                    running = value if running is None else 0.95 * running + 0.05 * value
                else:                                   # skip the update, keep the parameters
                    skipped += 1
                    nonfinite_in_row += 1
                    if nonfinite_in_row >= cfg.max_nonfinite:
                        raise nonfinite_stop(f"{nonfinite_in_row} steps in a row (up to step {step}) gave a "
                                             f"non-finite loss or gradient", run_dir)
                epoch_step += 1
                step += 1
                if log_steps and world.is_main:
                    with (run_dir / "steps.jsonl").open("a") as f:
                        f.write(json.dumps({"step": step, "loss": value, "grad_norm": norm,
                                            "kl_scale": beta, "key_kl_scale": key_beta}) + "\n")
                if running is not None:
                    bar.set_postfix_str(f"bound {running:.2f} nats/image" if beta * key_beta == 1.0 else
                                        f"warm-up loss {running:.2f} (KL x {beta:.2f}, keys x {key_beta:.2f})")
                interrupted = world.any(stop.requested)       # all ranks stop at the same step
                if interrupted or not budget_left(time.time() - epoch_start):
                    break
            bar.close()
            check_finite_weights(model, step, run_dir)
            if interrupted:
                train_seconds_total += time.time() - epoch_start
                checkpoint()
                if world.is_main:
                    print(f"{stop.name or 'another rank'}: stopped at step {step}; checkpoint saved to "
                          f"{run_dir / CHECKPOINT_NAME}. Resume with: python -m pyro_kpp.svi --resume {run_dir}",
                          file=sys.stderr, flush=True)
                raise Interrupted(stop.signum or signal.SIGTERM)
            epoch_done = epoch_step >= steps_per_epoch
            train_seconds = time.time() - epoch_start
            train_seconds_total += train_seconds
            # Evaluation and images draw from their own seeded RNG stream, so they neither
            # perturb training (an interrupted-and-resumed run stays identical) nor differ
            # between epochs except through the parameters.
            if world.is_main:                       # the others wait in checkpoint()'s gather
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(cfg.seed + 1)
                    test = evaluate(model, test_batches(episodes, cfg.eval_episodes, split))
                    memory_use = diagnose(model, test_batches(episodes, cfg.eval_episodes, split))
                    write_images(model, first_test, run_dir, epoch, cfg.seed)
                record = {
                    "epoch": epoch, "step": step, "epoch_complete": epoch_done,
                    "train_bound": loss_sum / max(loss_count, 1), f"{split}_bound": test["elbo"],
                    f"{split}_images": test["images"], f"{split}_terms": test["terms"],
                    "memory_gain": test["memory_gain"], f"{split}_terms_other_memory": test["foreign_terms"],
                    **memory_use, "train_seconds": round(train_seconds, 2),
                    "train_seconds_total": round(train_seconds_total, 2),
                    # < 1: train_bound is the warm-up objective, not the bound
                    "kl_scale": kl_weight(cfg, step - 1), "key_kl_scale": key_kl_weight(cfg, step - 1),
                    "skipped_steps": skipped,          # non-finite loss or gradient, update skipped (whole run)
                    "wall_seconds": round(time.time() - start_time, 2),
                }
                if not LIKELIHOODS[cfg.likelihood].binarized:
                    record["train_bits_per_dim"] = bits_per_dim(record["train_bound"], cfg.image_shape)
                    record[f"{split}_bits_per_dim"] = bits_per_dim(record[f"{split}_bound"], cfg.image_shape)
                history.append(record)
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                if progress or not sys.stderr.isatty():
                    print(f"epoch {epoch} step {step}: train bound {record['train_bound']:.2f}, "
                          f"{split} bound {record[f'{split}_bound']:.2f} nats/image"
                          + (f" = {record[f'{split}_bits_per_dim']:.3f} bits/dim"
                             if f"{split}_bits_per_dim" in record else "")
                          + (f", memory gain {record['memory_gain']:.2f}" if record["memory_gain"] is not None else "")
                          + f" ({train_seconds:.0f} s)",
                          file=sys.stderr, flush=True)
            if epoch_done:
                epoch, epoch_step, loss_sum, loss_count = epoch + 1, 0, 0.0, 0
            checkpoint()
    return history


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resume = getattr(args, "resume", None)
        resume_state = load_checkpoint(resume, require=RESUME_KEYS) if resume else None
        cfg = config_from_args(args, resume_state)
        world = distributed.init(cfg.device)
        check_resume_targets(cfg, resume_state)
        run_dir, fresh = rundir.choose(getattr(args, "run_dir", None), resume, cfg.data, cfg.model, world.is_main)
        if world.is_main:
            print(f"run directory: {run_dir}", file=sys.stderr)
        with rundir.claim(run_dir, fresh, getattr(args, "overwrite", False)) if world.is_main else nullcontext():
            history = train(cfg, run_dir, resume_state, progress=not getattr(args, "no_progress", False),
                            log_steps=getattr(args, "log_steps", False), world=world)
    except Interrupted as stop:
        return 128 + stop.signum
    except (ValueError, TypeError, OSError, NonFiniteTraining) as exc:
        parser.exit(2, f"error: {exc}\n")
    if history:
        print(json.dumps(history[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
