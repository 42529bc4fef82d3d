"""The Kanerva Machine as a Pyro program (Wu, Wayne, Graves & Lillicrap, ICLR 2018, §3).

Generative program for B episodes of T images, x: (B, T, C, H, W); the memory M is K x L
(K = ``slots`` rows, L = ``code_size``):

    p(M) = MN(R0, U0, I_L)           learned R0 and full row covariance U0        (§3.1 eq. 4)
    y_t ~ N(0, I_S)                  addressing variable, S = ``address_size``    (§3.1)
    w_t = f(y_t)^T A                 A: K x S addresses, rows of unit L2 norm     (eq. 5)
    z_t ~ N(w_t^T M, sigma^2 I_L)    memory-dependent prior, sigma = 1            (eq. 6)
    x_t ~ p(x | z_t)                 the shared decoder

Writing (§3.3, eq. 8-11): q(M | X) is the exact posterior p(M | Y, Z) of the linear Gaussian
model for one sample Y ~ q(y|x), Z ~ q(z|x) of the episode, computed from the prior by the
batch Bayesian update (``pyro_kpp.maths.matrix_normal.bayes_write``; it equals T on-line updates,
which the paper uses, and costs one T x T Cholesky factorisation instead of T steps).

Reading and the bound (§3.2, §3.4 eq. 12): with the guide q(y_t | x_t) q(z_t | x_t, y_t, M)
(``pyro_kpp.guides.km``), Pyro's ELBO of this program is eq. 12 for one draw of the written
memory: sum_t E[ln p(x_t|z_t)] - KL(q(y_t|x_t) || p(y_t)) - KL(q(z_t|x_t,y_t,M) || p(z_t|y_t,M)).
It bounds the conditional likelihood ln p(X | M): the memory is conditioned on, with no KL
term of its own. In the programs the written memory is the pair of episode-level sites
"memory" (R) and "memory_row_cov" (U), each a ``WrittenMemory``: a point mass at the write with
density 1, so they add nothing to the bound. The guide writes and samples them; the model
states the same sites, so Pyro's replay hands the model the guide's write (with no context;
run on its own, the model writes itself). Inside ``reuse_embedding`` (``pyro_kpp.inference.handlers``;
every ELBO and bound evaluation of the package) the write is also computed once per episode batch
and cached, which makes all importance particles of an evaluation read one written memory, as
ln p(x_t | M) requires. Nothing is divided by T here; the per-image figure is the episode's bound
divided by T, once, in ``pyro_kpp.inference.bound``.

Memory access, ``km_read_write`` (§3.4, Appendix F):

* ``"mean"`` (default): write the sampled codes Z with noise Sigma_xi = sigma^2 I, read the
  mean-field memory M = R: p(z_t | y_t, M) = N(w_t^T R, sigma^2 I).
* ``"distribution"``: write the codes' means mu_Q with Sigma_z' = W U W^T + Sigma_xi + Sigma_Q
  (eq. 20-21) and read p(z_t | y_t, R, U) = N(w_t^T R, (w_t^T U w_t + sigma^2) I) (eq. 19).
  Sigma_Q must be T x T for the column covariance to stay I_L, while q(z_t|x_t) is diagonal
  over code dimensions: we use each image's mean variance over the L dimensions (choice; exact
  when q(z_t|x_t) is isotropic).

Choices where the paper is silent (also in the README): y_t has the size S of the key b_t
(the paper gives S = 50, not dim y_t); R0 starts as truncated N(0, 1) entries (as DeepMind's
DKM memory module) and U0 as I; f and every guide head are 2-layer MLPs (Appendix C) with ELU.

API: the memory value is (R, U), (B, K, L) and (B, K, K); the keys are the addressing
variables y (B, N, S).
"""
from __future__ import annotations

import functools
import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_kpp.config import Config
from pyro_kpp.guides.km import KmGuide
from pyro_kpp.maths.matrix_normal import MatrixNormal, bayes_write, read, read_gaussian
from pyro_kpp.models.base import EpisodicModel, Memory, episode_cached, episode_memory, pyro_program
from pyro_kpp.nets.build import dense_spectral_norm
from pyro_kpp.nets.conv import SCALE_FLOOR, DenseNet, positive_scale
from torch.distributions import constraints

