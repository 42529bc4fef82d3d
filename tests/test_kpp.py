"""The Kanerva++ Pyro program and guide: the deterministic memory, parameter names, input checks
(trace shapes and the learning smoke test of every model: test_models.py)."""
from __future__ import annotations

import pytest
import torch
from pyro import poutine

from pyro_kpp.models import build_model

from helpers import tiny_config


def _episode(B=2, T=4):
    return torch.bernoulli(torch.full((B, T, 1, 28, 28), 0.3))


def test_memory_site_is_marked_deterministic():
    """The written memory is a function of the episode: its site is marked so that it adds nothing
    to the bound (its shapes and plates: test_models.py)."""
    model = build_model(tiny_config())
    x = _episode()
    guide_tr = poutine.trace(model.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    assert model_tr.nodes["memory"]["infer"].get("_deterministic")


def test_parameters_are_named_under_the_model_root():
    """A named root: every pyro.param the program issues is prefixed by the model's name."""
    model = build_model(tiny_config())
    x = _episode()
    tr = poutine.trace(model.guide).get_trace(x)
    names = {n for n, s in tr.nodes.items() if s["type"] == "param"}
    assert names and all(n.startswith("kpp.") for n in names)


def test_input_checks_name_the_argument():
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match=r"episode: expected shape \(B, T, 1, 28, 28\)"):
        model.model(torch.zeros(4, 1, 28, 28))
    with pytest.raises(ValueError, match="binary"):
        model.model(torch.full((1, 4, 1, 28, 28), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        model.model(torch.full((1, 4, 1, 28, 28), float("nan")))
