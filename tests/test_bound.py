"""The reported bound against an independent hand computation (K++ eq. 4, per image).

A public DKM port divides the KL terms by T and then averages over T, under-weighting the
KL by a factor T and reporting a better-looking number. These tests compute the bound by
hand from the networks with torch.distributions and check every path that reports it.
"""
from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from torch.distributions import Bernoulli, Normal, kl_divergence

from pyro_kpp.inference.bound import ScaleLatents, evaluate, image_bounds, log_weights, make_elbo, training_loss
from pyro_kpp.models import build_model
from pyro_kpp.models.kpp import gaussian_blur

from helpers import tiny_config


def _hand_memory(model, E, key_loc):
    """The written memory from the nets: f_mem(mean e) (the literal write) or the blocks g(e_t)
    at r x r, upsampled, scattered where the posterior-mean keys read (the default write)."""
    if model.cfg.kpp_write == "pooled":
        return model.writer(E.mean(1))
    B, T = E.shape[:2]
    C, H, W = model.cfg.memory_shape
    r, h = model.cfg.kpp_block_res, model.cfg.window
    blocks = model.block_net(E).reshape(B * T * model.cfg.reads, C, r, r)
    blocks = torch.nn.functional.interpolate(blocks, size=(h, h), mode="bilinear").reshape(B, T, -1, C, h, h)
    return model.reader.adjoint(blocks, key_loc.reshape(B, T, -1, 3), (H, W))


def _hand_terms(model, x, keys, z, analytic=False):
    """Per-image reconstruction and KL terms, computed directly from the nets: (B, T) each. The KLs
    are one-sample estimates ln q - ln p at (keys, z), or with ``analytic`` the closed-form KLs
    of the Gaussians (the code's given the keys drawn), as TraceMeanField_ELBO computes them."""
    E = model.encoder(x.flatten(0, 1)).unflatten(0, x.shape[:2])          # (B, T, D)
    key_loc, key_scale = model.q.key_head(E)
    memory = _hand_memory(model, E, key_loc)                               # (B, C, H, W)
    if model.cfg.memory_blur:                                              # the prior reads it blurred
        memory = gaussian_blur(memory, model.cfg.memory_blur)
    z_loc, z_scale = model.q.code_head(E)
    q_y, p_y = Normal(key_loc, key_scale), Normal(0.0, 1.0)
    windows = model.reader(memory, keys)                                   # (B, T, K, C, h, w)
    prior_loc, prior_scale = model.prior_net(windows.flatten(2, 3).flatten(0, 1))
    prior_loc, prior_scale = (t.unflatten(0, z.shape[:2]) for t in (prior_loc, prior_scale))   # (B, T, L)
    q_z, p_z = Normal(z_loc, z_scale), Normal(prior_loc, prior_scale)
    logits = model.decoder(z.flatten(0, 1)).reshape(x.shape)
    log_p_x = Bernoulli(logits=logits).log_prob(x).sum((-1, -2, -3))
    if analytic:
        return log_p_x, kl_divergence(q_z, p_z).sum(-1), kl_divergence(q_y, p_y.expand(q_y.batch_shape)).sum(-1)
    kl_y = q_y.log_prob(keys.flatten(-2)).sum(-1) - p_y.log_prob(keys).sum((-1, -2))
    return log_p_x, q_z.log_prob(z).sum(-1) - p_z.log_prob(z).sum(-1), kl_y


def _setup(seed=0, B=3, T=5, **cfg):
    pyro.set_rng_seed(seed)
    model = build_model(tiny_config(episode_length=T, batch_size=B, **cfg))
    x = torch.bernoulli(torch.full((B, T, 1, 28, 28), 0.2))
    return model, x


@pytest.mark.parametrize("write", ["blocks", "pooled"])
def test_log_weights_equal_the_hand_computation(write):
    model, x = _setup(kpp_write=write, kpp_block_res=2)
    pyro.set_rng_seed(7)
    lw = log_weights(model, x, samples=1)[0]                               # (B, T)
    pyro.set_rng_seed(7)
    tr = poutine.trace(model.guide).get_trace(x)                            # same draws
    keys, z = tr.nodes["keys"]["value"], tr.nodes["z"]["value"]
    log_p_x, kl_z, kl_y = _hand_terms(model, x, keys, z)
    torch.testing.assert_close(lw, log_p_x - kl_z - kl_y, rtol=1e-5, atol=1e-3)


