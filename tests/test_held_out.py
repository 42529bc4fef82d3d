"""The held-out objective (``--objective held-out``): its folds, that each fold reads exactly the
memory the other folds write (brute force, per model), that its training loss is the bound of the
folds on those memories, that plain ``pyro.infer.SVI`` trains on it, and the run's records."""
from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_kpp.config import Config
from pyro_kpp.inference.bound import make_elbo, particle_traces, training_loss
from pyro_kpp.inference.handlers import held_out, held_out_indices, leave_one_out, reuse_embedding
from pyro_kpp.models import build_model
from pyro_kpp.train.checkpoint import load_checkpoint
from pyro_kpp.train.epoch import report
from pyro_kpp.viz.curves import draw

from helpers import tiny_config
from test_loo import SIZES, episode, tiny


def test_folds_interleave_the_episode_and_one_image_per_fold_is_leave_one_out():
    fold_of, others_of = held_out_indices(6, 2)
    assert fold_of.tolist() == [[0, 2, 4], [1, 3, 5]] and others_of.tolist() == [[1, 3, 5], [0, 2, 4]]
    fold_of, others_of = held_out_indices(4, 4)
    assert fold_of.tolist() == [[0], [1], [2], [3]]
    assert others_of.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    for folds in (1, 4, 8, True, 2.0):
        with pytest.raises(ValueError, match="folds: expected a divisor of the episode length T = 6"):
            held_out_indices(6, folds)


def held_out_memory(model, x, folds, seed=3):
    """The memory each fold is read from inside ``held_out`` (for DKM the prior and the guide's
    memory), one row per fold episode (B*F, ...)."""
    torch.manual_seed(seed)
    with held_out(model, x, folds) as held, reuse_embedding():
        model_tr, guide_tr, _ = particle_traces(model, held, 1)
    site = model_tr.nodes["memory"]
    if model.memory_is_latent:
        return site["fn"].loc.reshape(len(held), *site["fn"].event_shape), guide_tr.nodes["memory"]["fn"].loc
    return site["value"].reshape(len(held), *site["value"].shape[-len(site["fn"].event_shape):]), None


@pytest.mark.parametrize("name", ["kpp", "dkm"])
def test_each_fold_reads_the_memory_the_other_folds_write(name):
    """By brute force: fold f of episode b reads the memory written from the images of its
    episode's other folds, and (DKM) its guide continues that write with the fold's own codes."""
    model = tiny(name)
    B, T, F = 2, 6, 3
    x = episode(B, T).double()
    memory, guide_memory = held_out_memory(model, x, F)
    fold_of, others_of = held_out_indices(T, F)
    codes = model.q.codes(model.embed(x)) if name == "dkm" else None        # (B, T, L)
    for b in range(B):
        for f in range(F):
            row = b * F + f
            if name == "kpp":
                expected = model.memory_from(x[b, others_of[f]].unsqueeze(0))[0]
                torch.testing.assert_close(memory[row], expected, rtol=1e-9, atol=1e-9)
            else:
                R, U = model.write_memory(codes[b, others_of[f]].unsqueeze(0))
                torch.testing.assert_close(memory[row], R[0], rtol=1e-9, atol=1e-9)
                R_all, _ = model.write_memory(codes[b, torch.cat([others_of[f], fold_of[f]])].unsqueeze(0))
                torch.testing.assert_close(guide_memory.reshape(B * F, *R.shape[1:])[row], R_all[0],
                                           rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["kpp", "km", "dkm"])
def test_a_fold_s_memory_does_not_depend_on_its_own_images(name):
    model = tiny(name)
    B, T, F, t = 2, 6, 2, 2                                                  # image 2 is in fold 0
    x = episode(B, T).double()
    changed = x.clone()
    changed[0, t] = 1 - changed[0, t]
    before, after = held_out_memory(model, x, F)[0], held_out_memory(model, changed, F)[0]
    torch.testing.assert_close(after[0], before[0], rtol=1e-9, atol=1e-9)  # fold 0 does not see x_2
    assert not torch.allclose(after[1], before[1])                           # fold 1's memory holds it
    torch.testing.assert_close(after[F:], before[F:], rtol=1e-9, atol=1e-9)  # the other episode untouched


