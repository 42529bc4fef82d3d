"""Evaluation CLI: ``python -m pyro_kpp.evaluate RUN_DIR [--samples S]``.

Prints the negative test conditional bound (the ELBO, eq. 4 of K++ / eq. 12 of KM) and the
negative importance-weighted bound with S samples of (y, z) per image given the written
memory, both in nats/image over the fixed test episodes (see ``pyro_kpp.inference.bound``); the ELBO's
terms (reconstruction, code KL, key/address KL, DKM's memory KL); and what the memory carries
about its episode: the memory gain (the bound with another test episode's memory minus the
bound with the episode's own) and the NLL of the mean memory read at each image's keys, from
its own and from another episode's memory, and whether random-key samples are nearer to their
own episode's images than to another's (``pyro_kpp.inference.memory_use``). For 8-bit data
(``--likelihood dmol``) both are also given in bits/dim, -bound / (D ln 2) with D = C*H*W
sub-pixels (K++ Table 1): the likelihood is a probability mass over the 256 levels of each
sub-pixel, so the figure needs no dequantization correction.

The leave-one-out bound (``pyro_kpp.inference.bound.leave_one_out_particles``) is printed beside the
conditional bound: each image read from the memory its episode's other T - 1 images wrote. It is a
proper density over the image, so it ranks against the VAE's bound on the same images (the
conditional bound does not). For a conditional bound (K++, KM) the leave-one-out minus the full
figure is the part of it that comes from the image storing itself, a difference of bounds, not
information; DKM's and the VAE's full bounds are marginal, so for them it is not that.

For a run trained on class-structured episodes (``--episode-classes``) the random-key samples
are also matched against every test image: how often their nearest one is of one of the
episode's classes. ``--random-episodes`` evaluates such a run on its test split cut into
random episodes instead (the papers' protocol), for contrast.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import torch
from tqdm.auto import tqdm

from pyro_kpp import data as data_lib
from pyro_kpp.cliargs import positive_int
from pyro_kpp.config import Config
from pyro_kpp.data.episodes import make_episodes, test_batches
from pyro_kpp.inference.bound import evaluate, particle_passes
from pyro_kpp.inference.memory_use import class_diagnose, diagnose
from pyro_kpp.inference.posterior import pareto_k
from pyro_kpp.maths.likelihoods import LIKELIHOODS, bits_per_dim
from pyro_kpp.models.base import count
from pyro_kpp.train import speed
from pyro_kpp.train.checkpoint import load_checkpoint, model_from_state
from pyro_kpp.train.device import resolve_device


#: Most importance samples per image. The IW bound's gap to ln p(x) shrinks like 1/S (Burda et al.,
#: 2016, report S = 5000), while the time grows like S: the whole Omniglot test split takes about
#: 100 s at the default S = 100 on our CPU, so S = 10^4 is already hours (with a progress bar and ETA).
MAX_SAMPLES = 10_000
#: Fewest importance samples per image for which the Pareto-k fit is reported. PSIS fits the
#: tail of the largest min(0.2 S, 3 sqrt(S)) weights, and ArviZ returns k = inf, no fit, for a
#: tail of 4 or fewer: S = 20 gives 4 (every k inf), S = 21 the first fit.
MIN_PSIS_SAMPLES = 21
#: Above this Pareto k the importance-weighted estimate for an image is unreliable (Vehtari et
#: al., "Pareto smoothed importance sampling", 2024: k > 0.7).
K_UNRELIABLE = 0.7


def pareto_summary(k: np.ndarray, unit: str = "images") -> dict:
    """Counts of the Pareto k by the PSIS thresholds, and their median and maximum; one k per
    set of weights the IW bound averages, ``unit`` naming them (DKM's: "episodes")."""
    return {"unit": unit, unit: int(k.size), "median": float(np.median(k)), "max": float(k.max()),
            "over_0.5": int((k > 0.5).sum()), f"over_{K_UNRELIABLE}": int((k > K_UNRELIABLE).sum())}


def pareto_lines(summary: dict | None) -> list[str]:
    """The report's Pareto-k line, and a warning when the IW bound is unreliable for some images."""
    if summary is None:
        return [f"Pareto k: not fitted (needs --samples >= {MIN_PSIS_SAMPLES})"]
    bad, unit = summary[f"over_{K_UNRELIABLE}"], summary.get("unit", "images")
    of = f"{summary[unit]} {unit}"
    lines = [f"Pareto k of the importance weights: median {summary['median']:.2f}, max {summary['max']:.2f}; "
             f"> 0.5 for {summary['over_0.5']}, > {K_UNRELIABLE} for {bad} of {of}"]
    if bad:
        lines.append(f"warning: Pareto k > {K_UNRELIABLE} for {bad} of {of}: the importance-"
                     f"weighted bound is unreliable for them (the guide's tails are too light); trust the ELBO")
    return lines


def particle_total(n_episodes: int, batch_size: int, T: int, samples: int, leave_one_out: bool = False) -> int:
    """Image-particles ``evaluate`` draws over ``n_episodes`` test episodes in batches of ``batch_size``."""
    sizes = [batch_size] * (n_episodes // batch_size) + ([n_episodes % batch_size] if n_episodes % batch_size else [])
    return sum(b * T * particle_passes(samples, b, leave_one_out) for b in sizes)


def evaluate_run(run_dir: str, samples: int = 100, max_episodes: int | None = None, device: str = "auto",
                 data_dir: str | None = None, seed: int = 0, progress: bool = True, compile: bool = False,
                 leave_one_out: bool = True, random_episodes: bool = False) -> dict:
    """Bounds of a run's checkpoint on its data set's fixed test episodes. ``compile`` runs the
    networks through ``torch.compile`` (``pyro_kpp.train.speed``; float32 as always).
    ``leave_one_out`` adds the leave-one-out bounds (``test_loo_bound``, ``test_loo_iw_bound``,
    their terms, and ``loo_minus_full``, the leave-one-out minus the full -ELBO: for a conditional
    bound (``conditional_bound``: K++, KM) the part that comes from each image storing itself);
    it doubles the particles drawn and needs T >= 2. ``random_episodes`` evaluates a run trained
    on class-structured episodes on its test split cut into random episodes instead
    (``make_episodes``), for contrast; ``episode_structure`` in the result names which."""
    samples = count("samples", samples)
    if max_episodes is not None:
        max_episodes = count("max_episodes", max_episodes)
    if samples > MAX_SAMPLES:
        raise ValueError(f"samples: expected at most {MAX_SAMPLES} importance samples per image (the bound's gap "
                         f"shrinks like 1/S, the time grows like S), got {samples}")
    state = load_checkpoint(run_dir)
    cfg = Config.from_dict(state["config"])
    dev = resolve_device(device)
    model = model_from_state(state, dev).eval()
    compiled, message = speed.prepare(model, "fp32", compile, dev, cfg.channels_last)   # the run's layout
    if compile and not compiled:                          # say why it stays eager
        print(message, file=sys.stderr)
    data = data_lib.load_dataset(cfg.data, data_dir if data_dir is not None else cfg.data_dir)
    episodes = make_episodes(cfg, data, dev, random_episodes=random_episodes)
    torch.manual_seed(seed)
    n_episodes = min(max_episodes or episodes.num_test_episodes(), episodes.num_test_episodes())
    leave_one_out = leave_one_out and cfg.episode_length >= 2
    bar = tqdm(total=particle_total(n_episodes, cfg.batch_size, cfg.episode_length, samples, leave_one_out),
               disable=not progress, desc=f"test images x particles (S={samples})", unit="", unit_scale=True,
               dynamic_ncols=True)
    ks = []
    with bar:
        result = evaluate(model, test_batches(episodes, max_episodes), samples=samples, tick=bar.update,
                          on_log_weights=(lambda lw: ks.append(pareto_k(lw).ravel()))
                          if samples >= MIN_PSIS_SAMPLES else None, leave_one_out=leave_one_out)
    out = {"model": cfg.model, "data": cfg.data, "likelihood": cfg.likelihood, "step": state["step"],
           "test_bound": result["elbo"], "test_iw_bound": result["iw"],
           "samples": samples, "test_images": result["images"], "test_terms": result["terms"],
           "memory_gain": result["memory_gain"], "test_terms_other_memory": result["foreign_terms"],
           "pareto_k": pareto_summary(np.concatenate(ks), "episodes" if model.memory_is_latent else "images")
           if ks else None, "episode_classes": cfg.episode_classes, "conditional_bound": model.conditional_bound,
           "episode_structure": "random" if episodes.classes is None else f"{episodes.classes} classes",
           **diagnose(model, test_batches(episodes, max_episodes))}
    if leave_one_out:
        out.update(test_loo_bound=result["loo"], test_loo_iw_bound=result["loo_iw"], test_loo_terms=result["loo_terms"],
                   loo_minus_full=result["loo"] - result["elbo"])
    if cfg.episode_classes is not None:                   # class episodes, or their images in random episodes
        out.update(class_diagnose(model, test_batches(episodes, max_episodes), episodes.test_labels(),
                                  *episodes.test_pool()))
    if not LIKELIHOODS[cfg.likelihood].binarized:
        out["test_bits_per_dim"] = bits_per_dim(result["elbo"], cfg.image_shape)
        out["test_iw_bits_per_dim"] = bits_per_dim(result["iw"], cfg.image_shape)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyro_kpp.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="run directory (or checkpoint file)")
    p.add_argument("-S", "--samples", type=int, default=100, help=f"at most {MAX_SAMPLES} (the bound's gap to "
                                                                  f"ln p(x) shrinks like 1/S, the time grows like S): "
                                                                  f"importance samples per image")
    p.add_argument("--episodes", type=positive_int, default=None, help="evaluate only this many test episodes (None: all; "
                                                            "the whole Omniglot test split at S=100 takes minutes)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data-dir", default=None, help="data root (None: the run's, stored in its config)")
    p.add_argument("--seed", type=int, default=0, help="seed of the importance samples")
    p.add_argument("--compile", action="store_true", help="compile the networks with torch.compile "
                                                           "(float32 either way; docs/benchmarks.md has measured "
                                                           "ratios)")
    p.add_argument("--no-leave-one-out", action="store_true", help="skip the leave-one-out bound (it doubles the "
                                                                   "particles drawn)")
    p.add_argument("--random-episodes", action="store_true", help="a run trained on class-structured episodes: "
                   "its test images in random episodes instead (the papers' protocol), for contrast")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--json implies it)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = p.parse_args(argv)
    try:
        r = evaluate_run(args.run_dir, args.samples, args.episodes, args.device, args.data_dir, args.seed,
                         progress=not (args.json or args.no_progress), compile=args.compile,
                         leave_one_out=not args.no_leave_one_out, random_episodes=args.random_episodes)
    except (ValueError, TypeError, OSError) as exc:
        p.exit(2, f"error: {exc}\n")
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']} on {r['data']} ({r['likelihood']} likelihood, step {r['step']}), "
              f"{r['test_images']} test images in episodes of {r['episode_structure']}")
        bits = "test_bits_per_dim" in r
        kind = "conditional" if r["conditional_bound"] else "marginal"
        print(f"{f'test {kind} bound (-ELBO):':38s} {r['test_bound']:.2f} nats/image"
              + (f" = {r['test_bits_per_dim']:.4f} bits/dim" if bits else ""))
        print(f"test importance-weighted bound, S={r['samples']}: {r['test_iw_bound']:.2f} nats/image"
              + (f" = {r['test_iw_bits_per_dim']:.4f} bits/dim" if bits else ""))
        if "test_loo_bound" in r:
            print(f"leave-one-out bound (-ELBO, memory written without the image): {r['test_loo_bound']:.2f} "
                  f"nats/image; importance-weighted, S={r['samples']}: {r['test_loo_iw_bound']:.2f}")
            what = ("part of the conditional bound from the image storing itself" if r["conditional_bound"] else
                    "the full bound is marginal, so this is not self-storage")
            print(f"  leave-one-out - full: {r['loo_minus_full']:.2f} nats/image ({what}; a difference of bounds, "
                  f"not information)")
        other = r["test_terms_other_memory"] or {}
        for name, value in r["test_terms"].items():
            print(f"  {name + ':':36s} {value:8.2f}" + (f"   (other episode's memory: {other[name]:.2f})"
                                                      if name in other else ""))
        for line in pareto_lines(r["pareto_k"]):
            print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)
        if r["memory_gain"] is not None:
            print(f"memory gain (other memory - own):      {r['memory_gain']:.2f} nats/image")
            print(f"NLL of the mean memory read at the posterior-mean keys: {r['read_nll']:.2f} own memory, "
                  f"{r['read_nll_other']:.2f} another episode's")
            print(f"random-key samples nearest to their own episode's images: {r['sample_nearest_own']:.1%} "
                  f"(chance 50%); nearest-image distance {r['sample_distance_own']:.4f} own, "
                  f"{r['sample_distance_other']:.4f} another episode's")
        if r["episode_classes"] is not None:
            print(f"random-key samples whose nearest test image is of one of their episode's classes: "
                  f"{r['sample_nearest_in_classes']:.1%} (chance {r['sample_nearest_in_classes_chance']:.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