def test_reported_per_image_bound_divides_by_T_exactly_once():
    model, x = _setup(B=3, T=5)
    B, T = x.shape[:2]
    with torch.no_grad():                  # move q(z|X) away from the prior: a KL of tens of nats
        model.q.code_head.net.net[-1].bias[: model.cfg.code_size] += 3.0
    pyro.set_rng_seed(3)
    tr = poutine.trace(model.guide).get_trace(x)
    log_p_x, kl_z, kl_y = _hand_terms(model, x, tr.nodes["keys"]["value"], tr.nodes["z"]["value"])
    # Per episode: -(sum_t E ln p(x_t|z_t) - KL_z,t - KL_y,t); per image: that / T; mean over episodes.
    honest = (-(log_p_x - kl_z - kl_y).sum(1) / T).mean()
    kl_divided_twice = (-(log_p_x.sum(1) - (kl_z + kl_y).sum(1) / T) / T).mean()

    pyro.set_rng_seed(3)
    reported = evaluate(model, [x], samples=1)["elbo"]
    pyro.set_rng_seed(3)
    loss = training_loss(model, x, make_elbo("trace")).item()
    assert math.isclose(reported, honest.item(), rel_tol=1e-5)
    assert math.isclose(loss, honest.item(), rel_tol=1e-5)
    # The check has power: with this KL, dividing it by T twice is far off the honest figure.
    assert abs(kl_divided_twice.item() - honest.item()) > 10.0


@pytest.mark.parametrize("write", ["blocks", "pooled"])
def test_each_reported_term_is_the_hand_computation(write):
    """The key KL, the code KL (against p(z | M, y) read from the hand-written memory) and the
    reconstruction, one by one, in nats/image."""
    model, x = _setup(kpp_write=write, kpp_block_res=2)
    pyro.set_rng_seed(7)
    terms = evaluate(model, [x], samples=1)["terms"]
    pyro.set_rng_seed(7)
    tr = poutine.trace(model.guide).get_trace(x)                            # same draws
    log_p_x, kl_z, kl_y = _hand_terms(model, x, tr.nodes["keys"]["value"], tr.nodes["z"]["value"])
    hand = {"reconstruction": -log_p_x, "code_kl": kl_z, "key_kl": kl_y}
    assert set(terms) == set(hand)
    for name, term in hand.items():
        assert math.isclose(terms[name], term.mean().item(), rel_tol=1e-4, abs_tol=1e-3), (name, terms, hand)


def test_pyro_trace_elbo_matches_the_summed_log_weights():
    model, x = _setup()
    pyro.set_rng_seed(11)
    loss = make_elbo("trace").loss(model.model, model.guide, x)
    pyro.set_rng_seed(11)
    lw = log_weights(model, x, samples=1)
    assert math.isclose(loss, -lw.sum().item(), rel_tol=1e-5)


def test_importance_weighted_bound_equals_the_elbo_for_one_sample():
    """S = 1: log-mean-exp of one weight is that weight. (Against an exact ln p at large S:
    test_iw_exact.py.)"""
    model, x = _setup()
    pyro.set_rng_seed(5)
    b1 = image_bounds(model, x, samples=1)
    assert b1["iw"].shape == (3, 5)
    torch.testing.assert_close(b1["iw"], b1["elbo"])


def _assert_meanfield_loss_is_the_hand_bound(model, x):
    """TraceMeanField_ELBO's loss (summed over the B*T images, about 4,100 nats here) equals the
    hand computation with closed-form KLs at the same draws, to 0.05 nats: far less than any KL."""
    pyro.set_rng_seed(11)
    loss = make_elbo("meanfield").loss(model.model, model.guide, x)
    pyro.set_rng_seed(11)
    tr = poutine.trace(model.guide).get_trace(x)                            # the same draws
    log_p_x, kl_z, kl_y = _hand_terms(model, x, tr.nodes["keys"]["value"], tr.nodes["z"]["value"], analytic=True)
    hand = -(log_p_x - kl_z - kl_y).sum().item()
    assert abs(loss - hand) < 0.05, (loss, hand, kl_z.sum().item(), kl_y.sum().item())


def test_meanfield_elbo_is_the_hand_bound_with_closed_form_kls():
    model, x = _setup(B=2, T=4)
    with torch.no_grad():
        _assert_meanfield_loss_is_the_hand_bound(model, x)


@pytest.mark.parametrize("site", ["keys", "z"])
def test_meanfield_check_fails_when_a_kl_is_dropped(site, monkeypatch):
    """The check above has power: with one site's KL weighted 0 in the program it fails."""
    model, x = _setup(B=2, T=4)
    drop = ScaleLatents(1.0, {site: 0.0})
    monkeypatch.setattr(model, "model", drop(model.model))
    monkeypatch.setattr(model, "guide", drop(model.guide))
    with torch.no_grad(), pytest.raises(AssertionError):
        _assert_meanfield_loss_is_the_hand_bound(model, x)