def test_leave_one_out_is_held_out_with_one_image_per_fold():
    model = tiny("km")
    x = episode(2, 4).double()
    torch.manual_seed(1)
    with leave_one_out(model, x) as single, reuse_embedding():
        lw_loo = particle_traces(model, single, 2)[2]
    torch.manual_seed(1)
    with held_out(model, x, 4) as held, reuse_embedding():
        lw_held = particle_traces(model, held, 2)[2]
    assert single.shape == held.shape == (8, 1, 1, 28, 28)
    torch.testing.assert_close(lw_held, lw_loo, rtol=0, atol=0)


def test_the_held_out_training_loss_is_the_folds_bound_on_the_other_folds_memory():
    """K++'s memory is the deterministic site "memory": the loss equals the negative ELBO of the
    fold episodes with that site conditioned on the memories the other folds write, per image."""
    model = tiny("kpp")
    B, T, F = 2, 4, 2
    x = episode(B, T).double()
    torch.manual_seed(7)
    loss = training_loss(model, x, make_elbo("trace"), held_out_folds=F)
    fold_of, others_of = held_out_indices(T, F)
    held = x[:, fold_of].flatten(0, 1)                                         # (B*F, T/F, ...)
    memory = model.memory_from(x[:, others_of].flatten(0, 1))                  # (B*F, C, H, W)
    torch.manual_seed(7)
    conditioned = poutine.condition(model.model, data={"memory": memory})
    expected = Trace_ELBO().differentiable_loss(conditioned, model.guide, held) / (B * T)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)
    assert torch.isfinite(loss) and loss.requires_grad
    # the paper's objective lets each image read itself: a different number on the same draws
    torch.manual_seed(7)
    assert not torch.allclose(training_loss(model, x, make_elbo("trace")), loss)


@pytest.mark.parametrize("name", ["kpp", "km", "dkm"])
def test_plain_svi_trains_every_model_on_held_out_folds(name):
    """``held_out`` is an ordinary context: pyro.infer.SVI steps on the fold episodes it yields,
    and the gradient reaches the networks that write the other folds' memory."""
    torch.manual_seed(0)
    model = build_model(tiny_config(model=name, **SIZES[name]))
    x = episode(2, 4)
    svi = SVI(model.model, model.guide, Adam({"lr": 1e-3}), Trace_ELBO())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        with held_out(model, x, 2) as held:
            assert torch.isfinite(torch.tensor(svi.step(held)))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved, "no parameter moved"
    if name == "kpp":                       # the default write's block net only sees the other folds
        assert any(n.startswith("block_net.") for n in moved), sorted(moved)


def test_the_config_checks_the_objective():
    with pytest.raises(ValueError, match="objective: expected one of"):
        Config(objective="loo")
    with pytest.raises(ValueError, match="objective: 'held-out' .* the VAE has no memory"):
        Config(model="vae", objective="held-out")
    with pytest.raises(ValueError, match="held_out_folds: expected a divisor of the episode length T = 32"):
        Config(objective="held-out", held_out_folds=3)
    Config(objective="paper", held_out_folds=3)                           # unused unless held-out
    saved = {**Config().to_dict(), "version": 5}
    del saved["objective"], saved["held_out_folds"]
    assert Config.from_dict(saved).objective == "paper"                   # older runs trained on the paper's bound


def test_a_held_out_run_records_its_leave_one_out_bound(tmp_path):
    from pyro_kpp.svi import train

    run = tmp_path / "run"
    train(tiny_config(model="km", **SIZES["km"], objective="held-out", max_steps=2), run, progress=False)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["objective"] == "held-out"
    assert set(record["test_loo_terms"]) >= {"reconstruction", "code_kl"} and record["test_loo_bound"] > 0
    assert "held-out objective" in report(record) and "leave-one-out" in report(record)
    assert Config.from_dict(load_checkpoint(run)["config"]).objective == "held-out"
    fig = draw([run])
    labels = fig.axes[0].get_legend_handles_labels()[1]
    plt.close(fig)
    assert "run test leave-one-out" in labels and "run test" in labels
