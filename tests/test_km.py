"""The Kanerva Machine: its write against brute-force conditioning, the replayed write, the bound
against a hand computation, and the CLI / API on a tiny run of every model of the family (KM,
DKM, VAE). Trace shapes and the learning smoke test of every model: test_models.py."""
from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
from pyro import poutine
from torch.distributions import Bernoulli, Normal, kl_divergence

import pyro_kpp
from pyro_kpp import evaluate as evaluate_cli
from pyro_kpp import svi
from pyro_kpp.data import episodes as episodes_lib
from pyro_kpp.data.sets import load_dataset
from pyro_kpp.inference.bound import PARTICLE_DIM, evaluate, log_weights, make_elbo
from pyro_kpp.models import build_model

from helpers import tiny_cli_args, tiny_config
from pyro_kpp.inference.handlers import reuse_embedding

KM = dict(model="km", slots=6, address_size=5)


def episode(B=2, T=4, seed=0):
    return torch.bernoulli(torch.full((B, T, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(seed))


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
def test_model_reads_the_guides_write_which_adds_nothing_to_the_bound(mode):
    model = build_model(tiny_config(**KM, km_read_write=mode))
    x = episode()
    with reuse_embedding():
        guide_tr = poutine.trace(model.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    for site in ("memory", "memory_row_cov"):
        assert torch.equal(model_tr.nodes[site]["value"], guide_tr.nodes[site]["value"])
        assert not model_tr.nodes[site]["fn"].log_prob(model_tr.nodes[site]["value"]).any()


def test_one_written_memory_per_evaluation():
    """Inside reuse_embedding the stochastic write is drawn once: every trace, particles or not,
    reads the same memory; outside it each run writes anew."""
    model = build_model(tiny_config(**KM))
    x = episode()
    with reuse_embedding():
        with pyro.plate("particles", 3, dim=PARTICLE_DIM):
            guide_tr = poutine.trace(model.guide).get_trace(x)
            model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
        again = poutine.trace(model.guide).get_trace(x)
        memory_again = poutine.trace(poutine.replay(model.model, trace=again)).get_trace(x).nodes["memory"]["value"]
    assert torch.equal(model_tr.nodes["memory"]["value"], memory_again.expand(3, *memory_again.shape))
    fresh = poutine.trace(model.model).get_trace(x).nodes["memory"]["value"]
    assert not torch.allclose(fresh, memory_again)


def test_log_weights_and_each_term_equal_the_hand_computation():
    """ln p(x_t|z_t) + ln p(z_t|y_t,M) + ln p(y_t) - ln q(z_t|x_t,y_t,M) - ln q(y_t|x_t) (eq. 12),
    and the reported terms one by one: the address KL, the code KL, the reconstruction."""
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
    kl_y = Normal(y_loc, y_scale).log_prob(y).sum(-1) - Normal(0.0, 1.0).log_prob(y).sum(-1)
    kl_z = Normal(z_loc, z_scale).log_prob(z).sum(-1) - Normal(readout, 1.0).log_prob(z).sum(-1)
    logits = model.decoder(z.flatten(0, 1)).reshape(x.shape)
    log_p_x = Bernoulli(logits=logits).log_prob(x).sum((-1, -2, -3))
    torch.testing.assert_close(lw, log_p_x - kl_y - kl_z, rtol=1e-5, atol=1e-3)
    pyro.set_rng_seed(7)
    terms = evaluate(model, [x], samples=1)["terms"]                         # nats/image
    hand = {"reconstruction": -log_p_x, "key_kl": kl_y, "code_kl": kl_z, "memory_kl": torch.zeros(())}
    assert set(terms) == set(hand)                                          # the written memory: 0 nats
    for name, term in hand.items():
        assert math.isclose(terms[name], term.mean().item(), rel_tol=1e-5, abs_tol=1e-4), name


def test_meanfield_loss_charges_the_closed_form_kls():
    """TraceMeanField_ELBO's loss (summed over the images) is -ln p(x|z) + KL(q(y|x) || N(0, I))
    + KL(q(z|x,y,M) || N(w^T R, I)), both by kl_divergence at the same draws (the memory the guide
    wrote, the address drawn): to 0.05 nats, well under either KL."""
    torch.manual_seed(0)
    model = build_model(tiny_config(**KM)).eval()
    x = episode(B=3, T=5)
    with torch.no_grad():
        pyro.set_rng_seed(7)
        loss = make_elbo("meanfield").loss(model.model, model.guide, x)
        pyro.set_rng_seed(7)
        tr = poutine.trace(model.guide).get_trace(x)                        # the same draws
        R, y, z = tr.nodes["memory"]["value"][:, 0], tr.nodes["y"]["value"], tr.nodes["z"]["value"]
        E = model.encoder(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        w = model.key_net(y) @ torch.nn.functional.normalize(model.addresses_raw, dim=-1).T    # (B, T, K)
        readout = torch.einsum("btk,bkl->btl", w, R)
        kl_y = kl_divergence(Normal(*model.q.address_head(E)), Normal(0.0, 1.0)).sum(-1)
        kl_z = kl_divergence(Normal(*model.q.code_head(torch.cat([E, readout], -1))), Normal(readout, 1.0)).sum(-1)
        log_p_x = Bernoulli(logits=model.decoder(z.flatten(0, 1)).reshape(x.shape)).log_prob(x).sum((-1, -2, -3))
    assert kl_y.sum() > 0.5 and kl_z.sum() > 0.5, (kl_y.sum(), kl_z.sum())
    hand = (kl_y + kl_z - log_p_x).sum().item()
    assert abs(loss - hand) < 0.05, (loss, hand)


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

    model = pyro_kpp.load(run).eval()
    # The reported bound is minus the mean log weight (each checked by hand in the model's tests)
    # of the run's model on the first two test episodes with S = 3 at the default seed 0; the IW
    # bound is log-mean-exp over those three samples, so strictly tighter than their mean.
    episodes = episodes_lib.make_episodes(model.cfg, load_dataset("omniglot"), torch.device("cpu"))
    test = next(iter(episodes_lib.test_batches(episodes, 2)))
    torch.manual_seed(0)
    lw = log_weights(model, test, samples=3)                                # (3, 2, 4)
    assert math.isclose(result["test_bound"], -lw.mean().item(), rel_tol=1e-5), (result["test_bound"], lw.mean())
    assert result["test_iw_bound"] < result["test_bound"] - 1e-3
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
