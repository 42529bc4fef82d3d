"""Matrix-normal memory maths shared by the Kanerva Machine and the Dynamic Kanerva Machine.

The memory M is a K x C matrix (K slots, code size C) with the matrix-variate Gaussian
MN(R, U, I_C) (KM §3.1 eq. 4): mean R (K x C), row covariance U (K x K), column covariance
I_C, i.e. vec(M) ~ N(vec(R), I_C (x) U) with vec stacking columns: every column of M is an
independent N(R[:, c], U). Reading with weights w (K) gives w^T M (KM eq. 6).

Contents:

* ``read`` / ``read_variance``: w^T R and w^T U w, broadcasting over leading dims;
* ``read_gaussian``: the code's distribution read from the memory, mean-field or integrating M out;
* ``bayes_write``: the batch Bayesian update of KM eq. 9-11 for T images at once, through a
  Cholesky factor of Sigma_z (triangular solves, never an explicit inverse);
* ``bayes_write_step``: the same update for one image (KM §3.3 "on-line"; DKM's rank-1 write);
* ``ridge_weights``: DKM's least-squares addresses w* = (M M^T + lambda I)^{-1} M z;
* ``MatrixNormal``: a Pyro distribution for MN(R, U, I_C) parametrised by the Cholesky factor
  of U, with ``rsample`` and a closed-form KL registered with ``torch.distributions.kl``.

Every function is batched over any leading dimensions (episodes, particles); nothing loops in
Python over a batch.
"""
from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import register_kl


