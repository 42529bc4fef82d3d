"""The Dynamic Kanerva Machine's guide: q(M | X) prod_t q(w_t | x_t, M) q(z_t | w_t, M) (DKM).

* Codes: e_t -> c_t = Linear(e_t), the deterministic code of image t (DKM encodes each image
  to one code; here a linear map of the shared encoder's embedding, spectrally normalised in the
  "paper" preset as K++'s dense nets). The codes are written into the memory and used to address it.
* Memory: q(M | X) = MN(R, U, I_L), the posterior of the sequential rank-1 write of the codes
  (``pyro_kpp.models.dkm``), sampled at the episode-level site "memory" (reparametrised,
  M = R + chol(U) E), so the bound carries KL(q(M|X) || p(M)) once per episode.
* Addresses: q(w_t | x_t, M) = N(w*_t, sigma_w^2 I_K), w*_t the ridge solution of c_t against
  the written memory mean R (``ridge_weights``); sigma_w is one learned scalar, starting at 0.3.
* Codes read: q(z_t | w_t, M) = p(z_t | w_t, M) = N(w_t^T M, sigma_xi^2 I_L). DKM reads the code
  from memory with no bottom-up correction, so the code's KL is zero and its draw is the read
  of the sampled memory; stating it in the guide keeps every latent of the model a site of
  both programs (no hidden randomness in the model).
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_kpp.maths.matrix_normal import MatrixNormal, read, ridge_weights
from pyro_kpp.nets.conv import positive_scale


class DkmGuide(PyroModule):
    """The guide's code map, its address scale and its sampling statements."""

    def __init__(self, embed_size: int, code_size: int, w_scale_raw: float, spectral_norm: bool = False):
        super().__init__()
        linear = nn.Linear(embed_size, code_size)
        self.code_net = nn.utils.parametrizations.spectral_norm(linear) if spectral_norm else linear
        self.w_scale_raw = nn.Parameter(torch.tensor(w_scale_raw))

    def codes(self, E: torch.Tensor) -> torch.Tensor:
        """c_t: (B, T, D) -> (B, T, L)."""
        return self.code_net(E)

    def w_scale(self) -> torch.Tensor:
        """sigma_w, the standard deviation of q(w | x, M)."""
        return positive_scale(self.w_scale_raw)

    def forward(self, codes: torch.Tensor, R: torch.Tensor, U: torch.Tensor, ridge: float,
                noise_scale: float) -> None:
        """Sample the memory, addresses and read codes for codes (B, T, L) and q(M|X) = MN(R, U)."""
        B, T = codes.shape[:2]
        K = R.shape[-2]
        w_loc = ridge_weights(R, codes, ridge)                        # (B, T, K)
        posterior = MatrixNormal(R.unsqueeze(1), torch.linalg.cholesky(U).unsqueeze(1))  # batch (B, 1)
        with pyro.plate("episodes", B, dim=-2):
            M = pyro.sample("memory", posterior)                      # (..., B, 1, K, L)
            with pyro.plate("images", T, dim=-1):
                w = pyro.sample("w", dist.Normal(w_loc, self.w_scale().expand(K)).to_event(1))  # (..., B, T, K)
                pyro.sample("z", dist.Normal(read(M, w), noise_scale).to_event(1))              # (..., B, T, L)
