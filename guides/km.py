"""The Kanerva Machine's reading guide q(y_t | x_t) q(z_t | x_t, y_t, M) (KM §3.2 eq. 7, Appendix C).

* Addresses: q(y_t | x_t) = N(mu_y(e_t), sigma_y(e_t)). Appendix C: "adding noise to the input
  into q(y_t|x_t) helped stabilise training ... Gaussian noise with zero mean and standard
  deviation of 0.2". The input of this head is the embedding e_t of the shared encoder, so the
  noise is added to e_t, in training mode only (choice: the paper does not say whether the
  noise goes on the pixels or on the network's input features; e_t is the head's input).
* Codes: q(z_t | x_t, y_t, M) = N(mu_z(c_t), sigma_z(c_t)) with c_t the concatenation of e_t
  and the read-out mean w_t^T R of p(z_t | y_t, M) (§3.2: "takes the concatenation of x_t and
  the mean of p(z_t|y_t, M) as input. The constant variance ... is omitted").
* The writing posterior q(z_t | x_t) (§3.3, eq. 8) is one more head here; it is used to write
  the memory (``pyro_kpp.models.km``), not sampled at a site of its own: the written memory,
  what the conditional bound (eq. 12) conditions on, is sampled at the sites "memory" and
  "memory_row_cov" as a point mass, so that the model reads the guide's write.

Every "MLP" of KM Fig. 9 is a 2-layer perceptron (Appendix C): one hidden layer (``layers=1``);
with ``spectral_norm`` (the "paper" preset) every linear layer is spectrally normalised, as K++'s heads.
"""
from __future__ import annotations

from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyro_kpp.nets.conv import GaussianHead

ADDRESS_INPUT_NOISE = 0.2  # Appendix C: std of the Gaussian noise on the input of q(y|x), training only


class KmGuide(PyroModule):
    """The guide's networks and its sampling statements."""

    def __init__(self, embed_size: int, address_size: int, code_size: int, hidden: int,
                 spectral_norm: bool = False):
        super().__init__()
        self.address_head = GaussianHead(embed_size, address_size, hidden, 1, spectral_norm)
        self.write_code_head = GaussianHead(embed_size, code_size, hidden, 1, spectral_norm)
        self.code_head = GaussianHead(embed_size + code_size, code_size, hidden, 1, spectral_norm)

    def address_posterior(self, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """loc, scale of q(y_t | x_t): (B, T, S) from E (B, T, D), with input noise in training."""
        if self.training:
            E = E + ADDRESS_INPUT_NOISE * torch.randn_like(E)
        return self.address_head(E)

    def code_posterior(self, E: torch.Tensor, readout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """loc, scale of q(z_t | x_t, y_t, M): (..., B, T, C) from E (B, T, D) and w_t^T R (..., B, T, C)."""
        inputs = torch.cat([E.expand(*readout.shape[:-1], E.shape[-1]), readout], -1)
        return self.code_head(inputs)

    def forward(self, E: torch.Tensor, readout: Callable[[torch.Tensor], torch.Tensor],
                memory_sites: Callable[[], object]) -> None:
        """Sample the written memory (``memory_sites()``, episode-level sites), then y and z for
        E (B, T, D); ``readout(y)`` is the memory's mean read w_t^T R."""
        B, T = E.shape[:2]
        y_loc, y_scale = self.address_posterior(E)                    # (B, T, S)
        with pyro.plate("episodes", B, dim=-2):
            memory_sites()
            with pyro.plate("images", T, dim=-1):
                y = pyro.sample("y", dist.Normal(y_loc, y_scale).to_event(1))       # (..., B, T, S)
                z_loc, z_scale = self.code_posterior(E, readout(y))       # (..., B, T, C)
                pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))
