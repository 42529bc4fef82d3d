"""The Dynamic Kanerva Machine as a Pyro program (Wu, Wayne, Gregor & Lillicrap, NeurIPS 2018).

It keeps the Kanerva Machine's matrix-normal memory and replaces its learned addresses by
addresses solved against the memory ("Learning Attractor Dynamics for Generative Memory", §2-3).
Generative program for B episodes of T images, the memory K x L (K = ``slots``, L = ``code_size``):

    M ~ MN(R0, U0, I_L)              learned R0, full U0 (``pyro_kpp.models.km.MemoryPrior``)
    w_t ~ N(0, sigma_w0^2 I_K)       sigma_w0 = 1
    z_t ~ N(w_t^T M, sigma_xi^2 I_L) sigma_xi = 1
    x_t ~ p(x | z_t)                 the shared decoder

Guide (``pyro_kpp.guides.dkm``): the codes c_t of the images are written into the memory one
after the other, each by a rank-1 Bayes update (KM eq. 9-11 with T = 1) at the address
w = (R R^T + (sigma_xi^2 / sigma_w0^2) I)^{-1} R c_t solved against the current memory mean R;
q(M | X) = MN(R_T, U_T, I) is the final posterior, sampled at the episode-level site "memory";
q(w_t | x_t, M) = N(w*_t, sigma_w^2 I) with w*_t solved against R_T; q(z_t | w_t, M) = p(z_t | w_t, M).

Pyro's ELBO of this pair is DKM's bound on ln p(X):

    sum_t E[ln p(x_t | z_t)] - sum_t KL(q(w_t) || p(w_t)) - KL(q(M | X) || p(M)),

with the memory KL in closed form under ``TraceMeanField_ELBO`` (``kl_matrix_normal``, factor
1/2, full U) and as ln p(M) - ln q(M) at the sampled M under ``Trace_ELBO``. The memory site
is inside the "episodes" plate and outside "images", so the KL is counted once per episode;
the per-image figure divides the episode's bound by T once (``pyro_kpp.inference.bound``), never the KL
by T and then again by averaging over T (a pitfall of a public port).

Choices (also in the README):

* w is written at its mean w* (not a sample of q(w)): q(M | X) is then a deterministic function
  of X and exactly matrix-normal. ``dkm_write_iterations`` > 1 re-solves w against the tentative
  posterior, each time updating again from the memory before this image (DKM.md).
* U0 is the full learned row covariance of KM (DeepMind's module uses sigma0^2 I).
* The diagonal of U is not clamped (DKM.md mentions [1e-6, 1e10]): the rank-1 update keeps U
  symmetric positive definite in float32 (tests), and a clamped diagonal could not restore
  definiteness anyway.
* Efficiency: the write loops over the T images only; every step is batched over the B
  episodes: one Cholesky factorisation of a min(K, L)-sized system for the ridge solve
  (``ridge_weights``) and two fused rank-1 products for the update, O(K^2); no matrix is ever
  inverted.

API: the memory value is (R, U); the keys are the addresses w (B, N, K). ``generate`` reads
p(z | w, R, U) with the memory integrated out, N(w^T R, (w^T U w + sigma_xi^2) I) (KM eq. 19).
``infer_keys(x, memory)`` solves the addresses against a given memory, so the generic iterative
read (``pyro_kpp.reading.iterative.iterative_read``) is DKM's attractor dynamics: each step solves the
addresses of the current query against the *fixed* memory, reads, decodes and feeds a sample back.
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from pyro_kpp.config import Config
from pyro_kpp.guides.dkm import DkmGuide
from pyro_kpp.maths.matrix_normal import MatrixNormal, bayes_write_step, read_gaussian, ridge_weights
from pyro_kpp.models.base import EpisodicModel, Memory, episode_cached, episode_memory, pyro_program
from pyro_kpp.models.km import MemoryPrior, raw_scale
from pyro_kpp.nets.build import dense_spectral_norm

NOISE_VAR = 1.0                    # sigma_xi^2
W_PRIOR_SCALE = 1.0                # sigma_w0
RIDGE = NOISE_VAR / W_PRIOR_SCALE ** 2
W_SCALE_INIT = 0.3                 # sigma_w at initialisation (DKM.md)


class DynamicKanervaMachine(EpisodicModel):
    """DKM: a latent matrix-normal memory addressed by least squares."""

    memory_is_latent = True
    conditional_bound = False                                  # ln p(X): the memory is integrated
    address_site = "w"
    key_name = "addresses w"
    key_scale = W_PRIOR_SCALE

    def __init__(self, cfg: Config, name: str = "dkm"):
        super().__init__(cfg, name)
        self.prior = MemoryPrior(cfg.slots, cfg.code_size)
        self.q = DkmGuide(cfg.embed_size, cfg.code_size, raw_scale(W_SCALE_INIT), dense_spectral_norm(cfg))

    # -- writing -------------------------------------------------------------------------------
    def write_memory(self, codes: torch.Tensor, start: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, U) of q(M | X), (B, K, L) and (B, K, K): the codes (B, T, L) written one by one onto
        ``start`` = (R, U), by default the prior MN(R0, U0)."""
        B, T, L = codes.shape
        K = self.cfg.slots
        if start is None:
            start = self.prior.loc.expand(B, K, L), self.prior.row_covariance().expand(B, K, K)
        R, U = start
        for t in range(T):
            R, U = self.write_step(R, U, codes[:, t])
        return R, U

    def write_step(self, R: torch.Tensor, U: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MN(R, U) (B, K, L), (B, K, K) updated with one code c (B, L) at its address solved against
        the memory (``dkm_write_iterations`` solves, each updating from MN(R, U))."""
        R_t, U_t = R, U
        for _ in range(self.cfg.dkm_write_iterations):
            w = ridge_weights(R_t, c.unsqueeze(-2), RIDGE).squeeze(-2)     # (B, K)
            R_t, U_t = bayes_write_step(R, U, w, c, NOISE_VAR)
        return R_t, U_t

    def codes_and_memory(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes (B, T, L) of x and q(M | X)'s (R, U), (B, K, L) and (B, K, K)."""
        codes = self.q.codes(self.embed(x))
        return (codes, *self.write_memory(codes))

    def written(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes (B, T, L) and q(M | X)'s (R, U) for x, once per x inside ``reuse_embedding``."""
        codes, R, U = episode_cached(self, x, "memory", lambda: self.codes_and_memory(x))
        return (codes, *episode_memory((R, U)))

    def held_out_cache(self, others: torch.Tensor, E_held: torch.Tensor) -> dict:
        """DKM's memory is latent: written from X without the held-out images X_f, it is the
        distribution q(M | X_-f) = MN(R_-f, U_-f), and the held-out model draws M from it instead of
        p(M): ln p(X_f | M written from X_-f) = ln E_{q(M|X_-f)}[p(X_f | M)], a proper density over
        X_f. Its guide is DKM's own write continued with X_f's codes (``write_step`` per image), so
        the memory KL of the bound is KL(q(M | X_-f, X_f) || q(M | X_-f)): what storing X_f costs."""
        _, R, U = self.codes_and_memory(others)                                  # (B', K, L), (B', K, K)
        codes = self.q.codes(E_held)                                         # (B', n, L)
        return {"memory": (codes, *self.write_memory(codes, (R, U))), "memory_prior": (R, U)}

    def memory_prior(self, x: torch.Tensor) -> MatrixNormal:
        """p(M) = MN(R0, U0), or inside ``held_out`` (``leave_one_out``) the memory written from the
        rest of the episode, MN(R_-f, U_-f) with batch shape (B', 1)."""
        written = episode_cached(self, x, "memory_prior", lambda: None)
        if written is None:
            return self.prior.dist()
        R, U = written
        return MatrixNormal(R.unsqueeze(1), torch.linalg.cholesky(U).unsqueeze(1))

    def key_shape(self) -> tuple[int, ...]:
        return (self.cfg.slots,)

    def code_prior(self, memory: tuple[torch.Tensor, torch.Tensor], w: torch.Tensor):
        """p(z | w, R, U) with the memory integrated out: loc, scale (..., B, N, L) for addresses w
        (..., B, N, K)  (KM eq. 19)."""
        R, U = memory
        return read_gaussian(R.unsqueeze(-3), w, NOISE_VAR, U.unsqueeze(-3))

    # -- Pyro program and guide --------------------------------------------------------------
    @pyro_program
    def model(self, x: torch.Tensor) -> None:
        B, T = self.check_episode(x)
        with pyro.plate("episodes", B, dim=-2):
            M = pyro.sample("memory", self.memory_prior(x))                       # (..., B, 1, K, L)
            with pyro.plate("images", T, dim=-1):
                w = pyro.sample("w", self.key_prior(x))                           # (..., B, T, K)
                z_loc, z_scale = read_gaussian(M, w, NOISE_VAR)
                z = pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))     # (..., B, T, L)
                pyro.sample("x", self.likelihood.dist(self.decode(z)), obs=x)

    @pyro_program
    def guide(self, x: torch.Tensor) -> None:
        codes, R, U = self.written(x)
        self.q(codes, R, U, RIDGE, NOISE_VAR ** 0.5)

    # -- memory API ----------------------------------------------------------------------------
    def memory_from(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, U) of q(M | X) written from x."""
        return self.codes_and_memory(x)[1:]

    def posterior_keys(self, x: torch.Tensor, memory: Memory | None) -> torch.Tensor:
        """Posterior-mean addresses w* of q(w | x, M): (B, T, K), solved against ``memory`` when
        given (iterative reading: DKM's attractor dynamics), else against the memory written
        from x itself, as in training."""
        codes = self.q.codes(self.embed(x))                                   # (B, T, L)
        R = memory.value[0] if memory is not None else self.write_memory(codes)[0]
        return ridge_weights(R, codes, RIDGE)

    def memory_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.prior.memory_shapes()
