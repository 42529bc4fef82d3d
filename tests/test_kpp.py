"""The Kanerva++ Pyro program and guide: trace shapes, parameter names, learning on real data."""
from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyro_kpp.inference.bound import PARTICLE_DIM, make_elbo, training_loss
from pyro_kpp.data.episodes import Episodes
from pyro_kpp.models import build_model

from helpers import tiny_config


def _site_shapes(trace) -> dict[str, tuple[tuple, tuple]]:
    return {name: (tuple(site["fn"].batch_shape), tuple(site["fn"].event_shape))
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


def _episode(B=2, T=4):
    return torch.bernoulli(torch.full((B, T, 1, 28, 28), 0.3))


def test_model_and_guide_trace_shapes():
    cfg = tiny_config()
    model = build_model(cfg)
    x = _episode()
    guide_tr = poutine.trace(model.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    assert _site_shapes(model_tr) == {
        "memory": ((2, 1), (3, 16, 16)),     # one memory per episode, outside the images plate
        "keys": ((2, 4), (2, 3)),           # K=2 keys in R^3 per image
        "z": ((2, 4), (8,)),
        "x": ((2, 4), (1, 28, 28)),
    }
    assert _site_shapes(guide_tr) == {"keys": ((2, 4), (2, 3)), "z": ((2, 4), (8,))}
    assert model_tr.nodes["memory"]["infer"].get("_deterministic")
    # Each site is in the plates it should be in, and nowhere else.
    plates = {n: {f.name for f in s["cond_indep_stack"]} for n, s in model_tr.nodes.items()
              if s["type"] == "sample" and not site_is_subsample(s)}
    assert plates == {"memory": {"episodes"}, "keys": {"episodes", "images"},
                      "z": {"episodes", "images"}, "x": {"episodes", "images"}}
    model_tr.compute_log_prob()
    assert model_tr.nodes["x"]["log_prob"].shape == (2, 4)


def test_vectorised_particles_shapes():
    model = build_model(tiny_config())
    x = _episode()
    with pyro.plate("particles", 3, dim=PARTICLE_DIM):
        guide_tr = poutine.trace(model.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    assert _site_shapes(guide_tr) == {"keys": ((3, 2, 4), (2, 3)), "z": ((3, 2, 4), (8,))}
    # Replayed model sites are not re-broadcast by the outer plate, so check what is
    # summed: values and log-densities carry the particle dimension.
    model_tr.compute_log_prob()
    assert model_tr.nodes["keys"]["value"].shape == (3, 2, 4, 2, 3)
    assert model_tr.nodes["z"]["value"].shape == (3, 2, 4, 8)
    for site in ("keys", "z", "x"):
        assert model_tr.nodes[site]["log_prob"].shape == (3, 2, 4), site


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


def test_bound_decreases_on_real_omniglot(omniglot):
    """60 steps on a fixed real subset lower the bound of that subset by a wide margin."""
    pyro.set_rng_seed(0)
    cfg = tiny_config(episode_length=8, batch_size=4)
    model = build_model(cfg)
    episodes = Episodes(omniglot, cfg.episode_length, cfg.batch_size, seed=0)
    x = next(episodes.train_epoch(0))                                  # (4, 8, 1, 28, 28), fixed
    elbo = make_elbo("trace")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def bound():
        with torch.no_grad():
            torch.manual_seed(1)
            return sum(training_loss(model, x, elbo).item() for _ in range(5)) / 5

    before = bound()
    for _ in range(60):
        loss = training_loss(model, x, elbo)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = bound()
    assert after < before - 100, (before, after)
