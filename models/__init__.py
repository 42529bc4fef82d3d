"""Pyro generative programs, installed as ``pyro_kpp.models``: the shared base (``base.py``:
``EpisodicModel``, ``Memory``), one file per model, and the registry of model names below.
Every model shares the ``EpisodicModel`` interface."""
from __future__ import annotations

import importlib

from pyro_kpp.config import Config
from pyro_kpp.models.base import EpisodicModel

MODELS = {
    "kpp": "pyro_kpp.models.kpp:KanervaPlusPlus",
    "km": "pyro_kpp.models.km:KanervaMachine",
    "dkm": "pyro_kpp.models.dkm:DynamicKanervaMachine",
    "vae": "pyro_kpp.models.vae:VAE",
}


def build_model(cfg: Config) -> EpisodicModel:
    """A fresh model for ``cfg`` (named PyroModule root, on the CPU)."""
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg: expected a pyro_kpp.Config, got {type(cfg).__name__} "
                        f"(Config(**fields) builds one, Config.from_dict a saved one)")
    try:
        target = MODELS[cfg.model]
    except KeyError:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {cfg.model!r}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(cfg, name=cfg.model)
