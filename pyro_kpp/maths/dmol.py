"""The discretized mixture of logistics over 8-bit images (Salimans et al., 2017, PixelCNN++ §2.1-2.2).

K++ §4 models continuous-valued (8-bit) data with this likelihood. Data are images in [0, 1]
on the 256-level grid ``k / 255``; internally the distribution works on y = 2x - 1 in [-1, 1],
as PixelCNN++ does, where level k sits at v_k = 2k/255 - 1 and owns the bin
[v_k - 1/255, v_k + 1/255]. The edge bins are open: level 0 gets all mass below v_0 + 1/255,
level 255 all mass above v_255 - 1/255, so the 256 probabilities of a sub-pixel sum to 1.

Per pixel (PixelCNN++ eq. 2-3), a mixture of K components shared by the pixel's C channels:

    p(x_pixel) = sum_k pi_k prod_c P(x_c | mu_kc + sum_{j<c} alpha_kcj y_j, s_kc),
    P(v | mu, s) = sigma((v + 1/255 - mu)/s) - sigma((v - 1/255 - mu)/s),

where sigma is the logistic CDF and the alpha_kcj = tanh(raw) are PixelCNN++'s channel-
autoregressive coefficients (channel c's location moves linearly with the observed values of
the earlier channels; for RGB: G <- R, B <- R, B <- G). A grey image (C = 1) has none.
Pixels are independent given the decoder's parameters: the decoder is not autoregressive over
space (K++ §4: "a simple convolutional decoder"), so the event is the whole (C, H, W) image.

Choices where the papers are silent or where this departs from PixelCNN++'s code:

* Stable log-probabilities without PixelCNN++'s mid-bin guard. PixelCNN++ subtracts two CDFs
  in float32 and, when the difference falls below 1e-5, substitutes the density at the bin
  centre times the bin width (an approximation). Here the bin mass is computed exactly in log
  space from  sigma(a) - sigma(b) = sigma(a) sigma(-b) (1 - e^{-(a-b)})  (a > b):

      ln P = ln sigma(a) + ln sigma(-b) + ln(1 - e^{-(a-b)}),   a - b = (2/255) / s,

  which never subtracts nearly equal numbers, so tiny probabilities keep full relative
  precision and the 256 probabilities sum to 1 up to rounding (no approximation to guard).
* Log-scales are clamped to [-7, 7]: -7 is PixelCNN++'s floor; 7 only keeps e^{-log s} away
  from float underflow (a scale of e^7 is over 500 times the data range).
* Sampling draws the component, then the channels in order, each a continuous logistic draw
  rounded to its bin (exactly the discretized distribution); the coefficients act on the
  *quantized* earlier channels, the values ``log_prob`` conditions on (PixelCNN++'s sampler
  uses the unquantized draw).
* ``mean`` is the mean of the underlying continuous (not yet discretized or clipped) mixture,
  clamped to [0, 1]: a point summary for image grids, not the mean of the 8-bit distribution.
"""
from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.nn import functional as F

LEVELS = 256                   # 8-bit data: values k / 255, k = 0..255
HALF_BIN = 1.0 / (LEVELS - 1)  # half a bin in y = 2x - 1 units (bins are 2/255 wide)
LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 7.0
GRID_TOLERANCE = 1e-3          # |255 x - round(255 x)| allowed for float images on the grid


def coefficient_count(channels: int) -> int:
    """Channel-autoregressive coefficients per component: one per pair j < c."""
    return channels * (channels - 1) // 2


def params_per_component(channels: int) -> int:
    """Mixture logit + C locations + C log-scales + C(C-1)/2 coefficients (RGB: 10, grey: 3)."""
    return 1 + 2 * channels + coefficient_count(channels)


def channels_from_params(param_channels: int, components: int) -> int:
    """Invert ``components * params_per_component(C)``: the image channels C of a parameter tensor."""
    per, rest = divmod(param_channels, components)
    c = round((math.sqrt(1 + 8 * per) - 3) / 2) if per >= 3 else 0  # root of C^2 + 3C + 2 - 2 per
    if rest or c < 1 or params_per_component(c) != per:
        raise ValueError(f"params: expected K * (1 + 2C + C(C-1)/2) channels for K={components} components "
                         f"(e.g. {components * params_per_component(1)} for grey, "
                         f"{components * params_per_component(3)} for RGB), got {param_channels}")
    return c


