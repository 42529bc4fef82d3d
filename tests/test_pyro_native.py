"""Every model is a native Pyro program: Pyro's own SVI trains every parameter, Predictive returns
the memory, poutine.condition replaces it, and poutine.trace shows the documented sites."""
from __future__ import annotations

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample

from pyro_kpp.models import build_model
from pyro_kpp.models.kpp import gaussian_blur

from helpers import tiny_config

MODELS = ["kpp", "km", "dkm", "vae"]
#: The latent and observed sites of each program, as the README's "Pyro programs" section lists them.
SITES = {
    "kpp": ({"memory", "keys", "z", "x"}, {"keys", "z"}),
    "km": ({"memory", "memory_row_cov", "y", "z", "x"}, {"memory", "memory_row_cov", "y", "z"}),
    "dkm": ({"memory", "w", "z", "x"}, {"memory", "w", "z"}),
    "vae": ({"z", "x"}, {"z"}),
}


def _episodes(B=2, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((B, T, 1, 28, 28), 0.3), generator=g)


#: Configurations whose parameters SVI must all train: the four models, and K++ with every optional net.
CONFIGS = {name: {"model": name} for name in MODELS} | {
    "kpp-addressed-read": {"model": "kpp", "kpp_write": "addressed", "kpp_posterior": "read", "kpp_block_res": 4}}


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("name", CONFIGS)
def test_pyro_svi_trains_every_parameter(name, elbo):
    """One step of ``pyro.infer.SVI`` with a ``pyro.optim`` optimizer moves every parameter tensor
    (before the models registered their nets, it moved only the guide heads)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(**CONFIGS[name]))
    build_model(tiny_config(**CONFIGS[name]))       # a second instance under the same root name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-2}), elbo())
    loss = svi.step(_episodes())
    assert torch.isfinite(torch.tensor(loss))
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"{len(unchanged)} of {len(before)} parameter tensors did not move: {unchanged}"


@pytest.mark.parametrize("name", MODELS)
def test_trace_shows_the_documented_sites(name):
    model = build_model(tiny_config(model=name))
    x = _episodes()
    guide_tr = poutine.trace(model.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    sites = [{n for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
             for tr in (model_tr, guide_tr)]
    assert tuple(sites) == SITES[name]


@pytest.mark.parametrize("name", ["kpp", "km", "dkm"])
def test_predictive_returns_the_memory(name):
    model = build_model(tiny_config(model=name)).eval()
    x = _episodes()
    samples = Predictive(model.model, guide=model.guide, num_samples=3, parallel=False)(x)
    memory = samples["memory"]
    assert memory.shape[:3] == (3, 2, 1) and torch.isfinite(memory).all()


@pytest.mark.parametrize("name", ["km", "dkm"])
def test_condition_replaces_the_memory_the_model_reads(name):
    """Under ``poutine.condition(model.model, data={"memory": M})`` the codes' prior reads M
    (K++: tests/test_memory_use.py)."""
    model = build_model(tiny_config(model=name))
    x = _episodes()
    K, L = model.memory_shapes()[0]
    M = torch.randn(2, 1, K, L)
    guide_tr = poutine.trace(model.guide).get_trace(x)
    conditioned = poutine.condition(model.model, data={"memory": M})
    tr = poutine.trace(poutine.replay(conditioned, trace=guide_tr)).get_trace(x)
    torch.testing.assert_close(tr.nodes["memory"]["value"], M)
    keys = guide_tr.nodes[model.address_site]["value"]
    if name == "km":
        expected = model.code_prior((M.squeeze(1), tr.nodes["memory_row_cov"]["value"].squeeze(1)), keys)[0]
    else:
        expected = torch.einsum("btk,bkl->btl", keys, M.squeeze(1))
    torch.testing.assert_close(tr.nodes["z"]["fn"].base_dist.loc, expected)


def _hand_code_mean(model, memory, keys):
    """The mean of p(z | M, keys) (B, N, L), from the nets. K++: the spatial transformer reads
    K windows, the prior net maps them to a code (eq. 4, App. E). KM: w^T R with
    w = f(y)^T A, the addresses A normalised to unit rows (eq. 5-6)."""
    if model.cfg.model == "kpp":
        M = gaussian_blur(memory.value, model.cfg.memory_blur) if model.cfg.memory_blur else memory.value
        windows = model.reader(M, keys)                                     # (B, N, K, C, h, w)
        return model.prior_net(windows.flatten(2, 3).flatten(0, 1))[0].unflatten(0, keys.shape[:2])
    w = model.key_net(keys) @ torch.nn.functional.normalize(model.addresses_raw, dim=-1).T    # (B, N, K)
    return torch.einsum("bnk,bkl->bnl", w, memory.value[0])


@pytest.mark.parametrize("name", ["kpp", "km"])
def test_generate_decodes_the_code_priors_mean(name):
    """``generate(sample_z=False)`` decodes the mean of p(z | M, keys) computed by hand (DKM and
    the VAE: test_dkm.py, test_vae.py)."""
    model = build_model(tiny_config(model=name)).eval()
    memory = model.write(_episodes())
    keys = model.prior_keys(memory, 3, generator=torch.Generator().manual_seed(0))
    assert keys.shape == (2, 3, *model.key_shape())
    with torch.no_grad():
        expected = model.decoder(_hand_code_mean(model, memory, keys).flatten(0, 1)).unflatten(0, (2, 3))
        torch.testing.assert_close(model.generate(memory, keys, sample_z=False), expected)


def test_km_model_reads_the_guides_stochastic_write_without_a_context():
    """KM's write is random; Pyro's replay alone hands the model the guide's write (no
    reuse_embedding), and the written memory adds nothing to the bound."""
    model = build_model(tiny_config(model="km"))
    x = _episodes()
    guide_tr = poutine.trace(model.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    R, U = (guide_tr.nodes[site]["value"].squeeze(1) for site in ("memory", "memory_row_cov"))
    assert not torch.equal(R, model.write(x).value[0])                 # another write differs
    expected = model.code_prior((R, U), guide_tr.nodes["y"]["value"])[0]
    torch.testing.assert_close(model_tr.nodes["z"]["fn"].base_dist.loc, expected)
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    for site in ("memory", "memory_row_cov"):
        assert not model_tr.nodes[site]["log_prob"].any() and not guide_tr.nodes[site]["log_prob"].any()
