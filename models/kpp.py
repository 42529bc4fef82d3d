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

from pyro_kpp.config import Config
from pyro_kpp.guides.kpp import KppGuide
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
        if cfg.kpp_write != "pooled":                                 # g: e_t -> K blocks of C x r x r
            self.block_net = DenseNet(cfg.embed_size, cfg.reads * mem_c * self.block_res() ** 2, cfg.hidden, 1,
                                      dense_spectral_norm(cfg))

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

    # -- pieces named after the paper's equations ------------------------------------------
    def write_memory(self, E: torch.Tensor) -> torch.Tensor:
        """M = f_mem(mean_t e_t) [+ the addressed write]: (B, T, D) -> (B, C, H, W)  (§3.3, eq. 5)."""
        if self.cfg.kpp_write == "pooled":
            return self.writer(E.mean(dim=1))                    # (B, C, H, W)
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
        if self.cfg.memory_blur > 0:                             # reads that tolerate small key shifts
            memory = gaussian_blur(memory, self.cfg.memory_blur)
        windows = self.reader(memory, keys)                      # (..., B, T, K, C, h, w)
        stacked = windows.flatten(-4, -3)                        # (..., B, T, K*C, h, w)
        return over_leading(self.prior_net, stacked, 3)          # 2 x (..., B, T, L)

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

    def infer_keys(self, x: torch.Tensor, memory: Memory | None = None) -> torch.Tensor:
        """Posterior-mean keys of q(y | X): (B, T, K, 3)  (used by reconstruction, eq. 7); q(y | X)
        does not read the memory, so ``memory`` changes nothing."""
        if memory is not None:                     # not read, but it must be this model's
            self.check_memory(memory)
        return self.q.key_posterior(self.embed(x))[0]

    def memory_shapes(self) -> tuple[tuple[int, ...], ...]:
        """M: one (C, H, W) block per episode."""
        return (tuple(self.cfg.memory_shape),)
