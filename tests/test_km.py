"""The Kanerva Machine: its write against brute-force conditioning, trace shapes, the bound
against a hand computation, learning on real Omniglot, and the CLI / API on a tiny run of
every model of the family (KM, DKM, VAE)."""
from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import Bernoulli, Normal

import pyro_kpp
from pyro_kpp import evaluate as evaluate_cli
from pyro_kpp import svi
from pyro_kpp.inference.bound import PARTICLE_DIM, log_weights, make_elbo, training_loss
from pyro_kpp.data.episodes import Episodes
from pyro_kpp.models import build_model

from helpers import tiny_cli_args, tiny_config
from pyro_kpp.inference.handlers import reuse_embedding

KM = dict(model="km", slots=6, address_size=5)


def site_shapes(trace) -> dict[str, tuple[tuple, tuple]]:
    return {name: (tuple(site["fn"].batch_shape), tuple(site["fn"].event_shape))
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


def site_plates(trace) -> dict[str, set[str]]:
    return {name: {f.name for f in site["cond_indep_stack"]} for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


def episode(B=2, T=4, seed=0):
    return torch.bernoulli(torch.full((B, T, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(seed))


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


# ---------------------------------------------------------------------------------------------
# The write
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["mean", "distribution"])
def test_write_is_exact_conditioning_on_the_sampled_codes(mode):
    """q(M|X) = p(M | Y, Z) for the write's draws (eq. 8-11), against conditioning vec(M) by brute force."""
    torch.manual_seed(0)
    model = build_model(tiny_config(**KM, km_read_write=mode)).double().eval()
    x = episode(B=2, T=3).double()
    E = model.embed(x)
    torch.manual_seed(5)
    R, U = model.write_memory(E)
    # the same draws, by hand: y ~ q(y|x), then (mode "mean") z ~ q(z|x)
    torch.manual_seed(5)
    y_loc, y_scale = model.q.address_head(E)
    W = model.weights(y_loc + y_scale * torch.randn_like(y_loc))
    z_loc, z_scale = model.q.write_code_head(E)
    if mode == "mean":
        Z, noise = z_loc + z_scale * torch.randn_like(z_loc), torch.ones(2, 3, dtype=torch.float64)
    else:
        Z, noise = z_loc, 1.0 + z_scale.pow(2).mean(-1)
    L = model.cfg.code_size
    R0, U0 = model.prior.loc, model.prior.row_covariance()
    I_L = torch.eye(L, dtype=torch.float64)
    for b in range(2):
        prior_cov = torch.kron(I_L, U0)
        A = torch.kron(I_L, W[b])                                           # vec(Z) = A vec(M) + noise
        S = A @ prior_cov @ A.T + torch.kron(I_L, torch.diag(noise[b]))
        gain = torch.linalg.solve(S, A @ prior_cov).T
        mean = R0.T.reshape(-1) + gain @ (Z[b].T.reshape(-1) - A @ R0.T.reshape(-1))
        cov = prior_cov - gain @ A @ prior_cov
        torch.testing.assert_close(R[b].T.reshape(-1), mean, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(torch.kron(I_L, U[b]), cov, rtol=1e-8, atol=1e-8)


def test_prior_row_covariance_is_spd_for_any_parameters():
    model = build_model(tiny_config(**KM))
    with torch.no_grad():
        model.prior.tril_raw.normal_(0, 3)
        model.prior.diag_raw.normal_(0, 5)
    U0 = model.prior.row_covariance()
    assert torch.equal(U0, U0.T)                 # symmetrised in the code: exact on any BLAS
    assert torch.linalg.eigvalsh(U0.double()).min() > 0
    A = model.addresses()
    torch.testing.assert_close(A.norm(dim=-1), torch.ones(6))


# ---------------------------------------------------------------------------------------------
# The Pyro program
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["mean", "distribution"])
def test_model_and_guide_trace_shapes(mode):
    model = build_model(tiny_config(**KM, km_read_write=mode))
    x = episode()
    with reuse_embedding():
        guide_tr = poutine.trace(model.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    assert site_shapes(model_tr) == {
        "memory": ((2, 1), (6, 8)),            # R: one K x L memory per episode
        "memory_row_cov": ((2, 1), (6, 6)),    # U
        "y": ((2, 4), (5,)),
        "z": ((2, 4), (8,)),
        "x": ((2, 4), (1, 28, 28)),
    }
    assert site_shapes(guide_tr) == {"memory": ((2, 1), (6, 8)), "memory_row_cov": ((2, 1), (6, 6)),
                                     "y": ((2, 4), (5,)), "z": ((2, 4), (8,))}
    # the model reads the guide's write (replayed), and the written memory adds nothing to the bound
    for site in ("memory", "memory_row_cov"):
        assert torch.equal(model_tr.nodes[site]["value"], guide_tr.nodes[site]["value"])
        assert not model_tr.nodes[site]["fn"].log_prob(model_tr.nodes[site]["value"]).any()
    assert site_plates(model_tr) == {"memory": {"episodes"}, "memory_row_cov": {"episodes"},
                                     "y": {"episodes", "images"}, "z": {"episodes", "images"},
                                     "x": {"episodes", "images"}}
    model_tr.compute_log_prob()
    assert model_tr.nodes["x"]["log_prob"].shape == (2, 4)
    # the model can also run on its own (it writes the memory itself)
    assert site_shapes(poutine.trace(model.model).get_trace(x))["z"] == ((2, 4), (8,))


def test_particle_shapes_and_one_written_memory_per_evaluation():
    model = build_model(tiny_config(**KM))
    x = episode()
    with reuse_embedding():
        with pyro.plate("particles", 3, dim=PARTICLE_DIM):
            guide_tr = poutine.trace(model.guide).get_trace(x)
            model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
        again = poutine.trace(model.guide).get_trace(x)
        memory_again = poutine.trace(poutine.replay(model.model, trace=again)).get_trace(x).nodes["memory"]["value"]
    assert site_shapes(guide_tr) == {"memory": ((3, 2, 1), (6, 8)), "memory_row_cov": ((3, 2, 1), (6, 6)),
                                     "y": ((3, 2, 4), (5,)), "z": ((3, 2, 4), (8,))}
    model_tr.compute_log_prob()
    for site in ("y", "z", "x"):
        assert model_tr.nodes[site]["log_prob"].shape == (3, 2, 4), site
    # inside reuse_embedding the stochastic write is drawn once: every trace reads the same memory
    assert torch.equal(model_tr.nodes["memory"]["value"], memory_again.expand(3, *memory_again.shape))
    fresh = poutine.trace(model.model).get_trace(x).nodes["memory"]["value"]
    assert not torch.allclose(fresh, memory_again)


def test_log_weights_equal_the_hand_computation():
    """ln p(x_t|z_t) + ln p(z_t|y_t,M) + ln p(y_t) - ln q(z_t|x_t,y_t,M) - ln q(y_t|x_t) (eq. 12)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(**KM)).eval()
    x = episode(B=3, T=5)
    pyro.set_rng_seed(7)
    lw = log_weights(model, x, samples=1)[0]                                # (B, T)
    pyro.set_rng_seed(7)
    with reuse_embedding():                                           # same draws
        tr = poutine.trace(model.guide).get_trace(x)
        R = poutine.trace(poutine.replay(model.model, trace=tr)).get_trace(x).nodes["memory"]["value"][:, 0]
    y, z = tr.nodes["y"]["value"], tr.nodes["z"]["value"]
    E = model.encoder(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    w = model.key_net(y) @ torch.nn.functional.normalize(model.addresses_raw, dim=-1).T    # (B, T, K)
    readout = torch.einsum("btk,bkl->btl", w, R)
    y_loc, y_scale = model.q.address_head(E)
    z_loc, z_scale = model.q.code_head(torch.cat([E, readout], -1))
    log_q = Normal(y_loc, y_scale).log_prob(y).sum(-1) + Normal(z_loc, z_scale).log_prob(z).sum(-1)
    log_p = Normal(0.0, 1.0).log_prob(y).sum(-1) + Normal(readout, 1.0).log_prob(z).sum(-1)
    logits = model.decoder(z.flatten(0, 1)).reshape(x.shape)
    log_p = log_p + Bernoulli(logits=logits).log_prob(x).sum((-1, -2, -3))
    torch.testing.assert_close(lw, log_p - log_q, rtol=1e-5, atol=1e-3)


def test_distribution_read_adds_the_memory_uncertainty():
    """Appendix F eq. 19: the read variance is w^T U w + sigma^2, not sigma^2."""
    model = build_model(tiny_config(**KM, km_read_write="distribution"))
    x = episode()
    memory = model.write(x)
    y = model.prior_keys(memory, 3, generator=torch.Generator().manual_seed(0))
    R, U = memory.value
    _, scale = model.code_prior((R, U), y)                                  # (B, 3, L)
    w = model.weights(y)
    expected = (torch.einsum("bnk,bkj,bnj->bn", w, U, w) + 1.0).sqrt()
    torch.testing.assert_close(scale, expected.unsqueeze(-1).expand(scale.shape))
    assert (scale > 1.0).all()


def test_keys_are_checked():
    model = build_model(tiny_config(**KM))
    memory = model.write(episode())
    with pytest.raises(ValueError, match=r"keys: expected addresses y of shape \(2, N, 5\)"):
        model.generate(memory, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="NaN"):
        model.generate(memory, torch.full((2, 3, 5), float("nan")))
    with pytest.raises(ValueError, match="episode"):
        model.write(torch.zeros(2, 4, 1, 27, 28))


@pytest.mark.parametrize("mode", ["mean", "distribution"])
def test_bound_decreases_on_real_omniglot(omniglot, mode):
    before, after = learns_on_omniglot(omniglot, tiny_config(**KM, km_read_write=mode, episode_length=8,
                                                             batch_size=4))
    assert after < before - 100, (before, after)


# ---------------------------------------------------------------------------------------------
# Command line and API on tiny runs of the whole family
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["km", "dkm", "vae"])
def test_svi_cli_tiny_run_then_evaluate_load_write_sample(name, tmp_path, capsys):
    run = tmp_path / name
    argv = ["--model", name, "--data", "omniglot", "--max-steps", "2", "--run-dir", str(run), "--no-progress",
            *tiny_cli_args(slots=6)]
    assert svi.main(argv) == 0
    assert (run / "checkpoint.pt").is_file()
    capsys.readouterr()
    assert evaluate_cli.main([str(run), "--samples", "3", "--episodes", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == name and result["test_images"] == 8
    assert math.isfinite(result["test_bound"]) and result["test_bound"] > 0
    assert result["test_iw_bound"] <= result["test_bound"] + 5.0

    model = pyro_kpp.load(run)
    assert type(model).__name__ == {"km": "KanervaMachine", "dkm": "DynamicKanervaMachine", "vae": "VAE"}[name]
    x = episode(B=1, T=4)[0]                                                # (T, C, H, W)
    memory = pyro_kpp.write(model, x)
    assert memory.episodes == 1
    images = pyro_kpp.sample(memory, n=5, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 5, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    keys = model.infer_keys(x.unsqueeze(0))
    binary = pyro_kpp.sample(memory, keys, binary=True)
    assert binary.shape == (1, 4, 1, 28, 28) and set(binary.unique().tolist()) <= {0.0, 1.0}


def test_iterative_read_decodes_the_code_posterior():
    """KM Algorithm 1: a query read back from the memory decodes the mean of q(z | x, y, M)."""
    from pyro_kpp.reading.iterative import iterative_read
    model = build_model(tiny_config(**KM)).eval()
    x = episode()
    memory = model.write(x)
    reading = iterative_read(model, memory, x, steps=1)
    y = model.infer_keys(x, memory)
    z_loc, _ = model.q.code_posterior(model.embed(x), model.readout(memory.value[0], y))
    torch.testing.assert_close(reading.params[0], model.decode(z_loc))
    assert not torch.allclose(reading.params[0], model.generate(memory, y, sample_z=False))
