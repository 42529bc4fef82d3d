"""Training-only weights of the KL terms, by optimizer step (``pyro_kpp.inference.bound.ScaleLatents``).

Neither ever touches a reported figure: every bound that is printed or logged as a bound
weights every KL by 1.

* ``kl_weight``: the KL warm-up of every latent, linear from 0 to 1 over ``Config.kl_warmup``
  steps (Bowman et al., 2016; Sønderby et al., 2016), times ``Config.kl_weight`` (1 unless an
  experiment says otherwise: ``--kl-weight 1/T`` trains under the scaling of a public DKM port
  that divides the KL by T twice, README "Memory use"; never a reported bound).
* ``key_kl_weight``: an extra weight on the key / address KL alone (K++ keys y, KM addresses y,
  DKM addresses w): ``key_kl_start`` for ``key_kl_hold`` steps, then a cosine ramp to 1 over
  ``key_kl_ramp`` steps.
* ``key_free_nats``: free nats of the key KL (``pyro_kpp.inference.bound.training_loss``), on the same
  hold-then-ramp schedule, falling to 0. Why (the README's "Memory use" section has the measurements): with the
  honest price from the start, the keys collapse onto their prior before the memory holds
  anything worth addressing; a sustained phase of cheap keys lets the images spread their keys
  and the addressed write organise the memory, and the ramp then brings the keys' price back.
"""
from __future__ import annotations

import math

from pyro_kpp.config import Config


def kl_weight(cfg: Config, step: int) -> float:
    """The weight of every KL at optimizer step ``step`` (0-based): the warm-up times ``kl_weight``."""
    warm = 1.0 if cfg.kl_warmup == 0 else min(1.0, (step + 1) / cfg.kl_warmup)
    return warm * cfg.kl_weight


def _ramp(cfg: Config, step: int) -> float:
    """0 through the cheap-key phase (``key_kl_hold`` steps), then a cosine rise to 1 over ``key_kl_ramp``."""
    if step < cfg.key_kl_hold:
        return 0.0
    if cfg.key_kl_ramp == 0 or step >= cfg.key_kl_hold + cfg.key_kl_ramp:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * (step - cfg.key_kl_hold) / cfg.key_kl_ramp))


def key_kl_weight(cfg: Config, step: int) -> float:
    """The extra weight of the key KL at ``step``: ``key_kl_start`` through the hold, cosine to 1."""
    return cfg.key_kl_start + (1.0 - cfg.key_kl_start) * _ramp(cfg, step)


def key_free_nats(cfg: Config, step: int) -> float:
    """Free nats of the key KL at ``step``: ``key_free_nats`` through the hold, cosine to 0 over the ramp."""
    return cfg.key_free_nats * (1.0 - _ramp(cfg, step))
