"""Spatial-transformer reads from a block memory, f_ST(M, y) (K++ §3.2 eq. 5, Appendix A).

A key y = (y0, y1, y2) in R^3 becomes the affine transform

    theta = [[s, 0, x],
             [0, s, y]],   s = tanh(y0), x = tanh(y1), y = tanh(y2),

which maps the coordinates of an h x w output window into the memory's normalised
coordinate frame [-1, 1]^2 (centre (0, 0)); bilinear sampling (`grid_sample`) then reads
the window (Appendix A eq. 9).

Choices where the paper is silent (also in the README):

* **Squashing.** Appendix A says only that s, x and y are bounded to [-1, 1]. We use tanh
  on each key component: smooth, centred on the N(0, I) key prior, so a prior draw lands
  on windows of every scale and position. A negative s mirrors the window, as the affine
  form allows.
* **Out-of-range reads** (|x| + |s| > 1) read zeros (`padding_mode="zeros"`): there is no
  memory there, and no gradient flows anywhere from those taps.
* **align_corners=False**: pixels are squares covering [-1, 1]. With this convention a key
  whose s equals w / W and whose translation is on the pixel lattice reads an exact
  h x w block of the memory (`exact_window_keys` builds such keys; the tests rely on it).

Efficiency: all windows of an episode are sampled by a single `grid_sample` call against
that episode's memory: the per-window grids are stacked along the output's height, so the
memory is never copied per read, and only the memory cells under some window's bilinear
taps receive gradient (K++ §3.4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

KEY_DIM = 3  # (scale, x, y), K++ §3.2: y_tk in R^3
#: How a key becomes (s, x, y) (``Config.key_map``): "tanh" squashes each component (the default
#: reading of App. A); "uniform" maps the N(0, I) key prior to windows spread uniformly over
#: the memory, inside it, at scales within a band.
KEY_MAPS = ("tanh", "uniform")


def key_to_theta(keys: torch.Tensor, key_map: str = "tanh", scales: tuple[float, float] = (0.125, 0.375)) -> torch.Tensor:
    """Affine matrices (..., 2, 3) from keys (..., 3).

    * ``"tanh"``: s, x, y = tanh(y0), tanh(y1), tanh(y2).
    * ``"uniform"``: with u = Phi(y) the standard normal CDF (uniform on (0, 1) under the key
      prior), s = s_min + (s_max - s_min) u0 with ``scales`` = (s_min, s_max), and
      x, y = (1 - s)(2 u - 1): every window lies inside the memory, a prior key lands anywhere
      in it with the same density, and the scale varies over a band only (K++'s models set it
      around window / memory size, one memory pixel per window pixel: ``Config.key_scale_min``,
      ``key_scale_max``).
    """
    if key_map == "tanh":
        s, tx, ty = torch.tanh(keys).unbind(-1)
    elif key_map == "uniform":
        u0, u1, u2 = torch.special.ndtr(keys).unbind(-1)
        s = scales[0] + (scales[1] - scales[0]) * u0
        tx, ty = (1 - s) * (2 * u1 - 1), (1 - s) * (2 * u2 - 1)
    else:
        raise ValueError(f"key_map: expected one of {KEY_MAPS}, got {key_map!r}")
    zero = torch.zeros_like(s)
    return torch.stack(
        [torch.stack([s, zero, tx], -1), torch.stack([zero, s, ty], -1)], -2
    )


def exact_window_keys(top: int, left: int, window: tuple[int, int], memory_hw: tuple[int, int]):
    """The key that reads memory[..., top:top+h, left:left+w] exactly (square windows only).

    With align_corners=False, output pixel i samples memory pixel i + (t - s + 1) W / 2,
    so s = w / W and t = 2 * offset / W + s - 1 put the taps on pixel centres.
    """
    (h, w), (H, W) = window, memory_hw
    if h / H != w / W:
        raise ValueError("exact_window_keys needs h / H == w / W (one scale s for both axes)")
    s = w / W
    tx = 2.0 * left / W + s - 1.0
    ty = 2.0 * top / H + s - 1.0
    return torch.atanh(torch.tensor([s, tx, ty], dtype=torch.float64)).float()


class SpatialTransformerRead(PyroModule):
    """f_ST: read K windows of size h x w per image from a (B, C, H, W) memory.

    ``forward(memory, keys)`` takes keys of shape (..., B, T, K, 3) (any leading sample
    dimensions, e.g. importance particles) and returns windows (..., B, T, K, C, h, w).
    ``key_map`` and ``scales`` say how keys become windows (``key_to_theta``).
    """

    def __init__(self, window: tuple[int, int], key_map: str = "tanh", scales: tuple[float, float] = (0.125, 0.375)):
        super().__init__()
        self.window = tuple(window)
        self.key_map = key_map
        self.scales = tuple(scales)

    def theta(self, keys: torch.Tensor) -> torch.Tensor:
        """The affine matrices (..., 2, 3) of keys (..., 3) under this reader's key map."""
        return key_to_theta(keys, self.key_map, self.scales)

    def grid(self, keys: torch.Tensor, B: int) -> torch.Tensor:
        """Sampling grid (B, n h, w, 2) of every window of keys (..., B, T, K, 3), stacked along height."""
        h, w = self.window
        if keys.shape[-4] != B or keys.shape[-1] != KEY_DIM:
            raise ValueError(
                f"keys: expected shape (..., {B}, T, K, {KEY_DIM}) for a memory of "
                f"{B} episodes, got {tuple(keys.shape)}"
            )
        flat = keys.movedim(-4, 0).reshape(B, -1, KEY_DIM)     # (B, n, 3), n = windows per episode
        n = flat.shape[1]
        theta = self.theta(flat).reshape(B * n, 2, 3)
        grid = F.affine_grid(theta, [B * n, 1, h, w], align_corners=False)  # (B n, h, w, 2)
        return grid.reshape(B, n * h, w, 2)

    def forward(self, memory: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        B, C = memory.shape[:2]
        h, w = self.window
        lead = keys.shape[:-4]                                  # leading sample dims
        inner = keys.movedim(-4, 0).shape[1:-1]                 # (..., T, K)
        out = F.grid_sample(memory, self.grid(keys, B), mode="bilinear", padding_mode="zeros",
                            align_corners=False)                # (B, C, n h, w)
        out = out.reshape(B, C, -1, h, w).movedim(2, 1)         # (B, n, C, h, w)
        out = out.reshape(B, *inner, C, h, w)                   # (B, ..., T, K, C, h, w)
        return out.movedim(0, len(lead))                        # (..., B, T, K, C, h, w)

    def adjoint(self, windows: torch.Tensor, keys: torch.Tensor, memory_hw: tuple[int, int]) -> torch.Tensor:
        """f_ST^T: scatter windows (B, T, K, C, h, w) into a (B, C, H, W) memory at keys (B, T, K, 3).

        The exact adjoint of ``forward`` for a fixed key: every window pixel is added to the
        memory cells of its four bilinear taps with the same weights the read uses (taps
        outside the memory are dropped, as the read's zero padding reads nothing from them), so
        <f_ST(M, y), V> = <M, f_ST^T(V, y)> for all M and V (tested). It is the addressed write
        of ``KanervaPlusPlus`` (``Config.kpp_write``): an image's block lands where its key reads.
        """
        B, C = windows.shape[0], windows.shape[-3]
        H, W = memory_hw
        g = self.grid(keys, B).reshape(B, -1, 2)                # (B, P, 2), P = T K h w
        values = windows.movedim(-3, 1).reshape(B, C, -1)       # (B, C, P), same pixel order as g
        px = ((g[..., 0] + 1) * W - 1) / 2                      # align_corners=False pixel coordinates
        py = ((g[..., 1] + 1) * H - 1) / 2
        x0, y0 = px.floor(), py.floor()
        memory = values.new_zeros(B, C, H * W)
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - (px - xi).abs()) * (1 - (py - yi).abs())                   # (B, P)
            inside = (xi >= 0) & (xi <= W - 1) & (yi >= 0) & (yi <= H - 1)
            index = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).long()              # (B, P)
            contrib = values * (weight * inside).unsqueeze(1)                           # (B, C, P)
            memory = memory.scatter_add(2, index.unsqueeze(1).expand(B, C, -1), contrib)
        return memory.reshape(B, C, H, W)
