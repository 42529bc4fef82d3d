"""The Dynamic Kanerva Machine: the sequential write against least squares and brute-force
conditioning, the matrix-normal memory, the memory KL, the bound (memory KL counted once per
episode) and attractor reading. Trace shapes and the learning smoke test: test_models.py; the
importance-weighted bound over whole episodes against an exact ln p: test_iw_exact.py."""
from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from torch.distributions import Bernoulli, MultivariateNormal, Normal, kl_divergence

from pyro_kpp.inference.bound import PARTICLE_DIM, evaluate, make_elbo, training_loss
from pyro_kpp.maths.matrix_normal import MatrixNormal, ridge_weights
from pyro_kpp.models import build_model
from pyro_kpp.reading.iterative import iterative_read

from helpers import tiny_config
from pyro_kpp.inference.handlers import reuse_embedding
from test_km import episode

DKM = dict(model="dkm", slots=6)
D64 = torch.float64


def kron_gaussian(R: torch.Tensor, U: torch.Tensor) -> MultivariateNormal:
    """N(vec R, I_L (x) U) for a K x L matrix-normal (vec stacks columns)."""
    L = R.shape[-1]
    return MultivariateNormal(R.transpose(-1, -2).reshape(-1), torch.kron(torch.eye(L, dtype=R.dtype), U))


