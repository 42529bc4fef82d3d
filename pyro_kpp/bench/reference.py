"""A hand-written PyTorch loss for K++: the yardstick of Pyro's overhead.

The same network calls as ``KanervaPlusPlus.model`` and its guide (encoder, writer, reader,
learned prior, decoder), with the log-densities of eq. 4 written out with
``torch.distributions`` and explicit reparameterised draws, and no Pyro at all. For the same
noise it equals ``pyro_kpp.inference.bound.training_loss`` with ``Trace_ELBO`` (tested), so the time ratio
of the two is what Pyro's tracing, plates and ELBO bookkeeping cost.
"""
from __future__ import annotations

import torch
from torch.distributions import Bernoulli, Normal

from pyro_kpp.models.kpp import KanervaPlusPlus


def kpp_reference_loss(model: KanervaPlusPlus, x: torch.Tensor, eps_keys: torch.Tensor | None = None,
                       eps_z: torch.Tensor | None = None) -> torch.Tensor:
    """Negative ELBO per image of K++ on episodes x (B, T, C, H, W), as ``training_loss`` gives it.

    ``eps_keys`` (B, T, K, 3) and ``eps_z`` (B, T, L) are the standard-normal noises of the
    guide's draws; when omitted they are drawn in the guide's order (keys, then codes).
    """
    if not isinstance(model, KanervaPlusPlus):
        raise TypeError(f"model: expected a KanervaPlusPlus, got {type(model).__name__}")
    if model.likelihood.name != "bernoulli":
        raise ValueError(f"model: the reference loss is written for the Bernoulli likelihood, "
                         f"got {model.likelihood.name!r}")
    B, T = x.shape[:2]
    E = model.embed(x)                                            # (B, T, D), with the input checks
    memory = model.write_memory(E)                                # (B, C, H, W)
    key_loc, key_scale = model.q.key_posterior(E)                 # (B, T, K, 3)
    zq_loc, zq_scale = model.q.code_head(E)                       # (B, T, L)
    if eps_keys is None:
        eps_keys = torch.randn_like(key_loc)
    if eps_z is None:
        eps_z = torch.randn_like(zq_loc)
    keys = key_loc + key_scale * eps_keys
    z = zq_loc + zq_scale * eps_z
    zp_loc, zp_scale = model.code_prior(memory, keys)             # (B, T, L)
    logits = model.decode(z)                                      # (B, T, C, H, W)
    log_px = Bernoulli(logits=logits, validate_args=False).log_prob(x).sum((-3, -2, -1))
    log_p_keys = Normal(0.0, 1.0).log_prob(keys).sum((-2, -1))
    log_q_keys = Normal(key_loc, key_scale, validate_args=False).log_prob(keys).sum((-2, -1))
    log_pz = Normal(zp_loc, zp_scale, validate_args=False).log_prob(z).sum(-1)
    log_qz = Normal(zq_loc, zq_scale, validate_args=False).log_prob(z).sum(-1)
    elbo = log_px + log_p_keys + log_pz - log_q_keys - log_qz     # (B, T)
    return -elbo.sum() / (B * T)