NOISE_VAR = 1.0  # sigma^2 of p(z | y, M), fixed to 1 (KM eq. 6)


def raw_scale(value: float) -> float:
    """The unconstrained parameter that ``positive_scale`` maps to ``value``."""
    return math.log(math.expm1(value - SCALE_FLOOR))


class MemoryPrior(PyroModule):
    """p(M) = MN(R0, U0, I_L): learned mean R0 (K x L) and row covariance U0 = L0 L0^T (KM §3.1).

    U0 is parametrised by its Cholesky factor L0: a free strictly-lower triangle and a diagonal
    made positive by ``positive_scale``, so U0 is symmetric positive definite for any value of
    the parameters (KM Fig. 10: a full U0 trains much faster than a diagonal one).
    """

    def __init__(self, slots: int, code_size: int):
        super().__init__()
        self.loc = nn.Parameter(nn.init.trunc_normal_(torch.empty(slots, code_size)))
        self.tril_raw = nn.Parameter(torch.zeros(slots, slots))
        self.diag_raw = nn.Parameter(torch.full((slots,), raw_scale(1.0)))

    def scale_tril(self) -> torch.Tensor:
        """L0: (K, K) lower triangular with a positive diagonal."""
        return torch.tril(self.tril_raw, -1) + torch.diag_embed(positive_scale(self.diag_raw))

    def row_covariance(self) -> torch.Tensor:
        """U0 = L0 L0^T: (K, K), symmetrised, so that it is exactly symmetric whatever the BLAS
        kernel's summation order for the two triangles of the product."""
        L = self.scale_tril()
        U = L @ L.T
        return (U + U.T) / 2

    def dist(self) -> MatrixNormal:
        return MatrixNormal(self.loc, self.scale_tril())

    def memory_shapes(self) -> tuple[tuple[int, ...], ...]:
        """(R, U) of a memory with this prior: the K x L mean and the K x K row covariance."""
        K, L = self.loc.shape
        return (K, L), (K, K)


