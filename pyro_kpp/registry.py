"""Model names -> model classes. Every model shares the ``EpisodicModel`` interface."""
from __future__ import annotations

import importlib

from .config import Config
from .episodic import EpisodicModel

MODELS = {
    "kpp": "pyro_kpp.models.kpp:KanervaPlusPlus",
}


def build_model(cfg: Config) -> EpisodicModel:
    """A fresh model for ``cfg`` (named PyroModule root, on the CPU)."""
    try:
        target = MODELS[cfg.model]
    except KeyError:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {cfg.model!r}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(cfg, name=cfg.model)
