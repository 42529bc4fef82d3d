"""Observation models p(x | z): the decoder's output parameters -> a distribution over images.

Binarized data use a Bernoulli per pixel (K++ §4, KM §4). Each likelihood knows how many
output channels the decoder needs, how to validate data for it, and how to turn decoder
outputs into a Pyro distribution with event shape (C, H, W).
"""
from __future__ import annotations

import pyro.distributions as dist
import torch


class Bernoulli:
    """Independent Bernoulli pixels with logits from the decoder; data must be exactly 0 or 1."""

    name = "bernoulli"

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
                f"such as {bad}; binarize the data first (pyro_kpp.data.Episodes does)"
            )


LIKELIHOODS = {"bernoulli": Bernoulli}


def make_likelihood(name: str):
    try:
        return LIKELIHOODS[name]()
    except KeyError:
        raise ValueError(f"likelihood: expected one of {sorted(LIKELIHOODS)}, got {name!r}") from None
