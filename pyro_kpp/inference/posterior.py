"""Looking inside a trained model: posterior draws, KL terms, importance-weight diagnostics, read windows.

* :func:`posterior_draws` runs the guide and the model (replayed on the guide's draws) under a
  ``particles`` plate, as ``pyro_kpp.inference.bound.log_weights`` does, and keeps from the *same* draws:
  the samples of every latent site of the guide that lives in the ``images`` plate (for K++:
  the keys y and the codes z of q(y, z | X)), each image's KL term per latent site, and each
  image's log importance weight ln p(x_t, y, z | M) - ln q(y, z | X).
* KL terms (K++ eq. 4): KL(q(y_t|X) || p(y_t)) and E_q(y)[KL(q(z_t|X) || p(z_t|M, y_t))]; each is
  the closed-form KL between the guide's and the model's distribution at a site, averaged over
  the particles (the model's distribution of z depends on the sampled keys). Sites without a
  closed form use the Monte Carlo estimate ln q - ln p. Episode-level sites (a latent memory)
  are spread evenly over the episode's T images, as in ``pyro_kpp.inference.bound``.
* :func:`to_inference_data` turns the draws of one episode into an ArviZ ``InferenceData``
  (``az.from_dict``): group ``posterior`` with dims (chain, draw, image, *event dims) and
  group ``sample_stats`` with the log importance weights (chain, draw, image).
* :func:`pareto_k`: the Pareto-k diagnostic of PSIS (``az.psislw``) of each image's S
  importance weights: k < 0.5 means the guide is a good proposal for that image's posterior,
  k > 0.7 that importance-weighted estimates for it are unreliable (Vehtari et al., 2024).
* :func:`window_rectangles` / :func:`draw_windows` / :func:`plot_memory`: where a K++ key reads
  in the block memory (K++ §3.2 eq. 5, Appendix A; see ``pyro_kpp.maths.spatial``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from pyro.distributions.kl import kl_divergence
from pyro.poutine.util import site_is_subsample

from pyro_kpp.inference.bound import particle_traces
from pyro_kpp.inference.handlers import reuse_embedding
from pyro_kpp.maths.spatial import key_to_theta
from pyro_kpp.models.base import EpisodicModel


@dataclass
class PosteriorDraws:
    """S joint draws from the guide for B episodes of T images, and what they give."""

    samples: dict[str, torch.Tensor]  # latent site -> (S, B, T, *event), sites in the images plate
    kl: dict[str, torch.Tensor]       # latent site -> (B, T) KL term, nats/image
    log_weights: torch.Tensor         # (S, B, T)


def _in_images(site) -> bool:
    return any(f.name == "images" for f in site["cond_indep_stack"])


def _site_kl(q_site, p_site) -> torch.Tensor:
    try:
        return kl_divergence(q_site["fn"], p_site["fn"])
    except NotImplementedError:
        return q_site["log_prob"] - p_site["log_prob"]


@torch.no_grad()
def posterior_draws(model: EpisodicModel, x: torch.Tensor, samples: int = 100,
                    seed: int | None = None) -> PosteriorDraws:
    """``samples`` draws of every latent from the guide for episodes x (B, T, C, H, W)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected a positive integer, got {samples!r}")
    B, T = model.check_episode(x, "x")
    S = samples
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        with reuse_embedding():
            model_tr, guide_tr, log_w = particle_traces(model, x, S)
    draws, kl = {}, {}
    for name, site in guide_tr.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        term = _site_kl(site, model_tr.nodes[name])               # (S, B, T) or (S, B, 1)
        if _in_images(site):
            draws[name] = site["value"].expand(S, B, T, *site["fn"].event_shape)
        else:
            term = term / T                                       # an episode's KL, shared by its T images
        kl[name] = term.expand(S, B, T).mean(0)                   # (B, T)
    return PosteriorDraws(draws, kl, log_w)


