"""Kanerva++ as a Pyro program (Ramapuram, Wu & Kalousis, ICLR 2021, §3).

Generative program for B episodes of T images, x: (B, T, C, H, W):

    E = f_enc(X)                         embedding, one e_t per image        (§3.3)
    M = f_mem(mean_t e_t)                deterministic memory, C x H x W     (§3.3, eq. 5)
      [+ sum_t f_ST^T(g(e_t), mu_key(e_t))]  the addressed write (``kpp_write``, below)
    y_tk ~ N(0, I_3),  k = 1..K          read keys                           (§3.4)
    M_hat_t = [f_ST(M, y_t1), ..., f_ST(M, y_tK)]   K windows stacked on channels (eq. 5)
    z_t ~ N(mu_z(M_hat_t), sigma_z(M_hat_t))        learned prior p(z | M, y)  (eq. 4)
    x_t ~ p(x | z_t)                     decoder, Bernoulli for binarized data

With the guide q(y|X) q(z|X) (``pyro_kpp.guides.kpp``), Pyro's ELBO of this program is
eq. 4 summed over the episode:  sum_t E[ln p(x_t|z_t)] - E_q(y)[KL(q(z_t|X) || p(z_t|M,y_t))]
- KL(q(y_t|X) || p(y_t)). Nothing is divided by T inside the model; the per-image figure is
the episode's bound divided by T, taken once, in ``pyro_kpp.inference.bound``.

The write, ``Config.kpp_write`` (a choice beyond the paper where it is silent; README "Memory use",
where every part of the default is measured against the literal write):

* ``"pooled"``: M = f_mem(mean_t e_t), the literal reading of §3.3. Trained on Omniglot it learns
  one memory for every episode: the bound with another episode's memory is the same.
* ``"addressed"``: M = f_mem(mean_t e_t) + sum_t f_ST^T(g(e_t), mu_key(e_t)). Each image also
  writes a block g(e_t) (one window per read) exactly where the mean of its key posterior reads,
  with f_ST^T the adjoint of the bilinear read (``SpatialTransformerRead.adjoint``). Fig. 3 puts
  "infer keys" in the write model, which this reading takes; the memory is still a deterministic
  function of the episode, M ~ delta(f(X)) (eq. 5), recorded at the site "memory".
* ``"addressed-mean"``: the addressed part is divided, cell by cell, by the total bilinear weight
  written into the cell (at least 1), so overlapping windows average instead of adding up.
* ``"blocks"`` (the default): the addressed part alone, M = sum_t f_ST^T(g(e_t), mu_key(e_t)), with no f_mem:
  a cell holds something only where an image of this episode wrote, so the memory can hold no
  fixed "semantic" table for the keys to index (the keys cannot become a per-image code into it).

* ``"solved"`` (a departure for issue 20, K++ on KM's footing): each image stores its *code*,
  the block b_t = A mu_z(X)_t (A: L -> K C r r, injective, learned; mu_z the mean of q(z|X)), and
  the memory is the ridge least-squares solution of "reading every image's block at its mean
  keys returns it": M = argmin sum_t ||R_t M - b_t||^2 + lambda ||M||^2, with R_t the read of
  image t (blur, window, average-pool to r x r). ``SOLVE_ITERATIONS`` conjugate-gradient steps
  (``pyro_kpp.maths.solve``) solve it. The prior's mean then adds B R_y M to the conv head's,
  B initialised to A's pseudo-inverse and the head's mean to 0, so that at the mean keys the
  prior returns mu_z from the first step, as KM's read returns the stored code. M stays a
  deterministic function of the episode (eq. 5).

``Config.kpp_block_res`` = r > 0 makes g write each block at r x r, bilinearly upsampled to the
window: a smooth block reads back nearly the same under a small shift of the key, so the key
posterior need not be sharp (and costly) to read it.

``Config.memory_blur`` = sigma > 0 (default 2): the learned prior reads the memory blurred by a
Gaussian of sigma memory pixels (``gaussian_blur``), so a read a pixel or two off its block still
sees it; the keys then need less precision (and fewer nats). The memory itself, the site
"memory" and the write are unchanged.

The code posterior, ``Config.kpp_posterior``: ``"x"`` is the paper's q(z | X); ``"read"`` is
q(z | X, M, y), whose network also sees the mean of p(z | M, y) at the sampled keys
(``pyro_kpp.guides.kpp``).
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyro_kpp.config import Config
from pyro_kpp.guides.kpp import KppGuide
from pyro_kpp.maths.solve import conjugate_gradient
from pyro_kpp.maths.spatial import KEY_DIM, SpatialTransformerRead
from pyro_kpp.models.base import EpisodicModel, Memory, episode_cached, episode_memory, pyro_program
from pyro_kpp.nets.build import dense_spectral_norm
from pyro_kpp.nets.conv import ConvGaussianHead, DenseNet, MemoryWriter, over_leading


def gaussian_blur(memory: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each channel of memory (B, C, H, W) convolved with a Gaussian of ``sigma`` memory pixels
    (``Config.memory_blur``), zero-padded like the read."""
    radius = max(1, round(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=memory.dtype, device=memory.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    C = memory.shape[1]
    rows = kernel.view(1, 1, -1, 1).expand(C, 1, -1, 1)
    cols = kernel.view(1, 1, 1, -1).expand(C, 1, 1, -1)
    memory = F.conv2d(memory, rows, padding=(radius, 0), groups=C)
    return F.conv2d(memory, cols, padding=(0, radius), groups=C)


#: The solved write (``kpp_write="solved"``): conjugate-gradient steps, and the ridge lambda that
#: keeps cells no image reads at 0 and the system positive definite.
SOLVE_ITERATIONS = 8
SOLVE_RIDGE = 1e-3


class KanervaPlusPlus(EpisodicModel):
    """K++: deterministic block memory read through spatial-transformer windows."""

    address_site = "keys"

    def __init__(self, cfg: Config, name: str = "kpp"):
        super().__init__(cfg, name)
        mem_c = cfg.memory_shape[0]
        window = (cfg.window, cfg.window)
        if cfg.kpp_write != "blocks":                                 # f_mem
            self.writer = MemoryWriter(cfg.embed_size, cfg.memory_shape, cfg.writer_channels)
        unit = cfg.window / min(cfg.memory_shape[1:])                   # one memory pixel per window pixel
        self.reader = SpatialTransformerRead(window, cfg.key_map, (cfg.key_scale_min * unit, cfg.key_scale_max * unit))
        self.prior_net = ConvGaussianHead(cfg.reads * mem_c, window, cfg.code_size)
        self.q = KppGuide(cfg.embed_size, cfg.reads, cfg.code_size, cfg.hidden,
                          spectral_norm=dense_spectral_norm(cfg),     # App. E (paper preset)
                          reads_memory=cfg.kpp_posterior == "read", key_std_floor=cfg.key_std_floor)
        block = cfg.reads * mem_c * self.block_res() ** 2
        if cfg.kpp_write == "solved":                                 # A: z -> block, B: block -> z
            self.code_map = nn.Linear(cfg.code_size, block, bias=False)
            self.code_readout = nn.Linear(block, cfg.code_size, bias=False)
            with torch.no_grad():
                self.code_readout.weight.copy_(torch.linalg.pinv(self.code_map.weight))
                self.prior_net.out.weight[:cfg.code_size].zero_()    # the head's mean starts at 0
                self.prior_net.out.bias[:cfg.code_size].zero_()
        elif cfg.kpp_write != "pooled":                               # g: e_t -> K blocks of C x r x r
            self.block_net = DenseNet(cfg.embed_size, block, cfg.hidden, 1, dense_spectral_norm(cfg))

    def block_res(self) -> int:
        """r: the resolution g writes each block at, upsampled to the h x w window (``kpp_block_res``)."""
        return self.cfg.kpp_block_res or self.cfg.window

    def blocks(self, E: torch.Tensor) -> torch.Tensor:
        """g(e_t): (B, T, D) -> (B, T, K, C, h, w), made at r x r and bilinearly upsampled."""
        B, T = E.shape[:2]
        C, r, h = self.cfg.memory_shape[0], self.block_res(), self.cfg.window
        blocks = self.block_net(E).reshape(B * T * self.cfg.reads, C, r, r)
        if r != h:
            blocks = F.interpolate(blocks, size=(h, h), mode="bilinear", align_corners=False)
        return blocks.reshape(B, T, self.cfg.reads, C, h, h)

    # -- the solved write: blocks read back exactly ------------------------------------------
    def read_blocks(self, memory: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """R_y M: memory (B, C, H, W), keys (..., B, T, K, 3) -> (..., B, T, K, C, r, r), the
        (blurred) windows average-pooled to the block resolution."""
        return self.pooled(self.reader(self.blurred(memory), keys))

    def pooled(self, windows: torch.Tensor) -> torch.Tensor:
        """Windows (..., C, h, w) average-pooled to the block resolution (..., C, r, r)."""
        f = self.cfg.window // self.block_res()
        return windows.unflatten(-1, (-1, f)).unflatten(-3, (-1, f)).mean((-3, -1))

    def read_blocks_adjoint(self, blocks: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """R_y^T: blocks (B, T, K, C, r, r) at keys (B, T, K, 3) -> memory (B, C, H, W); the
        pooling's adjoint spreads each cell over its f x f pixels / f^2, the blur is its own."""
        f = self.cfg.window // self.block_res()
        windows = blocks.repeat_interleave(f, -1).repeat_interleave(f, -2) / f ** 2   # (B, T, K, C, h, w)
        return self.blurred(self.reader.adjoint(windows, keys, tuple(self.cfg.memory_shape[1:])))

    def solved_write(self, E: torch.Tensor) -> torch.Tensor:
        """M (B, C, H, W) whose reads at the posterior-mean keys return the blocks A mu_z(X)."""
        B, T = E.shape[:2]
        C, r = self.cfg.memory_shape[0], self.block_res()
        keys = self.q.key_posterior(E)[0]                                     # (B, T, K, 3)
        target = self.code_map(self.q.code_head(E)[0]).reshape(B, T, self.cfg.reads, C, r, r)

        def normal(M: torch.Tensor) -> torch.Tensor:                          # (R^T R + lambda I) M
            return self.read_blocks_adjoint(self.read_blocks(M, keys), keys) + SOLVE_RIDGE * M
        return conjugate_gradient(normal, self.read_blocks_adjoint(target, keys), SOLVE_ITERATIONS)

    def blurred(self, memory: torch.Tensor) -> torch.Tensor:
        """The memory as the prior reads it (``memory_blur``)."""
        return gaussian_blur(memory, self.cfg.memory_blur) if self.cfg.memory_blur > 0 else memory

    # -- pieces named after the paper's equations ------------------------------------------
    def write_memory(self, E: torch.Tensor) -> torch.Tensor:
        """M = f_mem(mean_t e_t) [+ the addressed write]: (B, T, D) -> (B, C, H, W)  (§3.3, eq. 5)."""
        if self.cfg.kpp_write == "pooled":
            return self.writer(E.mean(dim=1))                    # (B, C, H, W)
        if self.cfg.kpp_write == "solved":
            return self.solved_write(E)
        H, W = self.cfg.memory_shape[1:]
        keys = self.q.key_posterior(E)[0]                        # (B, T, K, 3), the posterior means
        blocks = self.blocks(E)                                  # (B, T, K, C, h, w)
        written = self.reader.adjoint(blocks, keys, (H, W))      # (B, C, H, W)
        if self.cfg.kpp_write == "addressed-mean":
            coverage = self.reader.adjoint(torch.ones_like(blocks[:, :, :, :1]), keys, (H, W))  # (B, 1, H, W)
            written = written / coverage.clamp(min=1.0)
        return written if self.cfg.kpp_write == "blocks" else self.writer(E.mean(dim=1)) + written

    def written(self, x: torch.Tensor) -> torch.Tensor:
        """The memory (B, C, H, W) written from x, computed once per x inside ``reuse_embedding``
        (model and guide both read it when ``kpp_posterior == "read"``)."""
        return episode_memory(episode_cached(self, x, "memory", lambda: self.memory_from(x)))

    def code_prior(self, memory: torch.Tensor, keys: torch.Tensor):
        """p(z | M, y): loc, scale (..., B, T, L) from keys (..., B, T, K, 3)  (eq. 4, App. E)."""
        windows = self.reader(self.blurred(memory), keys)        # (..., B, T, K, C, h, w); blur: reads that
        stacked = windows.flatten(-4, -3)                        # tolerate small key shifts; (..., B, T, K*C, h, w)
        loc, scale = over_leading(self.prior_net, stacked, 3)    # 2 x (..., B, T, L)
        if self.cfg.kpp_write == "solved":                       # + B R_y M: the stored code read back
            loc = loc + self.code_readout(self.pooled(windows).flatten(-4))
        return loc, scale

    def key_shape(self) -> tuple[int, ...]:
        return (self.cfg.reads, KEY_DIM)

    # -- Pyro program and guide --------------------------------------------------------------
    @pyro_program
    def model(self, x: torch.Tensor) -> None:
        B, T = x.shape[:2]
        memory = self.written(x)                                 # (B, C, H, W)
        with pyro.plate("episodes", B, dim=-2):
            # the returned value is used, so poutine.condition(data={"memory": M}) reads any M
            memory = pyro.deterministic("memory", memory.unsqueeze(1), event_dim=3).squeeze(1)  # (B, C, H, W)
            with pyro.plate("images", T, dim=-1):
                keys = pyro.sample("keys", self.key_prior(x))              # (..., B, T, K, 3)
                z_loc, z_scale = self.code_prior(memory, keys)
                z = pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))  # (..., B, T, L)
                pyro.sample("x", self.likelihood.dist(self.decode(z)), obs=x)

    @pyro_program
    def guide(self, x: torch.Tensor) -> None:
        if self.cfg.kpp_posterior == "read":
            memory = self.written(x)
            self.q(self.embed(x), lambda keys: self.code_prior(memory, keys)[0])
        else:
            self.q(self.embed(x))

    # -- memory API ----------------------------------------------------------------------------
    def memory_from(self, x: torch.Tensor) -> torch.Tensor:
        """The memory (B, C, H, W) written from x (``write_memory``)."""
        return self.write_memory(self.embed(x))

    def posterior_keys(self, x: torch.Tensor, memory: Memory | None) -> torch.Tensor:
        """Posterior-mean keys of q(y | X): (B, T, K, 3)  (used by reconstruction, eq. 7); q(y | X)
        does not read the memory, so ``memory`` changes nothing."""
        return self.q.key_posterior(self.embed(x))[0]

    def memory_shapes(self) -> tuple[tuple[int, ...], ...]:
        """M: one (C, H, W) block per episode."""
        return (tuple(self.cfg.memory_shape),)