class WrittenMemory(dist.TorchDistribution):
    """A point mass at a written memory tensor, with density 1 for every value: the memory is
    conditioned on, and the site adds nothing to the bound. ``write()`` gives the value (per
    episode, batch shape (B, 1)); it runs only when the site is sampled, never under replay."""

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, write, batch_shape: torch.Size, event_shape: torch.Size):
        self.write = write
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args=False)

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def expand(self, batch_shape, _instance=None):
        return WrittenMemory(self.write, torch.Size(batch_shape), self.event_shape)

    def rsample(self, sample_shape=torch.Size()):
        return self.write().expand(torch.Size(sample_shape) + self.batch_shape + self.event_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return value.new_zeros(value.shape[:value.dim() - len(self.event_shape)])


class KanervaMachine(EpisodicModel):
    """KM: a matrix-normal memory written by Bayes' rule, read through learned addresses."""

    address_site = "y"
    key_name = "addresses y"

    def __init__(self, cfg: Config, name: str = "km"):
        super().__init__(cfg, name)
        K, S = cfg.slots, cfg.address_size
        self.prior = MemoryPrior(K, cfg.code_size)
        self.addresses_raw = nn.Parameter(torch.randn(K, S))
        sn = dense_spectral_norm(cfg)                                      # "paper" preset, as K++
        self.key_net = DenseNet(S, S, cfg.hidden, 1, sn)                   # f, a 2-layer MLP (App. C)
        self.q = KmGuide(cfg.embed_size, S, cfg.code_size, cfg.hidden, sn)

    # -- pieces named after the paper's equations ------------------------------------------
    def addresses(self) -> torch.Tensor:
        """A: (K, S) with rows of unit L2 norm (§3.1: "to avoid degeneracy")."""
        return nn.functional.normalize(self.addresses_raw, dim=-1)

    def weights(self, y: torch.Tensor) -> torch.Tensor:
        """w_t = f(y_t)^T A: (..., S) -> (..., K)  (eq. 5)."""
        return self.key_net(y) @ self.addresses().T

    def write_memory(self, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, U) of q(M | X), (B, K, L) and (B, K, K), from the embeddings E (B, T, D)  (eq. 8-11)."""
        y_loc, y_scale = self.q.address_posterior(E)
        W = self.weights(dist.Normal(y_loc, y_scale).rsample())           # (B, T, K)
        z_loc, z_scale = self.q.write_code_head(E)                        # (B, T, L)
        if self.cfg.km_read_write == "mean":
            Z, noise = dist.Normal(z_loc, z_scale).rsample(), NOISE_VAR
        else:                                                              # Appendix F eq. 20-21
            Z, noise = z_loc, NOISE_VAR + z_scale.pow(2).mean(-1)         # noise: (B, T)
        return bayes_write(self.prior.loc, self.prior.row_covariance(), W, Z, noise)

    def written(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory written from x, shared by guide and model inside ``reuse_embedding``."""
        return episode_memory(episode_cached(self, x, "memory", lambda: self.memory_from(x)))

    def readout(self, R: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """w_t^T R: memory means R (B, K, L), addresses y (..., B, T, S) -> (..., B, T, L)."""
        return read(R.unsqueeze(-3), self.weights(y))

    def key_shape(self) -> tuple[int, ...]:
        return (self.cfg.address_size,)

    def code_prior(self, memory: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor):
        """p(z_t | y_t, M): loc, scale (..., B, T, L) for M = (R, U) and y (..., B, T, S)  (eq. 6 or App. F eq. 19)."""
        R, U = memory
        U = U.unsqueeze(-3) if self.cfg.km_read_write == "distribution" else None
        return read_gaussian(R.unsqueeze(-3), self.weights(y), NOISE_VAR, U)

    def written_sites(self, write) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample the sites "memory" and "memory_row_cov" (``WrittenMemory``) of the write
        ``write()`` -> (R, U); returns their values (..., B, K, L) and (..., B, K, K).
        Call inside the "episodes" plate."""
        K, L = self.prior.memory_shapes()[0]
        R = pyro.sample("memory", WrittenMemory(lambda: write()[0].unsqueeze(1), (1,), (K, L)))
        U = pyro.sample("memory_row_cov", WrittenMemory(lambda: write()[1].unsqueeze(1), (1,), (K, K)))
        return R.squeeze(-3), U.squeeze(-3)

    # -- Pyro program and guide --------------------------------------------------------------
    @pyro_program
    def model(self, x: torch.Tensor) -> None:
        B, T = self.check_episode(x)
        write = functools.cache(lambda: self.written(x))                 # run only if not replayed
        with pyro.plate("episodes", B, dim=-2):
            # the values of the sites are used, so poutine.condition(data={"memory": M}) reads any M
            R, U = self.written_sites(write)                              # (..., B, K, L), (..., B, K, K)
            with pyro.plate("images", T, dim=-1):
                y = pyro.sample("y", self.key_prior(x))                            # (..., B, T, S)
                z_loc, z_scale = self.code_prior((R, U), y)
                z = pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))      # (..., B, T, L)
                pyro.sample("x", self.likelihood.dist(self.decode(z)), obs=x)

    @pyro_program
    def guide(self, x: torch.Tensor) -> None:
        written = self.written(x)                                         # the stochastic write, once
        self.q(self.embed(x), functools.partial(self.readout, written[0]),
               functools.partial(self.written_sites, lambda: written))

    # -- memory API ----------------------------------------------------------------------------
    def memory_from(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, U) written from x: one draw of q(M | X) (eq. 8)."""
        return self.write_memory(self.embed(x))

    def posterior_keys(self, x: torch.Tensor, memory: Memory | None) -> torch.Tensor:
        """Posterior-mean addresses of q(y | x): (B, T, S); q(y | x) does not read the memory."""
        return self.q.address_posterior(self.embed(x))[0]

    def read(self, memory: Memory, x: torch.Tensor, keys: torch.Tensor, sample_z: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """KM Algorithm 1: the code of a query read from the memory comes from the posterior
        q(z | x, y, M), which sees the query as well as the read w^T R."""
        self.check_keys(memory, keys)
        z_loc, z_scale = self.q.code_posterior(self.embed(x), self.readout(memory.value[0], keys))  # (B, T, L)
        return self.decode_code(z_loc, z_scale, sample_z, generator)

    def memory_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.prior.memory_shapes()