def to_inference_data(draws: PosteriorDraws, episode: int = 0, event_dims: dict[str, list[str]] | None = None,
                      coords: dict[str, list] | None = None):
    """An ArviZ InferenceData of one episode's draws: one chain, S draws, dims (image, *event dims).

    ``event_dims`` names the event dims of a site (e.g. ``{"keys": ["read", "component"]}``;
    default ``<site>_dim_<i>``), ``coords`` gives coordinates for any dim (e.g.
    ``{"component": ["s", "x", "y"]}``).
    """
    import arviz as az

    S, B, T = draws.log_weights.shape
    if not 0 <= episode < B:
        raise ValueError(f"episode: expected an episode index in 0..{B - 1}, got {episode!r}")
    event_dims = event_dims or {}
    posterior, dims = {}, {"log_weight": ["image"]}
    for name, value in draws.samples.items():
        v = value[:, episode].unsqueeze(0).cpu().numpy()          # (1, S, T, *event)
        names = event_dims.get(name, [f"{name}_dim_{i}" for i in range(v.ndim - 3)])
        if len(names) != v.ndim - 3:
            raise ValueError(f"event_dims: site {name!r} has {v.ndim - 3} event dims, got names {names}")
        posterior[name] = v
        dims[name] = ["image", *names]
    stats = {"log_weight": draws.log_weights[:, episode].unsqueeze(0).cpu().numpy()}  # (1, S, T)
    return az.from_dict(posterior=posterior, sample_stats=stats, dims=dims,
                        coords={"image": np.arange(T), **(coords or {})})


def pareto_k(log_weights: torch.Tensor) -> np.ndarray:
    """PSIS Pareto-k of each image's importance weights: (S, B, T) log weights -> (B, T)."""
    import arviz as az

    if log_weights.dim() != 3:
        raise ValueError(f"log_weights: expected shape (S, B, T), got {tuple(log_weights.shape)}")
    lw = log_weights.permute(1, 2, 0).double().cpu().numpy()    # (B, T, S): psislw wants samples last
    _, k = az.psislw(lw)
    return np.asarray(k)


# ---------------------------------------------------------------------------------------------
# Read windows on the K++ block memory
# ---------------------------------------------------------------------------------------------


def window_rectangles(keys: torch.Tensor, memory_hw: tuple[int, int], to_theta=key_to_theta) -> torch.Tensor:
    """Where each key reads: (left, top, width, height) in memory pixels, (..., 3) -> (..., 4).

    Pixel (i, j) covers [j, j+1) x [i, i+1). A key's window spans s [-1, 1] + (x, y) in the
    memory's normalised frame (``key_to_theta``), and with ``align_corners=False`` the
    normalised coordinate c lies at pixel coordinate (c + 1) W / 2; a mirrored window (s < 0)
    covers the same rectangle. ``to_theta`` maps keys to affine matrices: a K++ model's
    ``reader.theta`` (its ``key_map``); ``key_to_theta`` (tanh) by default.
    """
    H, W = memory_hw
    theta = to_theta(keys)                                        # (..., 2, 3)
    s = theta[..., 0, 0].abs()
    tx, ty = theta[..., 0, 2], theta[..., 1, 2]
    return torch.stack([(tx - s + 1) * W / 2, (ty - s + 1) * H / 2, s * W, s * H], -1)


def draw_windows(ax, keys: torch.Tensor, memory_hw: tuple[int, int], colors=None, label: str | None = None,
                 to_theta=key_to_theta):
    """Draw the windows of keys (N, 3) on an ``imshow`` of the memory (pixel centres at integers).

    Mirrored windows (s < 0) are dashed. Returns the matplotlib patches, in key order.
    """
    from matplotlib.patches import Rectangle

    keys = keys.reshape(-1, keys.shape[-1]).detach().cpu()
    rects = window_rectangles(keys, memory_hw, to_theta)
    mirrored = to_theta(keys)[:, 0, 0] < 0
    patches = []
    for i, ((left, top, width, height), flip) in enumerate(zip(rects.tolist(), mirrored.tolist())):
        color = colors[i % len(colors)] if colors is not None else "red"
        patch = Rectangle((left - 0.5, top - 0.5), width, height, fill=False, edgecolor=color, linewidth=1.5,
                          linestyle="--" if flip else "-", label=label if i == 0 else None)
        ax.add_patch(patch)
        patches.append(patch)
    return patches


