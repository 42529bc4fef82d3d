"""``python -m pyro_kpp.generation RUN_DIR MODE --out FIGURE.png``: figures read from a memory
(``figure_rows`` below lists the modes, each with the paper figure it reproduces). The reading
itself (iterative reading, clean-up, interpolation) is in ``pyro_kpp.reading.iterative``."""
from __future__ import annotations

import argparse
import sys

import torch

from pyro_kpp import data as data_lib
from pyro_kpp.api import load
from pyro_kpp.cliargs import check_options, finite_float, positive_int
from pyro_kpp.data.classes import class_split
from pyro_kpp.data.episodes import Episodes, class_episodes
from pyro_kpp.models.base import EpisodicModel, count
from pyro_kpp.reading.iterative import (FEEDBACKS, MAX_READ_STEPS, PERTURBATION_STD, check_steps,
                                        clean_up, interpolate, iterative_read, perturbed_keys)
from pyro_kpp.viz.grids import png_path, rows_figure, save_figure


#: Most images in a figure row (``figure_rows``' n): 64 images of 28 pixels are already 1,792 pixels wide.
MAX_ROW = 64


def check_row(n) -> int:
    """A number of images per figure row, 1 .. ``MAX_ROW``."""
    n = count("n", n)
    if n > MAX_ROW:
        raise ValueError(f"n: expected at most {MAX_ROW} images per row, got {n}")
    return n


MODES = ("random", "perturbed", "clean-up", "one-shot", "interpolate", "iterative-read")


@torch.no_grad()
def figure_rows(model: EpisodicModel, x: torch.Tensor, mode: str, n: int = 8, steps: int = 10,
                feedback: str = "sample", std: float = PERTURBATION_STD,
                generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], list[str]]:
    """Image rows and their labels for one of ``MODES``, read from the memory of the first episode of x.

    * random: the episode, then 4 rows of generations from prior keys (K++ Fig. 8);
    * perturbed: 4 rows, each n perturbations y + eps of one prior key (K++ Fig. 7);
    * clean-up: generations from prior keys, then each clean-up step (K++ Fig. 6 left);
    * one-shot: as clean-up, under the conditioning episode (KM Fig. 4, for x from
      ``pyro_kpp.data.episodes.class_episodes``; the CLI draws it from the run's test classes,
      the evaluation alphabets for a run trained with ``--episode-classes``);
    * interpolate: up to 4 rows between the keys of images (0, 1), (2, 3), ... (KM §4.3);
    * iterative-read: the episode, then each step of reading it iteratively (K++ eq. 7).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    n = check_row(n)
    mean = model.likelihood.mean
    x = x[:1]
    memory = model.write(x)
    if mode == "random":
        keys = model.prior_keys(memory, n * 4, generator=generator)
        probs = mean(model.generate(memory, keys, sample_z=False))[0]
        return [x[0, :n], *probs.split(n)], ["episode", "random keys", "", "", ""]
    if mode == "perturbed":
        base = model.prior_keys(memory, 4, generator=generator)
        probs = mean(model.generate(memory, perturbed_keys(base, n, std, generator), sample_z=False))[0]
        return list(probs.split(n)), [f"key {r} + noise ({std})" for r in range(4)]
    if mode in ("clean-up", "one-shot"):
        keys = model.prior_keys(memory, n, generator=generator)
        probs = mean(clean_up(model, memory, keys, steps, feedback, generator=generator))[:, 0]
        head = [x[0, :n]] if mode == "one-shot" else []
        return head + list(probs), ["episode"] * len(head) + ["random keys"] + [
            f"step {s}" for s in range(1, steps + 1)]
    if mode == "interpolate":
        if x.shape[1] < 2:
            raise ValueError(f"x: interpolate needs episodes of at least 2 images, got {x.shape[1]}")
        pairs = [(2 * r, 2 * r + 1) for r in range(min(4, x.shape[1] // 2))]
        rows = [mean(interpolate(model, memory, x, a, b, n))[0] for a, b in pairs]
        return rows, [f"image {a} -> {b}" for a, b in pairs]
    reading = iterative_read(model, memory, x, steps, feedback, generator=generator)
    return [x[0, :n], *reading.means()[:, 0, :n]], ["episode"] + [f"step {s}" for s in range(1, steps + 1)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyro_kpp.generation", description=(
        "Figures read from a memory written from one test episode: random or perturbed-key "
        "generations, iterative clean-up, one-shot generation from an episode of a few "
        "characters, interpolation, iterative reading."))
    p.add_argument("run_dir", help="run directory (or checkpoint file)")
    p.add_argument("mode", choices=MODES)
    p.add_argument("--out", required=True, help="PNG file to write ('.png' is added to a name without a suffix)")
    p.add_argument("-n", type=positive_int, default=8, help=f"images per row (at most {MAX_ROW})")
    p.add_argument("--steps", type=positive_int, default=10, help=f"iterations (clean-up, one-shot, iterative-read; "
                                                                   f"at most {MAX_READ_STEPS}, every step is a row)")
    p.add_argument("--feedback", choices=FEEDBACKS, default="sample", help="what iterative reading feeds back")
    p.add_argument("--std", type=finite_float, default=PERTURBATION_STD, help="key perturbation std (perturbed)")
    p.add_argument("--classes", type=positive_int, default=2, help="characters in the one-shot episode (KM: 2, 4, 12)")
    p.add_argument("-T", "--episode-length", type=positive_int, default=None,
                   help="images in the written episode (default: the run's; one-shot: 12, as KM Fig. 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_options([("--out", lambda: png_path(args.out)), ("--steps", lambda: check_steps(args.steps)),
                       ("-n", lambda: check_row(args.n))])               # before the checkpoint and data are read
        model = load(args.run_dir)
        cfg = model.cfg
        data = data_lib.load_dataset(cfg.data, args.data_dir if args.data_dir is not None else cfg.data_dir)
        binarize = model.likelihood.binarized
        if args.mode == "one-shot":
            T = args.episode_length or 12
            # a run trained on class episodes is shown its own test classes (Omniglot: new alphabets)
            pool = class_split(data) if cfg.episode_classes is not None else data
            x, _ = class_episodes(pool, args.classes, T, seed=args.seed, binarize=binarize)
        else:
            T = args.episode_length or cfg.episode_length
            if args.mode == "interpolate" and T < 2:
                raise ValueError(f"--episode-length: interpolate needs episodes of at least 2 images, got {T}")
            x = next(iter(Episodes(data, T, 1, seed=args.seed, binarize=binarize).test_episodes()))
        gen = torch.Generator().manual_seed(args.seed)
        rows, labels = figure_rows(model, x, args.mode, args.n, args.steps, args.feedback, args.std, gen)
        out = save_figure(rows_figure(rows, labels), png_path(args.out), dpi=100)
    except (ValueError, TypeError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
