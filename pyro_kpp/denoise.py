"""Denoising by iterative reading: ``python -m pyro_kpp.denoise RUN_DIR --noise NAME [--level L]``.

K++ §4.1 (Fig. 6 right: salt-and-pepper, speckle and Poisson noise, ten clean-up steps) and
KM §4.3 (Fig. 3 right: randomly placed 12 x 12 blocks). For each test episode:

1. corrupt the clean grey images with the noise (``pyro_kpp.data.noise``); for a binary model,
   binarize clean and noisy images with shared uniforms (``noise.binarize_pair``), for an
   8-bit model quantise both to 8 bits;
2. write the memory from the *noisy* episode (the realistic case: only corrupted data are at
   hand; ``--write-from clean`` writes the clean episode instead, an upper bound on what a
   clean memory can add);
3. read iteratively from the noisy images (``pyro_kpp.reading.iterative.iterative_read``) for
   ``--steps`` steps, and score each step's reconstruction against the *clean* images:

   * ``log p(clean | reconstruction)``: the log-likelihood of the clean image under the
     likelihood parameters read at that step, nats/image (higher is better);
   * ``pixel error``: mean |x_hat - x_clean| over pixels, where x_hat is the reconstruction's
     mode for binary data (probability > 1/2; the error is then the fraction of wrong pixels)
     and its mean for 8-bit data. The "noisy" row gives the pixel error of the input itself.

The test split is the data set's test split in its fixed test-episode order (``Episodes``);
the figure shows the first episode: clean, noisy, then every step's mean reconstruction.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from pyro_kpp import data as data_lib
from pyro_kpp.cliargs import check_options, finite_float, positive_int
from pyro_kpp.data.episodes import Episodes, test_batches
from pyro_kpp.data.noise import NOISES, binarize_pair, corrupt, get_noise
from pyro_kpp.models.base import EpisodicModel
from pyro_kpp.reading.iterative import FEEDBACKS, MAX_READ_STEPS, IterativeReading, check_steps, iterative_read
from pyro_kpp.train.checkpoint import load_checkpoint, model_from_state
from pyro_kpp.viz.grids import png_path, rows_figure, save_figure

WRITE_FROM = ("noisy", "clean")


def corrupt_episodes(model: EpisodicModel, grey: torch.Tensor, noise: str, level: float | None = None,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, noisy) model inputs from clean grey images in [0, 1] (see the module docstring)."""
    noisy = corrupt(grey, noise, level, generator)
    if model.likelihood.binarized:
        return binarize_pair(grey, noisy, generator)
    return (grey * 255).round() / 255, (noisy * 255).round() / 255


def reconstruction_estimate(model: EpisodicModel, params: torch.Tensor) -> torch.Tensor:
    """The point estimate scored by the pixel error: the mode of a binary model, else the mean."""
    mean = model.likelihood.mean(params)
    return (mean > 0.5).to(mean.dtype) if model.likelihood.binarized else mean


