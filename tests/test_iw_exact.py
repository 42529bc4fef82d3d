"""The importance-weighted bound against an exact ln p(x), through the project's own code path
(``image_bounds``: the traces, ``bound_terms``, the log-mean-exp over particles).

With one-dimensional latents the marginal likelihood of the real models is a one-dimensional
integral per latent, computed here on a fine grid (the integrands are smooth and negligible at
the grid's ends, so the Riemann sum is exact to far below the tolerances):

* VAE, code size 1: p(x_t) = int N(z; 0, s^2) p(x_t | z) dz.
* DKM, one slot and code size 1: the memory M ~ N(R0, U0) is a scalar per episode, w ~ N(0, s^2)
  and z | w, M ~ N(w M, sigma^2); integrating w out, z | M ~ N(0, s^2 M^2 + sigma^2), so
  p(X) = int N(M; R0, U0) prod_t int N(z; 0, s^2 M^2 + sigma^2) p(x_t | z) dz dM.

The decoder's input weights are scaled up so that z matters: the posterior is far narrower than
the prior and the ELBO lies several nats below ln p, a gap the IW bound must close. A wrong
prior or likelihood term, a wrong log S normaliser or a KL counted twice moves the bound off ln p.
"""
from __future__ import annotations

import math

import pyro
import torch
from torch.distributions import Bernoulli, Normal

from pyro_kpp.inference.bound import image_bounds
from pyro_kpp.models import build_model

from helpers import tiny_config

F64 = torch.float64
#: Particles per image (VAE) or episode (DKM): enough for the IW bound to close most of the gap.
SAMPLES = 512
#: How far the decoder's input weights are scaled up from their initialisation.
DECODER_GAIN = 3.0


def _model(**cfg):
    pyro.set_rng_seed(0)
    model = build_model(tiny_config(code_size=1, **cfg)).eval()
    with torch.no_grad():
        model.decoder.fc[0].weight.mul_(DECODER_GAIN)
    return model


def _episodes(B, T):
    return torch.bernoulli(torch.full((B, T, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _log_likelihood(model, x, z):
    """ln p(x_t | z) on a grid of codes z (N,): (N, B, T), from the decoder directly."""
    logits = model.decoder(z.float()[:, None]).double()                      # (N, 1, 28, 28)
    return Bernoulli(logits=logits[:, None, None]).log_prob(x.double()).sum((-1, -2, -3))


def _log_integral(log_f, grid, dim=0):
    """ln int f over an evenly spaced grid, from ln f along ``dim``."""
    return torch.logsumexp(log_f, dim) + math.log(float(grid[1] - grid[0]))


def test_vae_iw_bound_reaches_the_exact_log_likelihood():
    model = _model(model="vae")
    x = _episodes(B=1, T=3)
    s = model.key_scale
    z = torch.linspace(-10 * s, 10 * s, 4001, dtype=F64)
    log_prior = Normal(0.0, s).log_prob(z)[:, None, None]
    exact = _log_integral(log_prior + _log_likelihood(model, x, z), z)           # (B, T)
    with torch.no_grad():
        b = image_bounds(model, x, samples=SAMPLES)
    assert (exact - b["elbo"] > 2.0).all(), (exact, b["elbo"])                  # a gap to close
    torch.testing.assert_close(b["iw"].double(), exact, rtol=0, atol=0.25)


def test_dkm_episode_iw_bound_approaches_the_exact_log_likelihood():
    model = _model(model="dkm", slots=1)
    x = _episodes(B=2, T=3)
    s, noise_var = model.key_scale, 1.0                                          # sigma^2 = 1 (DKM)
    with torch.no_grad():
        R0, U0 = model.prior.loc.double().reshape(()), model.prior.row_covariance().double().reshape(())
    M = torch.linspace(R0 - 8 * U0.sqrt(), R0 + 8 * U0.sqrt(), 801, dtype=F64)
    code_scale = (s ** 2 * M ** 2 + noise_var).sqrt()                             # (NM,) z | M
    z = torch.linspace(-8 * code_scale.max(), 8 * code_scale.max(), 4001, dtype=F64)
    log_p_z = Normal(0.0, code_scale[:, None]).log_prob(z)                       # (NM, Nz)
    log_p_x_given_M = _log_integral(log_p_z[:, :, None, None] + _log_likelihood(model, x, z)[None], z, 1)
    log_p_M = Normal(R0, U0.sqrt()).log_prob(M)[:, None]
    exact = _log_integral(log_p_M + log_p_x_given_M.sum(-1), M)                  # (B,) ln p(X) per episode
    with torch.no_grad():
        b = image_bounds(model, x, samples=SAMPLES)
    iw, elbo = b["iw"].double().sum(-1), b["elbo"].double().sum(-1)              # per episode
    # each image carries 1/T of its episode's bound
    torch.testing.assert_close(b["iw"], b["iw"][..., :1].expand_as(b["iw"]))
    assert (exact - elbo > 10.0).all(), (exact, elbo)                            # a wide gap to close
    assert (iw <= exact + 0.25).all(), (iw, exact)                               # a bound, up to noise
    assert (exact - iw < 0.1 * (exact - elbo)).all(), (iw, elbo, exact)           # and nearly all of it closed