@pytest.mark.parametrize("iterations", [1, 2])
def test_sequential_write_solves_each_address_against_the_current_memory(iterations):
    """Each code is written at the ridge solution (lstsq on the augmented system) against the
    memory before it (re-solved against the tentative posterior when iterations > 1); the
    final memory is the exact posterior of vec(M) given all codes at those addresses."""
    torch.manual_seed(0)
    model = build_model(tiny_config(**DKM, dkm_write_iterations=iterations)).double()
    B, T, K, L = 2, 5, 6, 8
    codes = torch.randn(B, T, L, dtype=D64)
    R, U = model.write_memory(codes)
    R0, U0 = model.prior.loc.detach(), model.prior.row_covariance().detach()
    I_L, I_K = torch.eye(L, dtype=D64), torch.eye(K, dtype=D64)

    def posterior(W, Z):                                   # brute-force conditioning of vec(M)
        prior_cov = torch.kron(I_L, U0)
        A = torch.kron(I_L, W)
        S = A @ prior_cov @ A.T + torch.eye(A.shape[0], dtype=D64)          # sigma_xi^2 = 1
        gain = torch.linalg.solve(S, A @ prior_cov).T
        mean = R0.T.reshape(-1) + gain @ (Z.T.reshape(-1) - A @ R0.T.reshape(-1))
        return mean.reshape(L, K).T, (prior_cov - gain @ A @ prior_cov)[:K, :K]

    for b in range(B):
        W = torch.zeros(0, K, dtype=D64)
        R_t = R0
        for t in range(T):
            target = R_t
            for _ in range(iterations):
                aug = torch.cat([target.T, I_K])                           # [M^T; sqrt(ridge) I], ridge = 1
                w = torch.linalg.lstsq(aug, torch.cat([codes[b, t], torch.zeros(K, dtype=D64)])).solution
                target, _ = posterior(torch.cat([W, w[None]]), codes[b, : t + 1])
            W = torch.cat([W, w[None]])
            R_t = target
        R_exact, U_exact = posterior(W, codes[b])
        torch.testing.assert_close(R[b], R_exact, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(U[b], U_exact, rtol=1e-8, atol=1e-8)


def test_memory_is_a_matrix_normal_drawn_once_per_particle():
    """The memory is an episode-level latent (its shapes and plates: test_models.py) with a
    matrix-normal prior and posterior, and each particle draws its own memory."""
    model = build_model(tiny_config(**DKM))
    x = episode()
    with reuse_embedding(), pyro.plate("particles", 3, dim=PARTICLE_DIM):
        guide_tr = poutine.trace(model.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    assert isinstance(guide_tr.nodes["memory"]["fn"], MatrixNormal)
    assert isinstance(model_tr.nodes["memory"]["fn"], MatrixNormal)
    m = model_tr.nodes["memory"]["value"]                                  # (3, 2, 1, 6, 8)
    assert not torch.allclose(m[0], m[1])


def _far_codes(model):
    """Codes far from the prior mean: the write moves the memory far, a KL of about 50 nats."""
    with torch.no_grad():
        model.q.code_net.bias += 20.0
    return model


def test_memory_kl_is_the_closed_form_of_the_vectorised_gaussians():
    torch.manual_seed(0)
    model = _far_codes(build_model(tiny_config(**DKM)).double())
    x = episode().double()
    with reuse_embedding():
        guide_tr = poutine.trace(model.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    q, p = guide_tr.nodes["memory"]["fn"], model_tr.nodes["memory"]["fn"]
    kl = kl_divergence(q, p)                                                # (B, 1)
    assert kl.shape == (2, 1)
    for b in range(2):
        expected = kl_divergence(kron_gaussian(q.loc[b, 0], q.row_covariance[b, 0]),
                                 kron_gaussian(p.loc[b, 0], p.row_covariance[b, 0]))
        torch.testing.assert_close(kl[b, 0], expected)
    assert kl.min() > 30


@pytest.mark.parametrize("elbo", ["meanfield", "trace"])
def test_memory_kl_enters_the_per_image_bound_once_per_episode(elbo):
    """The per-image bound is (sum_t [ln p(x_t|z_t) - KL_w,t] - KL_M) / T, computed by hand
    from the networks; a memory KL divided by T twice would be far off."""
    torch.manual_seed(0)
    model = _far_codes(build_model(tiny_config(**DKM)).double())
    x = episode(B=3, T=5).double()
    B, T = x.shape[:2]
    pyro.set_rng_seed(3)
    loss = training_loss(model, x, make_elbo(elbo)).item()
    pyro.set_rng_seed(3)
    reported = evaluate(model, [x], samples=1) if elbo == "trace" else None
    pyro.set_rng_seed(3)
    with reuse_embedding():                                           # the same draws
        tr = poutine.trace(model.guide).get_trace(x)
    M, w, z = (tr.nodes[s]["value"] for s in ("memory", "w", "z"))

    codes = model.q.code_net(model.encoder(x.flatten(0, 1)).unflatten(0, (B, T)))
    R, U = model.write_memory(codes)
    R0, U0 = model.prior.loc, model.prior.row_covariance()
    q_w = Normal(ridge_weights(R, codes, 1.0), model.q.w_scale())
    logits = model.decoder(z.flatten(0, 1)).reshape(x.shape)
    log_p_x = Bernoulli(logits=logits).log_prob(x).sum((-1, -2, -3))         # (B, T)
    if elbo == "meanfield":                                                 # closed-form KLs
        kl_w = kl_divergence(q_w, Normal(0.0, 1.0)).sum(-1)
        kl_M = torch.stack([kl_divergence(kron_gaussian(R[b], U[b]), kron_gaussian(R0, U0)) for b in range(B)])
    else:                                                                   # one-sample estimates
        kl_w = (q_w.log_prob(w) - Normal(0.0, 1.0).log_prob(w)).sum(-1)
        kl_M = torch.stack([kron_gaussian(R[b], U[b]).log_prob(M[b, 0].T.reshape(-1))
                            - kron_gaussian(R0, U0).log_prob(M[b, 0].T.reshape(-1)) for b in range(B)])
    honest = (-((log_p_x - kl_w).sum(1) - kl_M) / T).mean()
    kl_divided_twice = (-((log_p_x - kl_w).sum(1) - kl_M / T) / T).mean()
    assert math.isclose(loss, honest.item(), rel_tol=1e-9)
    if reported is not None:                                                # and term by term, nats/image
        assert math.isclose(reported["elbo"], honest.item(), rel_tol=1e-9)
        hand = {"reconstruction": -log_p_x.mean(), "key_kl": kl_w.mean(), "memory_kl": kl_M.mean() / T,
                "code_kl": 0.0}                                             # q(z | w, M) is p(z | w, M)
        assert set(reported["terms"]) == set(hand)
        for name, term in hand.items():
            expected = float(torch.as_tensor(term).detach())
            assert math.isclose(reported["terms"][name], expected, rel_tol=1e-9, abs_tol=1e-9), name
    assert abs(kl_divided_twice.item() - honest.item()) > 5.0


def test_iterative_read_is_attractor_dynamics_against_the_fixed_memory():
    torch.manual_seed(0)
    model = build_model(tiny_config(**DKM)).eval()
    x, other = episode(seed=1), episode(seed=2)
    memory = model.write(x)
    R = memory.value[0].clone()
    reading = iterative_read(model, memory, other, steps=3, generator=torch.Generator().manual_seed(0))
    assert reading.params.shape == (3, 2, 4, 1, 28, 28) and reading.keys.shape == (3, 2, 4, 6)
    for step in range(3):
        codes = model.q.codes(model.embed(reading.queries[step]))
        torch.testing.assert_close(reading.keys[step], ridge_weights(R, codes, 1.0))
    assert torch.equal(memory.value[0], R)                                  # only read, never written
    # without a memory, keys are solved against the query's own written memory
    own = model.write_memory(model.q.codes(model.embed(other)))[0]
    torch.testing.assert_close(model.infer_keys(other), ridge_weights(own, model.q.codes(model.embed(other)), 1.0))


def test_generate_integrates_the_memory_out():
    torch.manual_seed(0)
    model = build_model(tiny_config(**DKM))
    memory = model.write(episode())
    w = model.prior_keys(memory, 3, generator=torch.Generator().manual_seed(0))
    assert w.shape == (2, 3, 6)
    mean = model.generate(memory, w, sample_z=False)
    R, _ = memory.value
    torch.testing.assert_close(mean, model.decode(torch.einsum("bnk,bkl->bnl", w, R)))
    with pytest.raises(ValueError, match=r"keys: expected addresses w of shape \(2, N, 6\)"):
        model.generate(memory, torch.zeros(2, 3, 5))
