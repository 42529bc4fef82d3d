"""Every model of the registry (pyro_kpp.models.MODELS) as a Pyro program: the sites of the
model and the guide with their shapes and plates, vectorised particles, and a smoke test of
learning on real Omniglot. The bound itself is checked against hand computations elsewhere
(test_bound.py, test_kl_terms.py, test_iw_exact.py and each model's file)."""
from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine

from pyro_kpp.data.episodes import Episodes
from pyro_kpp.inference.bound import PARTICLE_DIM, make_elbo, training_loss
from pyro_kpp.models import MODELS, build_model

from helpers import site_plates, site_shapes, tiny_config
from pyro_kpp.inference.handlers import reuse_embedding

SIZES = dict(slots=6, address_size=5)           # KM / DKM: K = 6 slots, KM addresses in R^5
B, T = 2, 4
IMAGE, CODE = ((B, T), (1, 28, 28)), ((B, T), (8,))
EPISODE, IMAGES = {"episodes"}, {"episodes", "images"}

#: Per model: {site: (batch_shape, event_shape, plates)} of the model's trace, and the guide's sites.
SITES = {
    "kpp": ({"memory": ((B, 1), (3, 16, 16), EPISODE),        # deterministic, one per episode
             "keys": ((B, T), (2, 3), IMAGES),                 # K = 2 keys in R^3 per image
             "z": (*CODE, IMAGES), "x": (*IMAGE, IMAGES)}, {"keys", "z"}),
    "km": ({"memory": ((B, 1), (6, 8), EPISODE),               # R: one K x L memory per episode
            "memory_row_cov": ((B, 1), (6, 6), EPISODE),       # U
            "y": ((B, T), (5,), IMAGES), "z": (*CODE, IMAGES), "x": (*IMAGE, IMAGES)},
           {"memory", "memory_row_cov", "y", "z"}),
    "dkm": ({"memory": ((B, 1), (6, 8), EPISODE),              # a latent K x L memory per episode
             "w": ((B, T), (6,), IMAGES), "z": (*CODE, IMAGES), "x": (*IMAGE, IMAGES)},
            {"memory", "w", "z"}),
    "vae": ({"z": (*CODE, IMAGES), "x": (*IMAGE, IMAGES)}, {"z"}),
}


def _episode():
    return torch.bernoulli(torch.full((B, T, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))


def test_every_registered_model_is_listed():
    assert set(SITES) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_and_guide_trace_shapes_and_plates(name):
    model = build_model(tiny_config(model=name, **SIZES))
    x = _episode()
    sites, guide_sites = SITES[name]
    with reuse_embedding():
        guide_tr = poutine.trace(model.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    assert site_shapes(model_tr) == {s: (batch, event) for s, (batch, event, _) in sites.items()}
    assert site_shapes(guide_tr) == {s: sites[s][:2] for s in guide_sites}
    assert site_plates(model_tr) == {s: plates for s, (_, _, plates) in sites.items()}
    model_tr.compute_log_prob()
    for s, (batch, _, _) in sites.items():
        assert model_tr.nodes[s]["log_prob"].shape == batch, s
    # the generative program also runs on its own, without the guide
    assert site_shapes(poutine.trace(model.model).get_trace(x)) == site_shapes(model_tr)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_vectorised_particles_shapes(name):
    """Under a particles plate left of the episodes and images plates every latent draw and every
    log-density the bound sums carries the particle dimension."""
    model = build_model(tiny_config(model=name, **SIZES))
    x = _episode()
    sites, guide_sites = SITES[name]
    with reuse_embedding(), pyro.plate("particles", 3, dim=PARTICLE_DIM):
        guide_tr = poutine.trace(model.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    assert site_shapes(guide_tr) == {s: ((3, *sites[s][0]), sites[s][1]) for s in guide_sites}
    # Replayed model sites are not re-broadcast by the outer plate, so check what is summed:
    # values and log-densities carry the particle dimension.
    model_tr.compute_log_prob()
    for s in guide_sites | {"x"}:
        assert model_tr.nodes[s]["log_prob"].shape == (3, *sites[s][0]), s
    for s in guide_sites:
        assert model_tr.nodes[s]["value"].shape == (3, *sites[s][0], *sites[s][1]), s


def learns_on_omniglot(omniglot, cfg, steps=40, lr=3e-3) -> tuple[float, float]:
    """The bound of a fixed real batch before and after ``steps`` Adam steps on it."""
    pyro.set_rng_seed(0)
    model = build_model(cfg)
    x = next(Episodes(omniglot, cfg.episode_length, cfg.batch_size, seed=0).train_epoch(0))
    elbo = make_elbo(cfg.elbo)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def bound():
        with torch.no_grad():
            torch.manual_seed(1)
            return sum(training_loss(model, x, elbo).item() for _ in range(3)) / 3

    before = bound()
    for _ in range(steps):
        loss = training_loss(model, x, elbo)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, bound()


#: The smoke runs: every model, and KM with both of its read / write modes.
SMOKE = {name: dict(model=name) for name in sorted(MODELS)} | {
    "km-distribution": dict(model="km", km_read_write="distribution")}


@pytest.mark.parametrize("run", SMOKE)
def test_smoke_bound_decreases_on_real_omniglot(run, omniglot):
    """Smoke test: 40 Adam steps on a fixed real batch lower its bound by a wide margin. It would
    pass with a wrong KL; the terms are checked by hand in test_kl_terms.py."""
    before, after = learns_on_omniglot(omniglot, tiny_config(**SMOKE[run], **SIZES, episode_length=8, batch_size=4))
    assert after < before - 100, (before, after)
