"""Image corruptions for the denoising experiments (K++ §4.1 Fig. 6 right; KM §4.3 Fig. 3 right).

Every noise maps images with grey levels in [0, 1], shape (..., C, H, W), to corrupted grey
levels in [0, 1]. The papers name the noises but not their parameters; our definitions
(the usual ones, as in scikit-image's ``random_noise``) are:

* ``salt-and-pepper`` (level = ``amount``): each pixel, with probability ``amount``, is
  replaced by 0 or by 1 with equal probability. A replaced pixel that already had that value
  does not change, so on a binary image about ``amount / 2`` of the pixels flip.
* ``speckle`` (level = ``std``): multiplicative Gaussian noise, x + x n with
  n ~ N(0, std^2), clipped to [0, 1].
* ``poisson`` (level = ``peak``): x -> Poisson(peak x) / peak, clipped to [0, 1]; a pixel of
  grey level 1 is a Poisson count with mean ``peak``, so a *smaller* peak is *stronger* noise.
* ``blocks`` (level = ``count``): ``count`` squares of ``size`` x ``size`` pixels
  (KM §4.3: 12 x 12), placed uniformly at random wholly inside the image, set to ``fill``
  (default 1, ink: a visible occluder on Omniglot's dark background).

Speckle and Poisson noise are signal-dependent: a pixel of grey level 0 stays 0. On
Omniglot (ink on a zero background) they therefore erode the strokes and never add ink.

Binary data. A Bernoulli model needs binary images; ``binarize_pair`` binarizes the clean
and the corrupted grey images with the *same* uniform draws u (pixel = [u < grey level]), so
that zero noise leaves the binary image unchanged and every pixel that differs between the
clean and the noisy binary image differs because of the noise. Salt-and-pepper and blocks
commute with this binarization (their replaced pixels are exactly 0 or 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

KM_BLOCK_SIZE = 12  # KM §4.3: "randomly positioned 12x12 blocks"
#: Largest Poisson peak: at 10^6 the noise's standard deviation at grey level 1 is 1/1000, below one
#: 8-bit level (1/255), so a larger peak adds nothing visible; far larger ones overflow float32.
MAX_PEAK = 1e6


def _check_images(x: torch.Tensor, argname: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 3:
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{argname}: expected a float tensor of images (..., C, H, W), got {got}")
    if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError(f"{argname}: expected grey levels in [0, 1], got values in "
                         f"[{float(x.min()):.3g}, {float(x.max()):.3g}]")


def _uniform(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def salt_and_pepper(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each pixel with probability ``amount`` by 0 or 1 (equally likely)."""
    _check_images(x)
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount: expected a probability in [0, 1], got {amount!r}")
    replaced = _uniform(x, generator) < amount
    salt = _uniform(x, generator) < 0.5
    return torch.where(replaced, salt.to(x.dtype), x)


def speckle(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multiplicative Gaussian noise x (1 + n), n ~ N(0, std^2), clipped to [0, 1]."""
    _check_images(x)
    if not 0.0 <= std < math.inf:
        raise ValueError(f"std: expected a finite, non-negative standard deviation, got {std!r}")
    n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + x * std * n).clamp(0.0, 1.0)


def poisson(x: torch.Tensor, peak: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shot noise Poisson(peak x) / peak, clipped to [0, 1] (smaller ``peak``: more noise)."""
    _check_images(x)
    if not 0.0 < peak <= MAX_PEAK:
        raise ValueError(f"peak: expected a positive, finite count for grey level 1 of at most {MAX_PEAK:g} (its noise is "
                         f"then below one 8-bit level), got {peak!r}")
    counts = torch.poisson(x * peak, generator=generator)
    return (counts / peak).clamp(0.0, 1.0)


def blocks(x: torch.Tensor, count: float = 1, generator: torch.Generator | None = None,
           size: int = KM_BLOCK_SIZE, fill: float = 1.0) -> torch.Tensor:
    """``count`` randomly placed ``size`` x ``size`` squares per image set to ``fill`` (KM §4.3).

    Each square lies wholly inside the image; squares of one image may overlap; all channels
    of a pixel are covered together. ``count`` is at most the number of places a square fits,
    (H - size + 1)(W - size + 1): more squares than places only repeat places (and the
    (..., count, H, W) mask grows with count).
    """
    _check_images(x)
    if not math.isfinite(count) or float(count) != int(count) or count < 0:
        raise ValueError(f"count: expected a non-negative whole number of blocks, got {count!r}")
    H, W = x.shape[-2:]
    if not isinstance(size, int) or not 1 <= size <= min(H, W):
        raise ValueError(f"size: expected a block side between 1 and {min(H, W)} pixels, got {size!r}")
    places = (H - size + 1) * (W - size + 1)
    if count > places:
        raise ValueError(f"count: expected at most {places} blocks (the places a {size}x{size} block fits in a "
                         f"{H}x{W} image), got {count!r}")
    if not 0.0 <= fill <= 1.0:
        raise ValueError(f"fill: expected a grey level in [0, 1], got {fill!r}")
    lead = x.shape[:-3]
    n = int(count)
    top = torch.randint(0, H - size + 1, (*lead, n, 1, 1), generator=generator, device=x.device)
    left = torch.randint(0, W - size + 1, (*lead, n, 1, 1), generator=generator, device=x.device)
    rows = torch.arange(H, device=x.device).view(H, 1)
    cols = torch.arange(W, device=x.device).view(1, W)
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)  # (..., n, H, W)
    covered = inside.any(dim=-3).unsqueeze(-3)                                            # (..., 1, H, W)
    return torch.where(covered, torch.full_like(x, fill), x)


@dataclass(frozen=True)
class Noise:
    """A named corruption: ``apply(x, level, generator)`` with a documented default level."""

    name: str
    apply: Callable[..., torch.Tensor]
    level_name: str
    default_level: float
    help: str


# Default levels are ours (the papers give none): strong enough to be plainly visible on
# 28 x 28 Omniglot, weak enough that most characters stay recognisable.
NOISES = {
    n.name: n for n in [
        Noise("salt-and-pepper", salt_and_pepper, "amount", 0.1,
              "fraction of pixels replaced by 0 or 1 (about half of them flip)"),
        Noise("speckle", speckle, "std", 1.0, "std of the multiplicative Gaussian noise"),
        Noise("poisson", poisson, "peak", 2.0, f"Poisson count of a grey level 1 (smaller = noisier; at most {MAX_PEAK:g})"),
        Noise("blocks", blocks, "count", 1, f"number of {KM_BLOCK_SIZE}x{KM_BLOCK_SIZE} occluding blocks (at most the places one fits)"),
    ]
}


def get_noise(name: str) -> Noise:
    try:
        return NOISES[name]
    except KeyError:
        raise ValueError(f"noise: expected one of {sorted(NOISES)}, got {name!r}") from None


def corrupt(x: torch.Tensor, name: str, level: float | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply noise ``name`` at ``level`` (its default when None) to grey images in [0, 1]."""
    noise = get_noise(name)
    return noise.apply(x, noise.default_level if level is None else level, generator=generator)


def binarize_pair(clean: torch.Tensor, noisy: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Binarize clean and corrupted grey images with shared uniforms: ([u < clean], [u < noisy])."""
    _check_images(clean, "clean")
    _check_images(noisy, "noisy")
    if clean.shape != noisy.shape:
        raise ValueError(f"noisy: expected the shape of clean {tuple(clean.shape)}, got {tuple(noisy.shape)}")
    u = _uniform(clean, generator)
    return (u < clean).to(clean.dtype), (u < noisy).to(clean.dtype)