def read(R: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w^T R: weights (..., K) against memories (..., K, C) -> (..., C) (KM eq. 6)."""
    return (w.unsqueeze(-2) @ R).squeeze(-2)


def read_variance(U: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w^T U w: weights (..., K) against row covariances (..., K, K) -> (...)."""
    return (w.unsqueeze(-2) @ U @ w.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def read_gaussian(R: torch.Tensor, w: torch.Tensor, noise_var: float,
                  U: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """loc, scale (..., C) of the code read with weights w (..., K) from a memory (..., K, C).

    Without ``U``: p(z | w, M = R) = N(w^T R, sigma^2 I_C), the mean-field read (KM eq. 6, §3.4).
    With the row covariance U (..., K, K): the memory is integrated out,
    p(z | w, R, U) = N(w^T R, (w^T U w + sigma^2) I_C) (KM Appendix F eq. 19).
    """
    loc = read(R, w)
    var = torch.as_tensor(noise_var, dtype=loc.dtype, device=loc.device)
    if U is not None:
        var = read_variance(U, w) + var
    return loc, var.sqrt().unsqueeze(-1).expand(loc.shape)


def bayes_write(R: torch.Tensor, U: torch.Tensor, W: torch.Tensor, Z: torch.Tensor,
                noise_var: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior MN(R', U', I_C) of the memory after observing Z = W M + noise (KM eq. 9-11).

    R (..., K, C) and U (..., K, K) describe the memory before the write; W (..., T, K) holds
    the T images' weights and Z (..., T, C) their codes; ``noise_var`` is the variance of the
    observation noise, a number (Sigma_xi = sigma^2 I, KM eq. 6) or one variance per image
    (..., T) (Appendix F adds the codes' own uncertainty to the diagonal).

        Delta   = Z - W R                     (eq. 9)
        Sigma_c = W U,  Sigma_z = W U W^T + Sigma_xi          (eq. 10)
        R' = R + Sigma_c^T Sigma_z^{-1} Delta,  U' = U - Sigma_c^T Sigma_z^{-1} Sigma_c   (eq. 11)

    With Sigma_z = L L^T, G = L^{-1} Sigma_c and H = L^{-1} Delta, so R' = R + G^T H and
    U' = U - G^T G: one Cholesky factorisation and one triangular solve for both terms.
    """
    T = W.shape[-2]
    sigma_c = W @ U                                                   # (..., T, K)
    sigma_z = sigma_c @ W.transpose(-1, -2)                           # (..., T, T)
    noise = torch.as_tensor(noise_var, dtype=W.dtype, device=W.device)
    sigma_z = sigma_z + torch.diag_embed(noise.expand(T) if noise.dim() == 0 else noise)
    L = torch.linalg.cholesky(sigma_z)                                # (..., T, T)
    delta = Z - W @ R                                                 # (..., T, C)
    K = U.shape[-1]
    # one solve for [Sigma_c | Delta]: (..., T, K + C); shapes of the two may broadcast differently
    lead = torch.broadcast_shapes(sigma_c.shape[:-2], delta.shape[:-2], L.shape[:-2])
    rhs = torch.cat([sigma_c.expand(*lead, *sigma_c.shape[-2:]), delta.expand(*lead, *delta.shape[-2:])], -1)
    GH = torch.linalg.solve_triangular(L, rhs, upper=False)
    G, H = GH[..., :K], GH[..., K:]                                   # (..., T, K), (..., T, C)
    R_new = R + G.transpose(-1, -2) @ H
    U_new = U - G.transpose(-1, -2) @ G
    return R_new, 0.5 * (U_new + U_new.transpose(-1, -2))            # G^T G is symmetric only up to rounding


def bayes_write_step(R: torch.Tensor, U: torch.Tensor, w: torch.Tensor, z: torch.Tensor,
                     noise_var: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``bayes_write`` for a single image (T = 1): a rank-1 update, Sigma_z is a scalar.

    R (..., K, C), U (..., K, K), w (..., K), z (..., C); ``noise_var`` a number or (...).
    Writing T images one after the other equals one batch write (KM §3.3). With
    h = U w / sqrt(Sigma_z) and d = (z - w^T R) / sqrt(Sigma_z): R' = R + h d^T, U' = U - h h^T,
    each one fused batched product (``baddbmm``); U' is exactly symmetric (h_i h_j = h_j h_i).
    """
    K, C = R.shape[-2:]
    lead = torch.broadcast_shapes(R.shape[:-2], U.shape[:-2], w.shape[:-1], z.shape[:-1])
    R, U = R.expand(*lead, K, C).reshape(-1, K, C), U.expand(*lead, K, K).reshape(-1, K, K)
    w, z = w.expand(*lead, K).reshape(-1, K), z.expand(*lead, C).reshape(-1, C)
    noise = torch.as_tensor(noise_var, dtype=R.dtype, device=R.device).expand(lead).reshape(-1, 1)
    g = torch.bmm(U, w.unsqueeze(-1)).squeeze(-1)                     # Sigma_c^T = U w: (N, K)
    root_s = ((w * g).sum(-1, keepdim=True) + noise).sqrt()           # sqrt(Sigma_z): (N, 1)
    h = g / root_s
    d = (z - read(R, w)) / root_s                                     # (N, C)
    R_new = torch.baddbmm(R, h.unsqueeze(-1), d.unsqueeze(-2))
    U_new = torch.baddbmm(U, -h.unsqueeze(-1), h.unsqueeze(-2))
    return R_new.reshape(*lead, K, C), U_new.reshape(*lead, K, K)


def ridge_weights(M: torch.Tensor, z: torch.Tensor, ridge: float | torch.Tensor) -> torch.Tensor:
    """DKM addresses: w* = argmin_w ||z - w^T M||^2 + ridge ||w||^2 = (M M^T + ridge I)^{-1} M z.

    M (..., K, C), z (..., N, C) -> w* (..., N, K); ``ridge`` = sigma_xi^2 / sigma_w0^2 > 0
    keeps the system positive definite even when slots are collinear or K > C. The system is
    factorised once (Cholesky) and solved for all N codes. When C < K the push-through identity
    (M M^T + ridge I_K)^{-1} M = M (M^T M + ridge I_C)^{-1} gives the same w* from a C x C system,
    so the cost grows like K C^2 rather than K^3 for large memories.
    """
    K, C = M.shape[-2:]
    Mt = M.transpose(-1, -2)
    zt = z.transpose(-1, -2)                                          # (..., C, N)
    if K <= C:
        A = M @ Mt + ridge * torch.eye(K, dtype=M.dtype, device=M.device)          # (..., K, K)
        return torch.cholesky_solve(M @ zt, torch.linalg.cholesky(A)).transpose(-1, -2)
    A = Mt @ M + ridge * torch.eye(C, dtype=M.dtype, device=M.device)              # (..., C, C)
    return (M @ torch.cholesky_solve(zt, torch.linalg.cholesky(A))).transpose(-1, -2)


def _half_logdet(scale_tril: torch.Tensor) -> torch.Tensor:
    """(1/2) ln det(L L^T) = sum ln diag(L)."""
    return scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)


class MatrixNormal(TorchDistribution):
    """MN(loc, U, I_C) with U = scale_tril scale_tril^T: event shape (K, C).

    ``loc`` (..., K, C), ``scale_tril`` (..., K, K) lower triangular with a positive diagonal.
    Equivalent to a MultivariateNormal over vec(M) with covariance I_C (x) U, without ever
    forming the KC x KC matrix: log_prob costs one K x K triangular solve against C columns.
    """

    arg_constraints = {"loc": constraints.independent(constraints.real, 2),
                       "scale_tril": constraints.lower_cholesky}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor, validate_args=None):
        if loc.dim() < 2 or scale_tril.dim() < 2 or scale_tril.shape[-1] != scale_tril.shape[-2] \
                or scale_tril.shape[-1] != loc.shape[-2]:
            raise ValueError(f"MatrixNormal: expected loc (..., K, C) and scale_tril (..., K, K), got "
                             f"{tuple(loc.shape)} and {tuple(scale_tril.shape)}")
        K, C = loc.shape[-2:]
        batch_shape = torch.broadcast_shapes(loc.shape[:-2], scale_tril.shape[:-2])
        self.loc = loc.expand(*batch_shape, K, C)
        self.scale_tril = scale_tril.expand(*batch_shape, K, K)
        super().__init__(batch_shape, torch.Size((K, C)), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MatrixNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(*batch_shape, *self.event_shape)
        new.scale_tril = self.scale_tril.expand(*batch_shape, *self.scale_tril.shape[-2:])
        super(MatrixNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def row_covariance(self) -> torch.Tensor:
        """U = L L^T: (..., K, K)."""
        return self.scale_tril @ self.scale_tril.transpose(-1, -2)

    @property
    def variance(self) -> torch.Tensor:
        """Var(M[k, c]) = U[k, k] for every column c: (..., K, C)."""
        return self.scale_tril.pow(2).sum(-1).unsqueeze(-1).expand(self.loc.shape)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """M = loc + L E with E of iid standard normals: every column ~ N(loc[:, c], L L^T)."""
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.scale_tril @ eps

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        K, C = self.event_shape
        diff = value - self.loc                                       # (..., K, C)
        L = self.scale_tril.expand(*diff.shape[:-2], K, K)
        maha = torch.linalg.solve_triangular(L, diff, upper=False).pow(2).sum((-2, -1))
        return -0.5 * (maha + K * C * math.log(2 * math.pi)) - C * _half_logdet(self.scale_tril)

    def entropy(self) -> torch.Tensor:
        K, C = self.event_shape
        return 0.5 * K * C * (1 + math.log(2 * math.pi)) + C * _half_logdet(self.scale_tril)


@register_kl(MatrixNormal, MatrixNormal)
def kl_matrix_normal(q: MatrixNormal, p: MatrixNormal) -> torch.Tensor:
    """KL(MN(R_q, U_q, I) || MN(R_p, U_p, I)), closed form with full row covariances:

        1/2 [ C tr(U_p^{-1} U_q) + tr((R_q - R_p)^T U_p^{-1} (R_q - R_p)) - K C
              + C (ln det U_p - ln det U_q) ]

    With U = L L^T: tr(U_p^{-1} U_q) = ||L_p^{-1} L_q||_F^2 and the Mahalanobis term is
    ||L_p^{-1} (R_q - R_p)||_F^2; one triangular solve gives both.
    """
    K, C = q.event_shape
    lead = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    Lp = p.scale_tril.expand(*lead, K, K)
    rhs = torch.cat([q.scale_tril.expand(*lead, K, K), (q.loc - p.loc).expand(*lead, K, C)], -1)
    sol = torch.linalg.solve_triangular(Lp, rhs, upper=False)        # (..., K, K + C)
    trace = sol[..., :K].pow(2).sum((-2, -1))
    maha = sol[..., K:].pow(2).sum((-2, -1))
    logdet_ratio = 2 * (_half_logdet(p.scale_tril) - _half_logdet(q.scale_tril))
    return 0.5 * (C * trace + maha - K * C + C * logdet_ratio)
