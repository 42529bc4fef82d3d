"""Image grids written during training and by the API (PNG, via torchvision)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from pyro import poutine

from pyro_kpp.inference.handlers import reuse_embedding
from pyro_kpp.models.base import EpisodicModel


def png_path(out: str | os.PathLike) -> Path:
    """Where a figure asked for as ``out`` is written by ``save_figure``: a name without a suffix
    gets '.png' (as matplotlib would add silently), so the path a CLI prints is the file it wrote;
    a folder, a missing folder or another suffix is refused (the figure is always a PNG)."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"out: {path} is a folder; expected a PNG file name, e.g. {path / 'figure.png'}")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    elif path.suffix.lower() != ".png":
        raise ValueError(f"out: expected a .png file name (the figure is a PNG), got {str(out)!r}")
    if not path.parent.is_dir():
        raise ValueError(f"out: the folder {path.parent} does not exist")
    return path


def save_figure(fig, out: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG through a temporary file and a rename, so a reader (or a
    crash) never sees half a file; closes the figure."""
    import matplotlib.pyplot as plt

    out = Path(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")   # labels never clipped
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out


def save_labelled_rows(rows: list[torch.Tensor], labels: list[str], path: str | Path) -> Path:
    """``rows`` as one grid with a label left of each row (``rows_figure``), saved as PNG."""
    return save_figure(rows_figure(rows, labels), path)


def rows_figure(rows: list[torch.Tensor], labels: list[str] | None = None, scale: float = 0.5):
    """A matplotlib figure of image rows (each (N, C, H, W) in [0, 1]), a label left of each row.

    One image of the whole grid (so it stays fast for many rows), for the run's image grids,
    notebooks and the figures of the generation and denoising commands.
    """
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"labels: expected one label per row ({len(rows)}), got {len(labels)}")
    n = min(r.shape[0] for r in rows)
    grid = make_grid(torch.cat([r[:n].float().cpu() for r in rows]), nrow=n, padding=1, pad_value=0.5)
    h, w = rows[0].shape[-2:]
    fig, ax = plt.subplots(figsize=(scale * n * (w + 1) / 28 + 1.5, scale * len(rows) * (h + 1) / 28 + 0.2))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(h + 1) * (i + 0.5) for i in range(len(rows))], labels or [""] * len(rows))
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.tight_layout(pad=0.2)
    return fig


@torch.no_grad()
def reconstruction_rows(model: EpisodicModel, x: torch.Tensor, n: int = 16) -> list[torch.Tensor]:
    """Rows for the first ``n`` images of the first episode of ``x``:

    1. the data;
    2. the decoder's mean at a draw of z from the guide, z ~ q(z|X) (the training branch);
    3. the memory read: write the whole episode, infer each image's keys with the guide
       (posterior means), decode the prior mean code read at those keys (K++ §3.5).
    """
    x = x[:1]
    with reuse_embedding():
        z = poutine.trace(model.guide).get_trace(x).nodes["z"]["value"]          # (1, T, L)
    through_guide = model.likelihood.mean(model.decode(z))[0, :n]
    memory = model.write(x)
    params = model.generate(memory, model.infer_keys(x, memory), sample_z=False)
    return [x[0, :n], through_guide, model.likelihood.mean(params)[0, :n]]


@torch.no_grad()
def sample_rows(model: EpisodicModel, x: torch.Tensor, n: int = 16, rows: int = 4,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """``rows`` rows of samples read from the memory of the first episode with prior keys."""
    memory = model.write(x[:1])
    keys = model.prior_keys(memory, n * rows, generator=generator)
    probs = model.likelihood.mean(model.generate(memory, keys, generator=generator))[0]
    return list(probs.split(n))


#: The rows of ``reconstructions_*.png`` (``reconstruction_rows``).
RECONSTRUCTION_LABELS = ["data", "via q(z|X)", "read from memory"]


def write_images(model, x: torch.Tensor, run_dir: Path, epoch: int, seed: int) -> None:
    """An epoch's grids in ``run_dir/images``: reconstructions of the episodes x, and samples read
    at prior keys (drawn with ``seed``, so every epoch shows the same keys)."""
    images = run_dir / "images"
    images.mkdir(exist_ok=True)
    was_training = model.training
    model.eval()
    save_labelled_rows(reconstruction_rows(model, x), RECONSTRUCTION_LABELS, images / f"reconstructions_{epoch:04d}.png")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    samples = sample_rows(model, x, generator=gen)
    save_labelled_rows(samples, ["read at y ~ p(y)"] * len(samples), images / f"samples_{epoch:04d}.png")
    model.train(was_training)
