"""Observation models p(x | z): the decoder's output parameters -> a distribution over images.

K++ §4: "Binarized datasets assume Bernoulli output distributions, while continuous values
are modeled by a discretized mixture of logistics (Salimans et al., 2017)". Each likelihood
knows how many output channels the decoder needs, which data it models (``binarized``: 0/1
pixels, else 8-bit grey levels k/255 in [0, 1]), how to validate data for it, and how to turn
decoder outputs into a Pyro distribution with event shape (C, H, W).
"""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch

from pyro_kpp.maths.dmol import LEVELS, DiscretizedLogisticMixture, eight_bit, params_per_component

#: Mixture components per pixel of the discretized logistic likelihood. The K++ paper does not
#: give its number; PixelCNN++ uses 10. We use 5 for the CPU: the likelihood's cost grows with it
#: (log-prob + gradient for 256 Fashion-MNIST images on one core: ~0.36 s with 10, ~0.16 s with 5,
#: against ~0.5 s for a whole K++ training step with the Bernoulli likelihood).
DMOL_COMPONENTS = 5


def bits_per_dim(nats_per_image: float, image_shape: tuple[int, int, int]) -> float:
    """nats/image -> bits/dim: divide by D = C*H*W sub-pixels and by ln 2 (K++ Table 1)."""
    return nats_per_image / (math.prod(image_shape) * math.log(2))


class Bernoulli:
    """Independent Bernoulli pixels with logits from the decoder; data must be exactly 0 or 1."""

    name = "bernoulli"
    binarized = True

    def out_channels(self, image_channels: int) -> int:
        return image_channels

    def dist(self, params: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=params, validate_args=False).to_event(3)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.bernoulli(self.mean(params), generator=generator)

    def check(self, x: torch.Tensor, argname: str) -> None:
        if not bool(((x == 0) | (x == 1)).all()):
            bad = x[(x != 0) & (x != 1)].flatten()[:3].tolist()
            raise ValueError(
                f"{argname}: the Bernoulli likelihood needs binary pixels (0 or 1), got values "
                f"such as {bad}; binarize the data first (pyro_kpp.data.episodes.Episodes does)"
            )


class DiscretizedLogistics:
    """8-bit images (values k/255 in [0, 1]) under a mixture of discretized logistics
    (``pyro_kpp.maths.dmol``, Salimans et al. 2017) with ``DMOL_COMPONENTS`` components per pixel."""

    name = "dmol"
    binarized = False
    components = DMOL_COMPONENTS

    def out_channels(self, image_channels: int) -> int:
        return self.components * params_per_component(image_channels)

    def dist(self, params: torch.Tensor) -> dist.TorchDistribution:
        return DiscretizedLogisticMixture.from_params(params, self.components, validate_args=False)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self.dist(params).mean

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.dist(params).sample(generator=generator)

    def check(self, x: torch.Tensor, argname: str) -> None:
        ok = eight_bit.check(x)
        if not bool(ok.all()):
            bad = x[~ok].flatten()[:3].tolist()
            raise ValueError(
                f"{argname}: the dmol likelihood needs 8-bit images, values k/{LEVELS - 1} for integers k in "
                f"0..{LEVELS - 1} (uint8 / {LEVELS - 1}), got values such as {bad}; pyro_kpp.data.episodes.Episodes "
                f"gives them with binarize=False"
            )


LIKELIHOODS = {"bernoulli": Bernoulli, "dmol": DiscretizedLogistics}


def make_likelihood(name: str):
    try:
        return LIKELIHOODS[name]()
    except KeyError:
        raise ValueError(f"likelihood: expected one of {sorted(LIKELIHOODS)}, got {name!r}") from None
