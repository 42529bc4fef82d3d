"""The paper preset (K++ Appendix E): TSM shift, EvoNormS0, LARS, schedule, weight decay, CLI run."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import tiny_cli_args, tiny_config
from pyro_kpp import svi
from pyro_kpp.config import Config
from pyro_kpp.models import build_model
from pyro_kpp.nets.conv import ConvEncoder, GaussianHead
from pyro_kpp.nets.paper import EvoNormS0, TemporalShift, TSMResNet18Encoder, temporal_shift
from pyro_kpp.train.checkpoint import load_checkpoint
from pyro_kpp.train.optim import LARS, one_cycle_cosine, param_groups_for_weight_decay


def test_shift_moves_an_eighth_of_the_channels_each_way_with_zero_fill():
    B, T, C = 2, 5, 16
    x = torch.randn(B, T, C, 3, 3)
    y = temporal_shift(x)                                    # default: 1/8 of C per direction
    f = C // 8
    assert torch.equal(y[:, :-1, :f], x[:, 1:, :f])          # image t <- image t+1
    assert torch.equal(y[:, -1, :f], torch.zeros_like(y[:, -1, :f]))
    assert torch.equal(y[:, 1:, f:2 * f], x[:, :-1, f:2 * f])  # image t <- image t-1
    assert torch.equal(y[:, 0, f:2 * f], torch.zeros_like(y[:, 0, f:2 * f]))
    assert torch.equal(y[:, :, 2 * f:], x[:, :, 2 * f:])     # the other 3/4 untouched
    # the module form on the (B*T, C, H, W) maps of a 2-D net gives the same result
    shift = TemporalShift()
    shift.episode_length = T
    assert torch.equal(shift(x.flatten(0, 1)), y.flatten(0, 1))
    # an explicit total of 1/8 (1/16 each way): only C/8 channels change
    z = temporal_shift(x, 1 / 16)
    assert torch.equal(z[:, :, 2:], x[:, :, 2:]) and not torch.equal(z[:, :, :2], x[:, :, :2])


def test_shift_without_episode_length_is_a_clear_error():
    with pytest.raises(RuntimeError, match="episode length"):
        TemporalShift()(torch.randn(4, 8, 2, 2))


def test_evonorm_s0_matches_its_formula():
    torch.manual_seed(0)
    norm = EvoNormS0(4, groups=2)
    with torch.no_grad():
        norm.v.copy_(torch.tensor([0.5, -1.0, 2.0, 1.0]))
        norm.gamma.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        norm.beta.copy_(torch.tensor([0.1, 0.0, -0.3, 0.2]))
    x = torch.randn(3, 4, 2, 3)
    expected = torch.empty_like(x)
    for n in range(3):
        for c in range(4):
            group = x[n, 2 * (c // 2): 2 * (c // 2) + 2]         # channels of c's group, all pixels
            mean = group.mean()
            std = math.sqrt(((group - mean) ** 2).mean().item() + 1e-5)
            v, g, b = norm.v[c].item(), norm.gamma[c].item(), norm.beta[c].item()
            xc = x[n, c]
            expected[n, c] = xc * torch.sigmoid(v * xc) / std * g + b
    torch.testing.assert_close(norm(x), expected)


def test_lars_scales_the_inner_adam_step_by_the_trust_ratio():
    w0, g = torch.tensor([3.0, -4.0]), torch.tensor([0.5, 2.0])          # ||w|| = 5
    b0, gb = torch.tensor([1.0, 1.0]), torch.tensor([0.3, -0.1])
    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    lr, eta = 0.1, 0.5
    opt = LARS(torch.optim.Adam([{"params": [w]}, {"params": [b], "lars": False}], lr=lr), eta=eta)
    w.grad, b.grad = g.clone(), gb.clone()
    opt.step()
    eps = 1e-8
    d = g / (g.abs() + eps)                    # Adam's first bias-corrected step per unit lr: m / (sqrt(v) + eps)
    trust = eta * 5.0 / d.norm()
    torch.testing.assert_close(w.detach(), w0 - lr * trust * d)
    torch.testing.assert_close(b.detach(), b0 - lr * gb / (gb.abs() + eps))   # excluded: plain Adam
    # the step of an adapted parameter has norm lr * eta * ||w||
    torch.testing.assert_close((w.detach() - w0).norm(), torch.tensor(lr * eta * 5.0))


def test_one_cycle_cosine_warms_up_linearly_then_decays_to_zero():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = one_cycle_cosine(opt, steps_per_epoch=10, warmup_epochs=2, total_epochs=6)   # W = 20, S = 60
    lrs = []
    for _ in range(61):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.0 / 20)
    assert lrs[9] == pytest.approx(2.0 * 10 / 20)
    assert lrs[19] == pytest.approx(2.0)                      # end of warm-up
    assert lrs[20] == pytest.approx(2.0)                      # cosine starts at the peak
    assert lrs[40] == pytest.approx(1.0)                      # half way: 0.5 (1 + cos(pi / 2))
    assert lrs[30] == pytest.approx(1.0 + math.cos(math.pi / 4))
    assert lrs[60] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="warmup_epochs"):
        one_cycle_cosine(opt, 10, warmup_epochs=6, total_epochs=6)


def test_weight_decay_groups_exclude_biases_and_norm_affines():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), EvoNormS0(4, groups=2),
                        nn.Flatten(), nn.Linear(4, 2))
    net.add_module("head", GaussianHead(2, 3, 8, spectral_norm=True))
    groups = param_groups_for_weight_decay(net, 1e-3)
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert groups[0]["weight_decay"] == 1e-3 and groups[1]["weight_decay"] == 0.0 and groups[1]["lars"] is False
    weights = [net[0].weight, net[4].weight] + [lin.parametrizations.weight.original
                                               for lin in net.head.net.net if isinstance(lin, nn.Linear)]
    assert decay == {id(p) for p in weights}
    excluded = [net[0].bias, net[1].weight, net[1].bias, net[2].v, net[2].gamma, net[2].beta, net[4].bias] + \
        [lin.bias for lin in net.head.net.net if isinstance(lin, nn.Linear)]
    assert no_decay == {id(p) for p in excluded}


def test_tsm_encoder_mixes_the_episode_and_the_conv_encoder_does_not():
    torch.manual_seed(0)
    B, T, D = 2, 3, 16
    x = torch.rand(B, T, 1, 28, 28)
    x2 = x.clone()
    x2[0, 0] = torch.rand(1, 28, 28)                          # change image 0 of episode 0
    tsm = TSMResNet18Encoder((1, 28, 28), D).eval()           # eval: batch norm uses running statistics
    conv = ConvEncoder((1, 28, 28), D)
    with torch.no_grad():
        E, E2 = tsm(x), tsm(x2)
        C, C2 = conv(x.flatten(0, 1)).unflatten(0, (B, T)), conv(x2.flatten(0, 1)).unflatten(0, (B, T))
    assert E.shape == (B, T, D)
    assert not torch.allclose(E[0, 1], E2[0, 1])              # image t=0 reaches embedding t+1 ...
    torch.testing.assert_close(E[1], E2[1])                   # ... but never another episode
    torch.testing.assert_close(C[0, 1], C2[0, 1])             # the plain encoder embeds images alone
    with pytest.raises(ValueError, match=r"\(B, T, 1, 28, 28\)"):
        tsm(x.flatten(0, 1))


def test_paper_preset_builds_the_appendix_e_nets_and_keeps_cpu_names():
    paper = build_model(tiny_config(preset="paper", hidden=None, writer_channels=None))
    assert paper.cfg.hidden == 512 and paper.cfg.writer_channels == 256
    assert type(paper.encoder).__name__ == "TSMResNet18Encoder"
    assert type(paper.decoder).__name__ == "EvoNormDecoder"
    assert hasattr(paper.q.key_head.net.net[0], "parametrizations")          # spectral norm
    cpu = build_model(tiny_config())
    assert "encoder.convs.0.weight" in cpu.state_dict() and "q.key_head.net.net.0.weight" in cpu.state_dict()
    assert Config().hidden == 256 and Config().writer_channels == 64
    with pytest.raises(ValueError, match="preset: expected one of"):
        Config(preset="gpu")


def test_paper_preset_cli_trains_checkpoints_and_resumes_the_schedule(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--data", "omniglot", "--preset", "paper", "--run-dir", str(run), "--no-progress"]
    assert svi.main([*args, *tiny_cli_args(max_steps=1, batch_size=1, episode_length=2,
                                           eval_episodes=1)]) == 0
    state = load_checkpoint(run)
    assert state["config"]["preset"] == "paper" and state["step"] == 1
    assert state["scheduler"]["last_epoch"] == 1
    lr_after_one = state["optimizer"]["param_groups"][0]["lr"]
    assert 0 < lr_after_one < state["config"]["lr"]                          # in the warm-up
    assert svi.main(["--resume", str(run), "--max-steps", "2", "--no-progress"]) == 0
    resumed = load_checkpoint(run)
    assert resumed["step"] == 2 and resumed["scheduler"]["last_epoch"] == 2
    assert resumed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1.5 * lr_after_one)   # (k + 1) / W: 2/W, then 3/W
    with pytest.raises(SystemExit):
        svi.main(["--preset", "gpu", "--run-dir", str(tmp_path / "bad")])
    assert "--preset" in capsys.readouterr().err
