"""Benchmark CLI: ``python -m pyro_kpp.bench [--quick] [--sections ...] [--out bench/results]``."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pyro_kpp.bench import measure
from pyro_kpp.bench.report import QUICK_NOTE, format_table, table_rows, write_plots
from pyro_kpp.bench.sections import DEFAULT_SECTIONS, SECTIONS, Context, jobs, profiled_steps, targets
from pyro_kpp.bench.sizes import Sizes
from pyro_kpp.data import load_dataset
from pyro_kpp.train.device import resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyro_kpp.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (gpu: K++ vs DKM at paper sizes, "
                        f"for --device cuda)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per measurement (default 5, quick 2)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of training per model in the quality section (default 60, quick 2)")
    p.add_argument("--eval-episodes", type=int, default=None,
                   help="test episodes for the quality section's bound (default 64, quick 2)")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="importance samples of the evaluation section (default 100, quick 2)")
    p.add_argument("--eval-test-episodes", type=int, default=None,
                   help="test episodes of the evaluation section (default: all 253, quick 2)")
    p.add_argument("--quality-settings", choices=("defaults", "eager"), default="defaults",
                   help="quality section: defaults = the training defaults (bf16 where native, channels-last: "
                        "the fastest measured); eager = plain float32")
    p.add_argument("--out", default="bench/results", help="output folder (bench.json, PNGs, profiles)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: checks the code paths, judges no "
                                                         "target (targets apply to the full sizes)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data-dir", default=None, help="data root (default: $PYRO_KPP_DATA)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_sections(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise ValueError(f"sections: expected a comma-separated subset of {','.join(SECTIONS)}, got {text!r}")
    return chosen


def positive(name: str, value, default):
    value = default if value is None else value
    if not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return value


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    sections = parse_sections(args.sections)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file; expected a folder for bench.json, plots and profiles")
    ctx = Context(sizes=Sizes(args.quick), data=load_dataset("omniglot", args.data_dir),
                  device=resolve_device(args.device),
                  repeats=int(positive("repeats", args.repeats, 2 if args.quick else 5)),
                  budget=positive("budget", args.budget, 2.0 if args.quick else 60.0),
                  eval_episodes=int(positive("eval_episodes", args.eval_episodes, 2 if args.quick else 64)),
                  eval_samples=int(positive("eval_samples", args.eval_samples, 2 if args.quick else 100)),
                  eval_test_episodes=int(positive("eval_test_episodes", args.eval_test_episodes, 2))
                  if args.quick or args.eval_test_episodes is not None else None,
                  quality_settings=args.quality_settings)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results: dict = {}
    todo = jobs(sections)
    bar = tqdm(todo, desc="bench", unit="measurement", disable=args.no_progress, file=sys.stderr)
    for job in bar:
        bar.set_postfix_str(f"{job.section}: {job.key}")
        torch._dynamo.reset()     # each job compiles its own models: no graphs (or recompile counts) carried over
        results.setdefault(job.section, {})[job.key] = job.run(ctx)
    verdicts = targets(results)
    for t in verdicts:
        if not t.met:                        # where a target is missed, show where the step's time goes
            for name, step in profiled_steps(t.name, ctx).items():
                table, top = measure.profile_table(step)
                path = out / f"profile_{t.name}_{name}.txt"
                path.write_text(table)
                t.profile[name] = {"table": path.name, "top_ops": top}
    report = {
        "command": "python -m pyro_kpp.bench " + " ".join(argv),
        "quick": args.quick, "sections": sections, "repeats": ctx.repeats, "budget_s": ctx.budget,
        "eval_episodes": ctx.eval_episodes, "eval_samples": ctx.eval_samples,
        "eval_test_episodes": ctx.eval_test_episodes, "quality_settings": ctx.quality_settings,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(ctx.device),
                        "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "results": results,
        "targets": [vars(t) for t in verdicts],
        "wall_seconds": round(time.time() - start, 1),
    }
    report["plots"] = [p.name for p in write_plots(results, out)]
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    if args.quick:
        print(QUICK_NOTE)
    print(format_table(table_rows(results, verdicts, quick=args.quick)))
    print(f"results: {out / 'bench.json'} ({report['wall_seconds']} s)")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args, argv)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