def _to_theta(memory):
    """The key map of the K++ model that wrote ``memory`` (tanh for a bare tensor)."""
    reader = getattr(getattr(memory, "model", None), "reader", None)
    return reader.theta if reader is not None else key_to_theta


def _block_memory(memory) -> torch.Tensor:
    value = getattr(memory, "value", memory)
    if not isinstance(value, torch.Tensor) or value.dim() not in (3, 4):
        raise ValueError("memory: expected a block memory (C, H, W) or a K++ Memory; this model's memory "
                         "is not an image-like block")
    return value[0] if value.dim() == 4 else value                # (C, H, W) of the first episode


def plot_memory(memory, keys: torch.Tensor | None = None, cmap: str = "viridis", size: float = 3.0):
    """One panel per memory channel, with the read windows of ``keys`` (T, K, 3) drawn on each.

    ``memory``: a Memory (its first episode is shown) or a (C, H, W) tensor. Each image's K
    windows share a colour (tab10, cycling); dashed windows are mirrored.
    """
    import matplotlib.pyplot as plt

    m = _block_memory(memory).detach().cpu()
    C, H, W = m.shape
    fig, axes = plt.subplots(1, C, figsize=(size * C, size), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for c, ax in enumerate(axes[0]):
        im = ax.imshow(m[c].numpy(), cmap=cmap, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(f"channel {c}")
        ax.set_axis_off()
        if keys is not None:
            for t in range(keys.shape[0]):
                draw_windows(ax, keys[t], (H, W), colors=[colors[t % len(colors)]], to_theta=_to_theta(memory))
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
    fig.tight_layout()
    return fig


def plot_image_windows(memory, keys: torch.Tensor, images: torch.Tensor, cmap: str = "viridis",
                       size: float = 2.0):
    """One row per image: the image, and the memory (mean over channels) with that image's K windows.

    keys (T, K, 3), images (T, C, H, W) in [0, 1].
    """
    import matplotlib.pyplot as plt

    m = _block_memory(memory).detach().cpu().mean(0)
    H, W = m.shape
    T = images.shape[0]
    if keys.shape[0] != T:
        raise ValueError(f"keys: expected keys for the {T} images, got {tuple(keys.shape)}")
    fig, axes = plt.subplots(T, 2, figsize=(2 * size, size * T), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for t in range(T):
        axes[t, 0].imshow(images[t].detach().cpu().permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray",
                          vmin=0, vmax=1, interpolation="nearest")
        axes[t, 0].set_title(f"image {t}", fontsize=8)
        axes[t, 1].imshow(m.numpy(), cmap=cmap, interpolation="nearest")
        axes[t, 1].set_title("its windows on the memory (channel mean)", fontsize=8)
        draw_windows(axes[t, 1], keys[t], (H, W), colors=colors, to_theta=_to_theta(memory))
        axes[t, 1].set_xlim(-0.5, W - 0.5)
        axes[t, 1].set_ylim(H - 0.5, -0.5)
        for ax in axes[t]:
            ax.set_axis_off()
    fig.tight_layout()
    return fig


def kl_table(draws: PosteriorDraws, episode: int = 0):
    """Per-image KL terms of one episode as rows {image, <site>: KL, ..., total} (nats)."""
    B, T = draws.log_weights.shape[1:]
    if not 0 <= episode < B:
        raise ValueError(f"episode: expected an episode index in 0..{B - 1}, got {episode!r}")
    rows = []
    for t in range(T):
        row = {"image": t, **{name: float(v[episode, t]) for name, v in draws.kl.items()}}
        row["total"] = math.fsum(row[name] for name in draws.kl)
        rows.append(row)
    return rows
