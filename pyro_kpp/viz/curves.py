"""Training curves and a comparison table (the command line: ``python -m pyro_kpp.plot``).

Draws each run's bounds (train and test, or validation when the run used ``--valid-images``)
over epochs (over steps when a run stopped inside an epoch) and over training time, one colour
per run, plus the per-step loss of runs trained with ``--log-steps``; prints one table row per
run. Training writes the same figure for its own run as ``curves.png`` at every epoch; the CLI
writes several runs' figure beside them (``default_out``), never into the current folder. Reads only ``metrics.jsonl`` / ``steps.jsonl`` (and
``config.json``), so it works on a run that is still training.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pyro_kpp.viz.grids import save_figure


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a metrics file (a line being written is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_metrics(run: str | os.PathLike) -> tuple[list[dict], str]:
    """A run's per-epoch records and the split they were evaluated on ("valid" or "test")."""
    path = Path(run)
    if not path.is_dir():
        raise ValueError(f"RUN: expected a run directory (with metrics.jsonl), got {run}")
    records = read_jsonl(path / "metrics.jsonl")
    if not records:
        raise ValueError(f"RUN: {run} has no epoch in metrics.jsonl yet")
    return records, "valid" if "valid_bound" in records[-1] else "test"


def _epochs_done(r: dict) -> int:
    """Complete epochs at a record (``epoch`` is the index of the epoch it closes or cuts short)."""
    return r["epoch"] + (1 if r.get("epoch_complete", True) else 0)


def progress_axis(runs: list[str | os.PathLike]) -> str:
    """"epoch" when every record of every run closes a complete epoch, else "step": a run stopped
    inside an epoch (``--max-steps``, ``--max-minutes``) has no honest epoch count to plot at
    (a 100-step run would sit at "epoch 1.5"), while steps are exact for every record."""
    complete = all(r.get("epoch_complete", True) for run in runs for r in run_metrics(run)[0])
    return "epoch" if complete else "step"


def draw(runs: list[str | os.PathLike], ymax: float | None = None):
    """The figure: bounds over epochs (steps, see ``progress_axis``), over training minutes and
    (when logged) per step; a run that records the leave-one-out bound (``--objective held-out``)
    also draws it, dotted. ``ymax`` caps the bound axes (a spike would flatten every curve)."""
    import matplotlib.pyplot as plt

    axis = progress_axis(runs)
    with_steps = [r for r in runs if (Path(r) / "steps.jsonl").exists()]
    fig, axes = plt.subplots(1, 3 if with_steps else 2, figsize=(13 if with_steps else 9, 3.6), squeeze=False)
    axes = axes[0]
    for i, run in enumerate(runs):
        records, split = run_metrics(run)
        colour, name = f"C{i % 10}", Path(run).name
        for ax, x in ((axes[0], [_epochs_done(r) if axis == "epoch" else r["step"] for r in records]),
                      (axes[1], [r["train_seconds_total"] / 60 for r in records])):
            ax.plot(x, [r[f"{split}_bound"] for r in records], "-o", ms=3, color=colour, label=f"{name} {split}")
            ax.plot(x, [r["train_bound"] for r in records], "--", color=colour, label=f"{name} train")
            if f"{split}_loo_bound" in records[-1]:        # a held-out run: what its objective is for
                ax.plot(x, [r.get(f"{split}_loo_bound") for r in records], ":", color=colour,
                        label=f"{name} {split} leave-one-out")
        if run in with_steps:
            steps = read_jsonl(Path(run) / "steps.jsonl")
            axes[2].plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.6, color=colour, label=name)
    for ax, label in zip(axes, ("epochs" if axis == "epoch" else "step", "training time (minutes)", "step")):
        ax.set_xlabel(label)
        ax.set_ylabel("negative bound (nats/image)" if ax is not axes[-1] or not with_steps
                      else "training objective per step")
        ax.grid(alpha=0.3)
        if ymax is not None and (ax is not axes[-1] or not with_steps):
            low = min((y for line in ax.lines for y in line.get_ydata() if y is not None and y < ymax), default=ymax - 1)
            ax.set_ylim(low - 0.05 * (ymax - low), ymax)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_curves(runs: list[str | os.PathLike], out: str | os.PathLike, ymax: float | None = None) -> Path:
    """Draw ``runs`` into ``out`` (PNG; never half-written), the bound axes capped at ``ymax`` if given."""
    return save_figure(draw(runs, ymax), out)


def save_curves_or_warn(run_dir: Path) -> None:
    """Redraw a training run's ``curves.png``; a figure that fails (a damaged metrics line, a
    plotting error) is a warning, never the end of training, whose checkpoint is still to be saved."""
    try:
        save_curves([run_dir], run_dir / "curves.png")
    except Exception as exc:  # noqa: BLE001 - whatever matplotlib or a bad record raises
        print(f"warning: could not draw {run_dir / 'curves.png'} ({type(exc).__name__}: {exc}); training goes on",
              file=sys.stderr, flush=True)


def table(runs: list[str | os.PathLike]) -> str:
    """One row per run: model, data, epochs, steps, training time, last train bound, best and last
    evaluation bound (test, or validation for runs with ``--valid-images``)."""
    head = f"{'run':32s} {'model':6s} {'data':14s} {'epochs':>6s} {'steps':>7s} {'minutes':>8s} " \
           f"{'train':>8s} {'split':5s} {'best':>8s} {'last':>8s}"
    lines = [head, "-" * len(head)]
    for run in runs:
        records, split = run_metrics(run)
        cfg_path = Path(run) / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        last = records[-1]
        lines.append(f"{Path(run).name[:32]:32s} {cfg.get('model', '?'):6s} {cfg.get('data', '?'):14s} "
                     f"{_epochs_done(last):6d} {last['step']:7d} {last['train_seconds_total'] / 60:8.1f} "
                     f"{last['train_bound']:8.2f} {split:5s} {min(r[f'{split}_bound'] for r in records):8.2f} "
                     f"{last[f'{split}_bound']:8.2f}")
    return "\n".join(lines)


def default_out(runs: list[str | os.PathLike]) -> Path:
    """Where the figure goes without ``--out``: ``RUN/curves.png`` for one run (training writes the
    same file); for several, beside the runs, ``curves-A-vs-B.png`` in the first run's parent
    folder, never the current folder (a clone's root would collect untracked figures)."""
    first = Path(runs[0])
    if len(runs) == 1:
        return first / "curves.png"
    return first.resolve().parent / f"curves-{'-vs-'.join(Path(r).resolve().name for r in runs)}.png"
