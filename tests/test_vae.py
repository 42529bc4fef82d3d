"""The VAE baseline: the bound against a hand computation and a memory that carries nothing
(trace shapes and the learning smoke test: test_models.py; the CLI / API run is in test_km.py
with KM and DKM)."""
from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from torch.distributions import Bernoulli, Normal, kl_divergence

from pyro_kpp.inference.bound import evaluate, log_weights, make_elbo
from pyro_kpp.models import build_model

from helpers import tiny_config
from test_km import episode

VAE = dict(model="vae")


def test_log_weights_and_each_term_equal_the_hand_computation():
    """ln p(x_t|z_t) + ln N(z_t; 0, I) - ln q(z_t|x_t), per image (KM eq. 1), and the reported
    terms: the reconstruction and the code KL, the only KL (no keys, no memory)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(**VAE))
    x = episode(B=3, T=5)
    pyro.set_rng_seed(7)
    lw = log_weights(model, x, samples=1)[0]
    pyro.set_rng_seed(7)
    z = poutine.trace(model.guide).get_trace(x).nodes["z"]["value"]
    E = model.encoder(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    z_loc, z_scale = model.q.code_head(E)
    logits = model.decoder(z.flatten(0, 1)).reshape(x.shape)
    log_p_x = Bernoulli(logits=logits).log_prob(x).sum((-1, -2, -3))
    kl_z = Normal(z_loc, z_scale).log_prob(z).sum(-1) - Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(lw, log_p_x - kl_z, rtol=1e-5, atol=1e-3)
    pyro.set_rng_seed(7)
    terms = evaluate(model, [x], samples=1)["terms"]                         # nats/image
    assert set(terms) == {"reconstruction", "code_kl"}
    assert math.isclose(terms["reconstruction"], -log_p_x.mean().item(), rel_tol=1e-5)
    assert math.isclose(terms["code_kl"], kl_z.mean().item(), rel_tol=1e-4, abs_tol=1e-4)


def test_meanfield_loss_charges_the_closed_form_kl():
    """TraceMeanField_ELBO's loss (summed over the images) is -ln p(x|z) + KL(q(z|x) || N(0, I)),
    the KL by kl_divergence, at the same draws: to 0.05 nats, well under the KL itself."""
    torch.manual_seed(0)
    model = build_model(tiny_config(**VAE))
    x = episode(B=3, T=5)
    with torch.no_grad():
        pyro.set_rng_seed(7)
        loss = make_elbo("meanfield").loss(model.model, model.guide, x)
        pyro.set_rng_seed(7)
        z = poutine.trace(model.guide).get_trace(x).nodes["z"]["value"]        # the same draws
        z_loc, z_scale = model.q.code_head(model.encoder(x.flatten(0, 1)).unflatten(0, x.shape[:2]))
        log_p_x = Bernoulli(logits=model.decoder(z.flatten(0, 1)).reshape(x.shape)).log_prob(x).sum((-1, -2, -3))
        kl = kl_divergence(Normal(z_loc, z_scale), Normal(0.0, 1.0)).sum(-1)   # (B, T)
    assert kl.sum() > 0.5, kl.sum()
    assert abs(loss - (kl - log_p_x).sum().item()) < 0.05, (loss, (kl - log_p_x).sum(), kl.sum())


def test_memory_carries_nothing():
    """Samples come from the prior: the same generator gives the same images whatever was written."""
    model = build_model(tiny_config(**VAE)).eval()
    a, b = model.write(episode(seed=1)), model.write(episode(seed=2))
    assert a.value.shape == (2, 0)
    keys_a = model.prior_keys(a, 5, generator=torch.Generator().manual_seed(0))
    keys_b = model.prior_keys(b, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.generate(a, keys_a), model.generate(b, keys_b))
    torch.testing.assert_close(model.generate(a, keys_a), model.decode(keys_a))
    with pytest.raises(ValueError, match=r"keys: expected codes z of shape \(2, N, 8\)"):
        model.generate(a, torch.zeros(2, 5, 7))
