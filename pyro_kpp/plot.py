"""``python -m pyro_kpp.plot RUN [RUN ...] [--out FIG.png]`` (``pyro-kpp-plot``): training curves
and a comparison table of runs (``pyro_kpp.viz.curves``). Reads only ``metrics.jsonl`` /
``steps.jsonl`` (and ``config.json``), so it works on a run that is still training."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from pyro_kpp.viz.curves import default_out, save_curves, table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyro_kpp.plot", description="Training curves and a comparison table of runs.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", help="figure to write (default: RUN/curves.png for one run; for several, "
                                 "curves-A-vs-B.png beside the first run)")
    p.add_argument("--ymax", type=float, help="upper limit of the bound axes, for curves with a spike "
                                              "(the table still shows every run's best and last bound)")
    args = p.parse_args(argv)
    if args.ymax is not None and not math.isfinite(args.ymax):
        p.error(f"--ymax: expected a finite number of nats/image, got {args.ymax}")
    out = Path(args.out) if args.out else default_out(args.runs)
    try:
        text = table(args.runs)
        save_curves(args.runs, out, ymax=args.ymax)
    except (ValueError, OSError) as exc:
        p.exit(2, f"error: {exc}\n")
    print(text)
    print(f"figure written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