class _EightBitGrid(constraints.Constraint):
    """Values k / 255 for an integer k in 0..255 (to ``GRID_TOLERANCE`` levels)."""

    is_discrete = True

    def check(self, value: torch.Tensor) -> torch.Tensor:
        scaled = value * (LEVELS - 1)
        return (value >= 0) & (value <= 1) & ((scaled - scaled.round()).abs() <= GRID_TOLERANCE)


eight_bit = _EightBitGrid()


def _shifted_loc(loc: torch.Tensor, coeffs: torch.Tensor, earlier, c: int) -> torch.Tensor:
    """Location of channel c: mu_c + sum_{j<c} tanh(alpha_cj) y_j  (PixelCNN++ §2.2).

    loc (..., K, C, H, W), coeffs (..., K, C(C-1)/2, H, W); ``earlier[j]`` is channel j's value
    (..., H, W) or (..., K, H, W), for j < c. Returns (..., K, H, W).
    """
    shifted = loc[..., c, :, :]
    first = coefficient_count(c)                          # index of coefficient (c, 0)
    for j in range(c):
        shifted = shifted + torch.tanh(coeffs[..., first + j, :, :]) * earlier[j]
    return shifted


class DiscretizedLogisticMixture(TorchDistribution):
    """Mixture of discretized logistics over images in [0, 1] on the 8-bit grid; event shape (C, H, W).

    Parameters, with batch shape ``...``:
      logits (..., K, H, W) mixture logits per pixel; loc, log_scale (..., K, C, H, W) in
      y = 2x - 1 units; coeffs (..., K, C(C-1)/2, H, W) unconstrained (tanh is applied), in
      the order (c, j) for c = 1..C-1, j < c.
    """

    arg_constraints = {"logits": constraints.real, "loc": constraints.real,
                       "log_scale": constraints.real, "coeffs": constraints.real}
    support = constraints.independent(eight_bit, 3)
    has_rsample = False

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
                 coeffs: torch.Tensor, validate_args: bool | None = None):
        K, C, H, W = loc.shape[-4:]
        batch_shape = loc.shape[:-4]
        expected = {"logits": (logits, (K, H, W)), "log_scale": (log_scale, (K, C, H, W)),
                    "coeffs": (coeffs, (K, coefficient_count(C), H, W))}
        for name, (t, tail) in expected.items():
            if tuple(t.shape) != (*batch_shape, *tail):
                raise ValueError(f"{name}: expected shape {(*batch_shape, *tail)} to match loc {tuple(loc.shape)}, "
                                 f"got {tuple(t.shape)}")
        self.logits, self.loc, self.coeffs = logits, loc, coeffs
        self.log_scale = log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
        super().__init__(batch_shape, torch.Size((C, H, W)), validate_args=validate_args)

    @classmethod
    def from_params(cls, params: torch.Tensor, components: int,
                    validate_args: bool | None = None) -> "DiscretizedLogisticMixture":
        """From a decoder output (..., K * (1 + 2C + C(C-1)/2), H, W), laid out as
        [logits (K) | loc (K*C) | log_scale (K*C) | coeffs (K*C(C-1)/2)] along channels."""
        K = components
        C = channels_from_params(params.shape[-3], K)
        lead, (H, W) = params.shape[:-3], params.shape[-2:]
        logits, loc, log_scale, coeffs = params.split([K, K * C, K * C, K * coefficient_count(C)], dim=-3)
        return cls(logits,
                   loc.reshape(*lead, K, C, H, W),
                   log_scale.reshape(*lead, K, C, H, W),
                   coeffs.reshape(*lead, K, coefficient_count(C), H, W),
                   validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogisticMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        for name in ("logits", "loc", "log_scale", "coeffs"):
            t = getattr(self, name)
            setattr(new, name, t.expand(batch_shape + t.shape[len(self.batch_shape):]))
        super(DiscretizedLogisticMixture, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _conditional_loc(self, y: torch.Tensor) -> torch.Tensor:
        """Locations given the observed earlier channels, (..., K, C, H, W), from y (..., 1, C, H, W)."""
        C = self.event_shape[0]
        if C == 1:                      # no coefficients: skip the copy (the grey case is the hot path)
            return self.loc
        channels = y.unbind(-3)                                          # C x (..., 1, H, W)
        locs = torch.broadcast_tensors(*[_shifted_loc(self.loc, self.coeffs, channels, c) for c in range(C)])
        return torch.stack(locs, dim=-3)

    # -- distribution interface -------------------------------------------------------------
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """ln P(x) of images x (..., C, H, W) in [0, 1] on the 8-bit grid: (...)."""
        if self._validate_args:
            self._validate_sample(value)
        level = (value * (LEVELS - 1)).round()                           # (..., C, H, W) in 0..255
        y = (2 * HALF_BIN * level - 1).unsqueeze(-4)                     # (..., 1, C, H, W) exact grid
        inv_scale = torch.exp(-self.log_scale)                           # (..., K, C, H, W)
        centred = (y - self._conditional_loc(y)) * inv_scale
        half = HALF_BIN * inv_scale                                      # half a bin, standardized
        bottom, top = (level == 0).unsqueeze(-4), (level == LEVELS - 1).unsqueeze(-4)
        # ln(sigma(a) - sigma(b)) = ln sigma(a) + ln sigma(-b) + ln(1 - e^{-(a-b)}), a - b = 2 half;
        # the edge bins reach +inf (a = inf: sigma(a) = 1) or -inf (b = -inf: sigma(b) = 0), which
        # zeroes the last term too. ln(-expm1(-d)) is ln(1 - e^{-d}) to within float eps absolutely.
        upper = (centred + half).masked_fill(top, math.inf)
        lower = (centred - half).masked_fill(bottom, -math.inf)
        width = torch.log(-torch.expm1(-2 * half))
        log_bin = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.where(top | bottom, 0.0, width)
        log_mix = torch.log_softmax(self.logits, dim=-3) + log_bin.sum(-3)               # (..., K, H, W)
        return torch.logsumexp(log_mix, dim=-3).sum((-2, -1))                            # (...)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (*sample_shape, *batch_shape, C, H, W) in [0, 1] on the 8-bit grid."""
        shape = self._extended_shape(sample_shape)                       # (*S, *batch, C, H, W)
        lead, (C, H, W) = shape[:-3], shape[-3:]
        like = dict(dtype=self.loc.dtype, device=self.loc.device)

        def uniform(*size):
            return torch.rand(*size, generator=generator, **like).clamp_(1e-7, 1 - 1e-7)

        # The component of each pixel, by the Gumbel-max trick.
        k = (self.logits - uniform(*lead, *self.logits.shape[-3:]).log().neg().log()).argmax(-3, keepdim=True)

        def pick(t: torch.Tensor) -> torch.Tensor:  # (..., K, n, H, W) -> (*lead, 1, n, H, W) at component k
            t = t.expand(*lead, *t.shape[-4:])
            return t.gather(-4, k.unsqueeze(-3).expand(*lead, 1, t.shape[-3], H, W))

        loc, log_scale, coeffs = pick(self.loc), pick(self.log_scale), pick(self.coeffs)
        y = []                                                           # C x (*lead, 1, H, W)
        for c in range(C):
            u = uniform(*lead, 1, H, W)
            draw = _shifted_loc(loc, coeffs, y, c) + log_scale[..., c, :, :].exp() * (u.log() - (-u).log1p())
            level = ((draw + 1) / (2 * HALF_BIN)).round().clamp(0, LEVELS - 1)     # nearest bin
            y.append(2 * HALF_BIN * level - 1)
        return (torch.stack(y, dim=-3).squeeze(-4) + 1) / 2

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the continuous (undiscretized, unclipped) mixture, clamped to [0, 1]: (..., C, H, W).

        Per component, E[y_c | k] = mu_kc + sum_{j<c} alpha_kcj E[y_j | k] (the coefficients are
        linear), then averaged over the components with weights pi_k.
        """
        means = []                                                       # C x (..., K, H, W)
        for c in range(self.event_shape[0]):
            means.append(_shifted_loc(self.loc, self.coeffs, means, c))
        y = (torch.softmax(self.logits, dim=-3).unsqueeze(-3) * torch.stack(means, dim=-3)).sum(-4)
        return ((y + 1) / 2).clamp(0, 1)                                 # (..., C, H, W)