def pixel_error(estimate: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel difference per image: (..., C, H, W) -> (...)."""
    return (estimate - clean).abs().mean(dim=(-3, -2, -1))


def clean_log_likelihood(model: EpisodicModel, params: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """ln p(x_clean | params) per image: params (..., C', H, W), clean (..., C, H, W) -> (...)."""
    return model.likelihood.dist(params).log_prob(clean)


@torch.no_grad()
def denoise_episodes(model: EpisodicModel, clean: torch.Tensor, noisy: torch.Tensor, steps: int,
                     write_from: str = "noisy", feedback: str = "sample",
                     generator: torch.Generator | None = None, tick=None) -> IterativeReading:
    """Write the memory (from the noisy episodes by default) and read iteratively from the noisy
    images; ``tick()`` after each step."""
    if write_from not in WRITE_FROM:
        raise ValueError(f"write_from: expected one of {WRITE_FROM}, got {write_from!r}")
    memory = model.write(noisy if write_from == "noisy" else clean)
    return iterative_read(model, memory, noisy, steps, feedback, generator=generator, tick=tick)


@dataclass
class DenoiseScores:
    """Sums over the images scored so far; ``summary()`` gives per-image means."""

    steps: int
    images: int = 0
    noisy_error: float = 0.0
    log_likelihood: list[float] = field(default_factory=list)
    error: list[float] = field(default_factory=list)

    def add(self, model: EpisodicModel, reading: IterativeReading, clean: torch.Tensor, noisy: torch.Tensor) -> None:
        ll = clean_log_likelihood(model, reading.params, clean)                       # (n, B, T)
        err = pixel_error(reconstruction_estimate(model, reading.params), clean)      # (n, B, T)
        if not self.log_likelihood:
            self.log_likelihood, self.error = [0.0] * self.steps, [0.0] * self.steps
        for i in range(self.steps):
            self.log_likelihood[i] += float(ll[i].sum())
            self.error[i] += float(err[i].sum())
        self.noisy_error += float(pixel_error(noisy, clean).sum())
        self.images += clean.shape[0] * clean.shape[1]

    def summary(self) -> dict:
        n = self.images
        if n == 0:
            raise ValueError("denoise: no test images were scored")
        return {"images": n, "noisy_pixel_error": self.noisy_error / n,
                "steps": [{"step": i + 1, "log_likelihood": self.log_likelihood[i] / n,
                           "pixel_error": self.error[i] / n} for i in range(self.steps)]}


@torch.no_grad()
def evaluate_denoising(model: EpisodicModel, grey_batches, noise: str, level: float | None = None,
                       steps: int = 10, write_from: str = "noisy", feedback: str = "sample",
                       generator: torch.Generator | None = None, show: int = 8, tick=None):
    """Corrupt, write, read iteratively and score every batch of clean grey episodes (B, T, C, H, W);
    ``tick()`` after every step of every batch (a progress bar's ETA from the first step).

    Returns (summary, rows, labels): the per-image means of ``DenoiseScores.summary`` and the
    figure rows of the first episode (clean, noisy, each step's mean reconstruction).
    """
    scores = DenoiseScores(steps)
    rows = None
    for grey in grey_batches:
        clean, noisy = corrupt_episodes(model, grey, noise, level, generator)
        reading = denoise_episodes(model, clean, noisy, steps, write_from, feedback, generator, tick)
        scores.add(model, reading, clean, noisy)
        if rows is None:
            rows = [clean[0, :show], noisy[0, :show], *reading.means()[:, 0, :show]]
    labels = ["clean", "noisy"] + [f"step {i}" for i in range(1, steps + 1)]
    return scores.summary(), rows, labels


def format_table(summary: dict) -> str:
    lines = [f"{'step':>5}  {'log p(clean | recon.) nats/image':>33}  {'pixel error':>11}",
             f"{'noisy':>5}  {'-':>33}  {100 * summary['noisy_pixel_error']:>10.2f}%"]
    for s in summary["steps"]:
        lines.append(f"{s['step']:>5}  {s['log_likelihood']:>33.2f}  {100 * s['pixel_error']:>10.2f}%")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyro_kpp.denoise", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="noises and levels:\n" + "\n".join(
                                    f"  {n.name}: --level = {n.level_name} (default {n.default_level}), {n.help}"
                                    for n in NOISES.values()))
    p.add_argument("run_dir", help="run directory (or checkpoint file)")
    p.add_argument("--noise", required=True, choices=sorted(NOISES))
    p.add_argument("--level", type=finite_float, default=None, help="noise level (meaning depends on the noise, see below)")
    p.add_argument("--steps", type=int, default=10, help=f"iterative-reading steps (K++ Fig. 6: 10; at most "
                                                         f"{MAX_READ_STEPS}, every step is kept)")
    p.add_argument("--episodes", type=int, default=None, help="test episodes to score (default: all)")
    p.add_argument("--write-from", choices=WRITE_FROM, default="noisy", help="episode the memory is written from")
    p.add_argument("--feedback", choices=FEEDBACKS, default="sample", help="what each step feeds back")
    p.add_argument("--out", default=None, help="PNG figure of the first test episode (default: none; "
                                               "'.png' is added to a name without a suffix)")
    p.add_argument("--show", type=positive_int, default=8, help="images of the first episode in the figure")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, binarization and feedback draws")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        noise = get_noise(args.noise)
        level = noise.default_level if args.level is None else args.level
        check_options([("--steps", lambda: check_steps(args.steps)),      # before the checkpoint and data are read
                       ("--out", lambda: args.out is None or png_path(args.out))])
        if args.episodes is not None and args.episodes < 1:
            raise ValueError(f"--episodes: expected a positive integer, got {args.episodes}")
        state = load_checkpoint(args.run_dir)
        model = model_from_state(state).eval()
        cfg = model.cfg
        data = data_lib.load_dataset(cfg.data, args.data_dir if args.data_dir is not None else cfg.data_dir)
        check_options([("--level", lambda: noise.apply(torch.zeros(1, *data.image_shape), level))])  # a blank image
        episodes = Episodes(data, cfg.episode_length, cfg.batch_size, seed=cfg.seed, binarize=False)
        gen = torch.Generator().manual_seed(args.seed)
        n_episodes = min(args.episodes or episodes.num_test_episodes(), episodes.num_test_episodes())
        bar = tqdm(desc=f"denoising: batches x steps ({args.steps} steps)", unit="step", disable=args.json,
                   total=math.ceil(n_episodes / cfg.batch_size) * args.steps, dynamic_ncols=True)
        with bar:
            summary, rows, labels = evaluate_denoising(model, test_batches(episodes, args.episodes), args.noise,
                                                       level, args.steps, args.write_from, args.feedback, gen,
                                                       args.show, tick=bar.update)
        out = None if args.out is None else save_figure(rows_figure(rows, labels), png_path(args.out), dpi=100)
    except (ValueError, TypeError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    header = {"noise": args.noise, noise.level_name: level, "write_from": args.write_from,
              "feedback": args.feedback, "seed": args.seed, "checkpoint_step": state.get("step"),
              "checkpoint_epochs_completed": state.get("epoch"), "episode_length": cfg.episode_length}
    if args.json:
        print(json.dumps({**header, **summary}))
    else:
        print(f"denoising {args.noise} ({noise.level_name}={level}) on {summary['images']} test images; "
              f"memory written from the {args.write_from} episodes; feedback={args.feedback}; "
              f"checkpoint at step {state.get('step')}, {state.get('epoch')} complete epochs")
        print(format_table(summary))
        if out is not None:
            print(f"figure: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
