"""The Kanerva++ guide: q(Y | X) q(Z | X) (K++ §3.2 eq. 4, §3.3 eq. 6, §3.5).

* Keys: q(y_t | X) = N(mu_key(e_t), sigma_key(e_t)), one Gaussian over the K keys of
  image t, each key in R^3 (eq. 6).
* Codes: q(z_t | X) = N(mu_z(e_t), sigma_z(e_t)), the paper's "stable" training branch
  (§3.5, Fig. 5 top): the code is inferred from the embedding, not from the memory;
  the memory enters the bound through the learned prior p(z | M, y) in the model.
  With ``reads_memory`` (``Config.kpp_posterior == "read"``, a departure, README "Memory use"):
  q(z_t | X, M, y_t) = N(mu_z(e_t, m_t), sigma_z(e_t, m_t)) with m_t the mean of p(z_t | M, y_t)
  at the sampled keys, as KM's q(z_t | x_t, y_t, M) takes the read-out mean (KM §3.2) and DKM's
  q(Z | X, Y, M) that K++'s footnote 2 mentions.
* ``key_std_floor`` (``Config.key_std_floor``) is added to every standard deviation of q(y|X):
  the family is then keys no sharper than that, so each key's KL is bounded by about
  -ln(key_std_floor) + mu^2 / 2 per dimension, and the memory must be readable under that
  much key noise. 0 is the paper's family (up to the 1e-3 floor of every scale).

e_t is the embedding of image t from the shared encoder (the model's f_enc), so both
factors may use information from the whole episode when the encoder mixes it.
"""
from __future__ import annotations

from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyro_kpp.maths.spatial import KEY_DIM
from pyro_kpp.nets.conv import GaussianHead


class KppGuide(PyroModule):
    """The guide's networks and its sampling statements; called with E (B, T, D)."""

    def __init__(self, embed_size: int, reads: int, code_size: int, hidden: int, spectral_norm: bool = False,
                 reads_memory: bool = False, key_std_floor: float = 0.0):
        super().__init__()
        self.reads = reads
        self.key_std_floor = key_std_floor
        self.key_head = GaussianHead(embed_size, reads * KEY_DIM, hidden, spectral_norm=spectral_norm)
        self.code_head = GaussianHead(embed_size + code_size * reads_memory, code_size, hidden,
                                      spectral_norm=spectral_norm)

    def key_posterior(self, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """loc, scale of q(y_t | X): (B, T, K, 3) each, from E (B, T, D)  (eq. 6)."""
        loc, scale = self.key_head(E)                                 # (B, T, K*3)
        shape = (*E.shape[:2], self.reads, KEY_DIM)
        return loc.reshape(shape), (scale + self.key_std_floor).reshape(shape)   # (B, T, K, 3)

    def forward(self, E: torch.Tensor, read: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Sample keys and codes for E (B, T, D); ``read(keys)`` is the mean of p(z | M, y) when
        the code posterior reads the memory."""
        B, T = E.shape[:2]
        key_loc, key_scale = self.key_posterior(E)                    # (B, T, K, 3)
        with pyro.plate("episodes", B, dim=-2), pyro.plate("images", T, dim=-1):
            keys = pyro.sample("keys", dist.Normal(key_loc, key_scale).to_event(2))   # (..., B, T, K, 3)
            inputs = E if read is None else torch.cat([E.expand(*keys.shape[:-2], E.shape[-1]), read(keys)], -1)
            z_loc, z_scale = self.code_head(inputs)                   # (..., B, T, L)
            pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))
