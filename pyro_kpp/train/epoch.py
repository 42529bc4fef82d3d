"""What a training run measures and prints once per epoch: the bound on the validation or test
episodes with its terms, the memory's use, the image grids (``evaluate_epoch``), and the epoch's one
line on stderr (``report``)."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from pyro_kpp.config import Config
from pyro_kpp.data.episodes import Episodes, test_batches
from pyro_kpp.inference.bound import evaluate
from pyro_kpp.inference.memory_use import diagnose
from pyro_kpp.inference.schedules import key_free_nats, key_kl_weight, kl_weight
from pyro_kpp.maths.likelihoods import LIKELIHOODS, bits_per_dim
from pyro_kpp.train.step import TrainState
from pyro_kpp.viz.grids import write_images

#: Training episodes on which the true train bound is measured at the end of a warm-up epoch.
TRAIN_BOUND_EPISODES = 64


@torch.no_grad()
def evaluate_epoch(model, episodes: Episodes, cfg: Config, state: TrainState, run_dir: Path,
                   first_test: torch.Tensor) -> dict:
    """The epoch's metrics line: the test bound and its terms, the memory's use, and the training
    figures of ``state``; writes the epoch's images. With ``cfg.valid_images`` the figures are
    the validation episodes' (keys ``valid_*``, for choosing designs), else the test episodes'
    (``test_*``). Evaluation and images draw from their own seeded RNG stream, so they neither
    perturb training (an interrupted-and-resumed run stays identical) nor differ between epochs
    except through the parameters."""
    split = eval_split(cfg)
    with torch.random.fork_rng(devices=[first_test.device] if first_test.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 1)
        test = evaluate(model, test_batches(episodes, cfg.eval_episodes, split),
                        leave_one_out=cfg.training_folds is not None)      # what a held-out run is for
        memory_use = diagnose(model, test_batches(episodes, cfg.eval_episodes, split))
        write_images(model, first_test, run_dir, state.epoch, cfg.seed)
        objective = state.loss_sum / max(state.loss_count, 1)
        train_bound = (evaluate(model, train_sample(episodes, cfg, state.epoch))["elbo"]
                       if objective_is_weighted(cfg, state.step - state.epoch_step) else objective)
    record = {
        "epoch": state.epoch, "step": state.step, "epoch_complete": state.epoch_step >= episodes.steps_per_epoch(),
        "objective": cfg.objective, "train_objective": objective, "train_bound": train_bound,
        f"{split}_bound": test["elbo"],
        f"{split}_images": test["images"], f"{split}_terms": test["terms"],
        **({f"{split}_loo_bound": test["loo"], f"{split}_loo_terms": test["loo_terms"]} if "loo" in test else {}),
        "memory_gain": test["memory_gain"], f"{split}_terms_other_memory": test["foreign_terms"], **memory_use,
        "train_seconds_total": round(state.train_seconds, 2),
        # < 1: train_objective is the warm-up objective, and train_bound the bound at the epoch's end
        "kl_scale": kl_weight(cfg, state.step - 1), "key_kl_scale": key_kl_weight(cfg, state.step - 1),
        "skipped_steps": state.skipped,          # non-finite loss or gradient, update skipped (whole run)
    }
    if not LIKELIHOODS[cfg.likelihood].binarized:
        record["train_bits_per_dim"] = bits_per_dim(record["train_bound"], cfg.image_shape)
        record[f"{split}_bits_per_dim"] = bits_per_dim(record[f"{split}_bound"], cfg.image_shape)
    return record


def objective_is_weighted(cfg: Config, step: int) -> bool:
    """Whether the training objective from ``step`` on differs from the bound (a KL weight below 1,
    free nats, or the held-out objective); the weights only rise, so the epoch's first step decides
    for the epoch."""
    return (cfg.training_folds is not None or kl_weight(cfg, step) != 1.0 or key_kl_weight(cfg, step) != 1.0
            or key_free_nats(cfg, step) > 0)


def train_sample(episodes: Episodes, cfg: Config, epoch: int, most: int = TRAIN_BOUND_EPISODES):
    """The epoch's first training batches, up to ``most`` episodes (or ``--eval-episodes``): where the
    true train bound is measured while the objective is weighted (a fixed, cheap sample)."""
    wanted = min(most, cfg.eval_episodes or most)
    return itertools.islice(episodes.train_epoch(epoch), max(1, math.ceil(wanted / cfg.batch_size)))


def eval_split(cfg: Config) -> str:
    """Where the per-epoch figures come from: "valid" episodes held out of the train split, or "test"."""
    return "valid" if cfg.valid_images else "test"


def weights(record: dict) -> str:
    """The KL weights of a warm-up objective, as the bar and the epoch line both show them."""
    return f"KL x {record['kl_scale']:.2f}, keys x {record['key_kl_scale']:.2f}"


def report(record: dict) -> str:
    """The epoch's one line on stderr."""
    split = "valid" if "valid_bound" in record else "test"
    kind = "held-out" if record.get("objective") == "held-out" else "warm-up"
    objective = ("" if record["train_objective"] == record["train_bound"] else
                 f"{kind} objective {record['train_objective']:.2f} ({weights(record)}), ")
    return (f"epoch {record['epoch']} step {record['step']}: {objective}train bound {record['train_bound']:.2f}, "
            f"{split} bound {record[f'{split}_bound']:.2f} nats/image"
            + (f" = {record[f'{split}_bits_per_dim']:.3f} bits/dim" if f"{split}_bits_per_dim" in record else "")
            + (f", leave-one-out {record[f'{split}_loo_bound']:.2f}" if f"{split}_loo_bound" in record else "")
            + (f", memory gain {record['memory_gain']:.2f}" if record["memory_gain"] is not None else "")
            + f" ({record['train_seconds']:.0f} s)")
