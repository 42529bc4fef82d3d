"""``python -m pyro_kpp.generation RUN_DIR MODE --out FIGURE.png``: figures read from a memory
(see ``pyro_kpp.generation.figure_rows`` for the modes)."""
from __future__ import annotations

import argparse
import sys

import torch

from .. import data as data_lib
from ..api import load
from ..cliargs import check_options, finite_float, positive_int
from ..episodes import Episodes, class_episodes
from ..plots import png_path, rows_figure, save_figure
from . import FEEDBACKS, MAX_READ_STEPS, MAX_ROW, MODES, PERTURBATION_STD, check_row, check_steps, figure_rows


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
            x, _ = class_episodes(data, args.classes, T, seed=args.seed, binarize=binarize)
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
