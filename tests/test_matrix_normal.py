"""Tests of pyro_kpp.maths.matrix_normal against brute force on vec(M) (Kronecker form, float64)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from pyro_kpp.maths.matrix_normal import (MatrixNormal, bayes_write, bayes_write_step, read, read_variance,
                                    ridge_weights)

D64 = torch.float64


def vec(M: torch.Tensor) -> torch.Tensor:
    """Stack the columns of M (..., K, C) -> (..., K*C)."""
    return M.transpose(-1, -2).reshape(*M.shape[:-2], -1)


def random_spd(K: int, gen: torch.Generator, dtype=D64) -> torch.Tensor:
    A = torch.randn(K, K, generator=gen, dtype=dtype)
    return A @ A.T / K + 0.5 * torch.eye(K, dtype=dtype)


def brute_force_posterior(R, U, W, Z, noise_var):
    """Gaussian conditioning of vec(M) ~ N(vec R, I_C (x) U) on vec(Z) = (I_C (x) W) vec(M) + noise."""
    K, C = R.shape
    T = W.shape[0]
    I_C = torch.eye(C, dtype=D64)
    prior_cov = torch.kron(I_C, U)                                   # (KC, KC)
    A = torch.kron(I_C, W)                                           # (TC, KC)
    noise = torch.kron(I_C, torch.diag(torch.as_tensor(noise_var, dtype=D64).expand(T)))
    S = A @ prior_cov @ A.T + noise
    gain = torch.linalg.solve(S, A @ prior_cov).T                    # prior_cov A^T S^{-1}
    mean = vec(R) + gain @ (vec(Z) - A @ vec(R))
    cov = prior_cov - gain @ A @ prior_cov
    return mean, cov


@pytest.mark.parametrize("noise_var", [1.0, "per-image"])
def test_batch_write_equals_gaussian_conditioning(noise_var):
    gen = torch.Generator().manual_seed(0)
    K, C, T = 4, 3, 5
    R = torch.randn(K, C, generator=gen, dtype=D64)
    U = random_spd(K, gen)
    W = torch.randn(T, K, generator=gen, dtype=D64)
    Z = torch.randn(T, C, generator=gen, dtype=D64)
    if noise_var == "per-image":                                      # Appendix F: Sigma_xi + Sigma_Q
        noise_var = 0.5 + torch.rand(T, generator=gen, dtype=D64)
    R_new, U_new = bayes_write(R, U, W, Z, noise_var)
    mean, cov = brute_force_posterior(R, U, W, Z, noise_var)
    torch.testing.assert_close(vec(R_new), mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.kron(torch.eye(C, dtype=D64), U_new), cov, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(R_new, R)                               # the write did something


def test_batch_write_equals_online_writes_batched_over_episodes():
    gen = torch.Generator().manual_seed(1)
    B, K, C, T = 3, 6, 4, 7
    R = torch.randn(B, K, C, generator=gen, dtype=D64)
    U = torch.stack([random_spd(K, gen) for _ in range(B)])
    W = torch.randn(B, T, K, generator=gen, dtype=D64)
    Z = torch.randn(B, T, C, generator=gen, dtype=D64)
    noise = 0.3 + torch.rand(B, T, generator=gen, dtype=D64)
    R_batch, U_batch = bayes_write(R, U, W, Z, noise)
    R_seq, U_seq = R, U
    for t in range(T):
        R_seq, U_seq = bayes_write_step(R_seq, U_seq, W[:, t], Z[:, t], noise[:, t])
    torch.testing.assert_close(R_seq, R_batch, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(U_seq, U_batch, rtol=1e-10, atol=1e-10)
    # episode b's posterior depends on episode b only
    R_one, U_one = bayes_write(R[1], U[1], W[1], Z[1], noise[1])
    torch.testing.assert_close(R_one, R_batch[1])
    torch.testing.assert_close(U_one, U_batch[1])


def test_online_writes_keep_U_spd_in_float32():
    """1,000 rank-1 writes into a 256-slot memory: U stays symmetric positive definite and
    close to the float64 computation of the same writes."""
    gen = torch.Generator().manual_seed(2)
    K, C, N = 256, 8, 1000
    slot_scale = torch.logspace(-1.5, 0.5, K, dtype=D64)              # slots written unevenly
    W = torch.randn(N, K, generator=gen, dtype=D64) * slot_scale
    Z = 3 * torch.randn(N, C, generator=gen, dtype=D64)
    R64, U64 = torch.zeros(K, C, dtype=D64), torch.eye(K, dtype=D64)
    R32, U32 = R64.float(), U64.float()
    for t in range(N):
        R64, U64 = bayes_write_step(R64, U64, W[t], Z[t])
        R32, U32 = bayes_write_step(R32, U32, W[t].float(), Z[t].float())
    assert torch.equal(U32, U32.T)
    assert torch.linalg.cholesky_ex(U32).info.item() == 0
    eig32 = torch.linalg.eigvalsh(U32.double())
    eig64 = torch.linalg.eigvalsh(U64)
    assert eig32.min() > 0
    assert eig64.max() / eig64.min() > 1000                            # the writes made U ill-conditioned
    torch.testing.assert_close(eig32, eig64, rtol=1e-3, atol=0)
    assert ((U32.double() - U64).abs().max() / U64.abs().max()).item() < 1e-4
    assert ((R32.double() - R64).abs().max() / R64.abs().max()).item() < 1e-4


@pytest.mark.parametrize("K, C", [(7, 4), (4, 7)])                  # K > C: M M^T alone is singular
def test_ridge_weights_equal_lstsq_on_augmented_system(K, C):
    gen = torch.Generator().manual_seed(3)
    B, N = 2, 5
    M = torch.randn(B, K, C, generator=gen, dtype=D64)
    z = torch.randn(B, N, C, generator=gen, dtype=D64)
    ridge = 0.7
    w = ridge_weights(M, z, ridge)                                    # (B, N, K)
    # min ||M^T w - z||^2 + ridge ||w||^2  <=>  lstsq of [M^T; sqrt(ridge) I] w = [z; 0]
    A = torch.cat([M.transpose(-1, -2), math.sqrt(ridge) * torch.eye(K, dtype=D64).expand(B, K, K)], -2)
    rhs = torch.cat([z.transpose(-1, -2), torch.zeros(B, K, N, dtype=D64)], -2)
    expected = torch.linalg.lstsq(A, rhs).solution.transpose(-1, -2)
    torch.testing.assert_close(w, expected, rtol=1e-9, atol=1e-9)


def test_read_and_read_variance_broadcast():
    gen = torch.Generator().manual_seed(4)
    R = torch.randn(2, 1, 5, 3, generator=gen, dtype=D64)             # (B, 1, K, C)
    U = torch.stack([random_spd(5, gen) for _ in range(2)]).unsqueeze(1)
    w = torch.randn(4, 2, 6, 5, generator=gen, dtype=D64)             # (S, B, T, K)
    out = read(R, w)
    assert out.shape == (4, 2, 6, 3)
    torch.testing.assert_close(out[3, 1, 2], w[3, 1, 2] @ R[1, 0])
    var = read_variance(U, w)
    assert var.shape == (4, 2, 6)
    torch.testing.assert_close(var[0, 1, 5], w[0, 1, 5] @ U[1, 0] @ w[0, 1, 5])


def _mvn(d: MatrixNormal) -> MultivariateNormal:
    C = d.event_shape[1]
    return MultivariateNormal(vec(d.loc), torch.kron(torch.eye(C, dtype=d.loc.dtype), d.row_covariance))


def _random_matrix_normal(gen, batch, K, C) -> MatrixNormal:
    loc = torch.randn(*batch, K, C, generator=gen, dtype=D64)
    L = torch.linalg.cholesky(torch.stack([random_spd(K, gen) for _ in range(math.prod(batch))]))
    return MatrixNormal(loc, L.reshape(*batch, K, K))


def test_matrix_normal_log_prob_and_kl_equal_vectorised_gaussians():
    gen = torch.Generator().manual_seed(5)
    K, C = 4, 3
    q = _random_matrix_normal(gen, (2,), K, C)
    p = _random_matrix_normal(gen, (2,), K, C)
    value = torch.randn(5, 2, K, C, generator=gen, dtype=D64)
    torch.testing.assert_close(q.log_prob(value), _mvn(q).log_prob(vec(value)))
    kl = kl_divergence(q, p)
    assert kl.shape == (2,)
    torch.testing.assert_close(kl, kl_divergence(_mvn(q), _mvn(p)))
    torch.testing.assert_close(q.entropy(), _mvn(q).entropy())
    assert kl_divergence(q, q).abs().max() < 1e-10


def test_matrix_normal_expand_broadcasts_and_keeps_kl():
    gen = torch.Generator().manual_seed(6)
    q = _random_matrix_normal(gen, (3, 1), 4, 2)                       # (B, 1) like an episodes plate
    prior = _random_matrix_normal(gen, (1,), 4, 2)
    prior = MatrixNormal(prior.loc[0], prior.scale_tril[0])            # batch ()
    qe, pe = q.expand((5, 3, 1)), prior.expand((5, 3, 1))
    assert isinstance(qe, MatrixNormal) and qe.batch_shape == (5, 3, 1) and qe.event_shape == (4, 2)
    kl = kl_divergence(qe, pe)
    assert kl.shape == (5, 3, 1)
    torch.testing.assert_close(kl[2], kl_divergence(q, prior))


def test_matrix_normal_rsample_moments_and_gradients():
    gen = torch.Generator().manual_seed(7)
    K, C = 3, 2
    d = _random_matrix_normal(gen, (), K, C)
    loc = d.loc.clone().requires_grad_(True)
    d = MatrixNormal(loc, d.scale_tril)
    torch.manual_seed(0)
    samples = d.rsample((40000,))                                     # (N, K, C)
    assert samples.shape == (40000, K, C)
    torch.testing.assert_close(samples.mean(0), d.loc.detach(), atol=0.03, rtol=0)
    for c in range(C):                                                 # every column ~ N(loc[:, c], U)
        cov = torch.cov(samples[:, :, c].T.detach())
        torch.testing.assert_close(cov, d.row_covariance, atol=0.05, rtol=0)
    cross = samples[:, :, 0].detach() - d.loc[:, 0].detach()
    other = samples[:, :, 1].detach() - d.loc[:, 1].detach()
    assert (cross.T @ other / len(samples)).abs().max() < 0.05       # columns independent (V = I_C)
    samples.sum().backward()
    torch.testing.assert_close(loc.grad, torch.full((K, C), 40000.0, dtype=D64))


def test_matrix_normal_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="scale_tril"):
        MatrixNormal(torch.zeros(4, 3), torch.eye(3))
