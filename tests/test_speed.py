"""Speed options: compiled networks and bf16 autocast give the loss and gradients of the eager
float32 step (to their precision), keep the checkpoint's format, and fall back cleanly."""
from __future__ import annotations

import json
import logging

import pyro
import pytest
import torch
from pyro import poutine

from pyro_kpp import svi
from pyro_kpp.config import Config
from pyro_kpp.inference.bound import evaluate, make_elbo, training_loss
from pyro_kpp.models import build_model
from pyro_kpp.train import epoch
from pyro_kpp.train import speed

from helpers import tiny_cli_args, tiny_config

MODELS = ["kpp", "km", "dkm", "vae"]


def _episodes(B=2, T=4):
    return torch.bernoulli(torch.full((B, T, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))


def _loss_and_grads(model, x, precision="fp32"):
    """The training loss and its gradient at fixed random draws."""
    pyro.set_rng_seed(3)
    model.zero_grad(set_to_none=True)
    with pyro.validation_enabled(False), speed.autocast(precision, x.device):
        loss = training_loss(model, x, make_elbo("trace"))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(model, reference, x, loss_tol, grad_rtol, grad_atol):
    """``model``'s training loss and gradients at fixed draws equal ``reference``'s: the loss to
    ``loss_tol`` = (rtol, atol), each gradient to ``grad_rtol`` and ``grad_atol(reference's gradient)``."""
    loss_ref, grads_ref = _loss_and_grads(reference, x)
    loss, grads = _loss_and_grads(model, x)
    torch.testing.assert_close(loss, loss_ref, rtol=loss_tol[0], atol=loss_tol[1])
    assert grads.keys() == grads_ref.keys()
    for n, g in grads_ref.items():
        torch.testing.assert_close(grads[n], g, rtol=grad_rtol, atol=grad_atol(g), msg=lambda m: f"{n}: {m}")


def _pair(name):
    """Two copies of one tiny model, with the same weights."""
    torch.manual_seed(0)
    a = build_model(tiny_config(model=name))
    b = build_model(tiny_config(model=name))
    b.load_state_dict(a.state_dict())
    return a, b


def test_networks_are_the_plain_modules_with_parameters():
    model = build_model(tiny_config())
    names = speed.networks(model)
    assert {"encoder", "decoder", "prior_net"} <= set(names)
    assert "q.key_head" in names and "q" not in names             # descends into PyroModules
    assert all(not isinstance(model.get_submodule(n), pyro.nn.PyroModule) for n in names)
    assert speed.networks(build_model(tiny_config(model="vae")))[:2] == ["encoder", "decoder"]


@pytest.mark.parametrize("name", MODELS)
def test_compiled_networks_give_the_eager_loss_and_gradients(name):
    if (reason := speed.compile_unavailable(torch.device("cpu"))) is not None:
        pytest.skip(f"torch.compile unavailable: {reason}")
    eager, compiled = _pair(name)
    names, reason = speed.compile_networks(compiled, torch.device("cpu"))
    assert names and reason is None
    assert compiled.state_dict().keys() == eager.state_dict().keys()      # checkpoints unchanged
    _assert_same_step(compiled, eager, _episodes(), (1e-4, 1e-3), 1e-3, lambda g: 1e-3 * (1 + g.abs().max()))


@pytest.mark.parametrize("name", MODELS)
def test_bf16_networks_keep_the_loss_and_gradients_close_to_float32(name):
    model, _ = _pair(name)
    assert speed.autocast_networks(model) == speed.networks(model)
    assert speed.autocast_networks(model) == speed.networks(model)        # wrapping twice wraps once
    x = _episodes()
    loss32, g32 = _loss_and_grads(model, x)
    loss16, g16 = _loss_and_grads(model, x, "bf16")
    assert loss16.dtype == torch.float32
    assert float(loss16) != float(loss32)                        # the networks did run in bf16
    assert abs(float(loss16 - loss32)) < 0.01 * abs(float(loss32))
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[n].flatten() for n in g32])
    assert torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.99


@pytest.mark.parametrize("name", MODELS)
def test_bf16_runs_only_the_networks_in_bf16(name):
    """Every sample site's value and log-density stay float32 under bf16 (the networks return
    float32), and outside ``speed.autocast`` the wrapped networks are the float32 ones."""
    model, plain = _pair(name)
    speed.autocast_networks(model)
    x = _episodes()
    with speed.autocast("bf16", x.device), torch.no_grad():
        guide = poutine.trace(model.guide).get_trace(x)
        trace = poutine.trace(poutine.replay(model.model, trace=guide)).get_trace(x)
        trace.compute_log_prob()
    for tr in (guide, trace):
        for site in tr.nodes.values():
            if site["type"] == "sample" and site["value"].is_floating_point():     # not the plates' indices
                assert site["value"].dtype == torch.float32, site["name"]
                assert "log_prob" not in site or site["log_prob"].dtype == torch.float32, site["name"]
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), plain.embed(x), rtol=0, atol=0)


@pytest.fixture
def fresh_probe():
    """The compile probe's cache emptied before and after: a test that breaks the compiler must not
    leave its verdict to the others."""
    speed._probe.cache_clear()
    yield
    speed._probe.cache_clear()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_stays_under_the_recompile_limit(monkeypatch, precision):
    """Training steps, then an evaluation with particles (no grad, other shapes) and one episode
    alone: no compiled network reaches TorchDynamo's recompile limit, past which it would run eager
    with only a warning. (The bf16 wrappers once shared one code object, and did reach it.)"""
    if (reason := speed.compile_unavailable(torch.device("cpu"))) is not None:
        pytest.skip(f"torch.compile unavailable: {reason}")
    monkeypatch.setattr(speed, "BACKEND", "aot_eager")        # the same graphs and guards, no code generated
    torch._dynamo.reset()
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger = logging.getLogger("torch._dynamo.convert_frame")
    logger.addHandler(handler)
    try:
        model = build_model(tiny_config())
        speed.prepare(model, precision, True, torch.device("cpu"))
        x = _episodes()
        for _ in range(2):
            _loss_and_grads(model, x, precision)
        evaluate(model, [x, x[:1]], samples=3)
    finally:
        logger.removeHandler(handler)
        torch._dynamo.reset()
    assert not [w for w in warnings if "recompile_limit" in w]


def test_unavailable_compiler_falls_back_to_eager(monkeypatch, fresh_probe):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")
    monkeypatch.setattr(torch, "compile", broken)
    model = build_model(tiny_config())
    names, reason = speed.compile_networks(model, torch.device("cpu"))
    assert names == [] and reason == "RuntimeError: no C++ compiler found"
    assert not any(hasattr(model.get_submodule(n), "_compiled_call_impl") and model.get_submodule(n)._compiled_call_impl
                   for n in speed.networks(model))


def test_svi_trains_with_bf16_and_evaluates_in_float32(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(speed, "compile_unavailable", lambda device: "RuntimeError: stub")
    seen = []

    def evaluate(*args, **kwargs):                 # the per-epoch evaluation: never in bf16
        seen.append(speed._BF16_DEVICE)
        return plain_evaluate(*args, **kwargs)
    plain_evaluate = epoch.evaluate
    monkeypatch.setattr(epoch, "evaluate", evaluate)
    run = tmp_path / "run"
    assert svi.main(["--data", "omniglot", "--run-dir", str(run), "--no-progress", "--max-steps", "2",
                     "--precision", "bf16", "--compile", *tiny_cli_args()]) == 0
    err = capsys.readouterr().err
    assert "--compile: torch.compile is unavailable here (RuntimeError: stub); running eager" in err
    assert seen and seen == [None] * len(seen)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["precision"] == "bf16" and cfg["compile"] is True
    # both may change on resume (they change neither the model nor the data order), either way
    assert svi.main(["--resume", str(run), "--max-steps", "3", "--precision", "fp32", "--no-compile",
                     "--no-progress"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["precision"] == "fp32" and cfg["compile"] is False


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_is_native_on_cuda_from_ampere_on(monkeypatch, capability, native):
    """torch.cuda.is_bf16_supported() also says yes where bf16 is emulated (a T4, a V100): "auto"
    must not train slower than float32 there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    speed._bf16_native.cache_clear()
    try:
        assert speed.bf16_native(torch.device("cuda:0")) is native
    finally:
        speed._bf16_native.cache_clear()


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    cpu = torch.device("cpu")
    assert Config().precision == "auto"
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(speed, "bf16_native", lambda device, native=native: native)
        assert speed.resolve_precision("auto", cpu) == expected
        assert speed.resolve_precision("fp32", cpu) == "fp32" and speed.resolve_precision("bf16", cpu) == "bf16"
        model = build_model(tiny_config())
        _, message = speed.prepare(model, "auto", False, cpu)
        wrapped = getattr(model.decoder.forward, "_bf16_wrapped", False)
        with speed.autocast("auto", cpu):
            assert (speed._BF16_DEVICE == "cpu") is native
        assert wrapped is native and f"precision auto: the networks train in {'bf16' if native else 'float32'}" in message
    _, message = speed.prepare(build_model(tiny_config()), "bf16", False, cpu)
    assert message is None                                     # native here (patched): nothing to warn of
    monkeypatch.setattr(speed, "bf16_native", lambda device: False)
    _, message = speed.prepare(build_model(tiny_config()), "bf16", False, cpu)
    assert "emulated and slower than float32" in message
    with pytest.raises(ValueError, match="precision: expected one of"):
        speed.resolve_precision("fp16", cpu)


def test_precision_is_checked_and_old_configs_migrate():
    with pytest.raises(ValueError, match="precision: expected one of"):
        tiny_config(precision="fp16")
    with pytest.raises(ValueError, match="channels_last: expected True or False"):
        tiny_config(channels_last="yes")
    old = Config().to_dict()
    old.update(version=2)
    del old["compile"], old["precision"], old["channels_last"]
    cfg = Config.from_dict(old)                       # runs before the speed options: eager, float32, NCHW
    assert cfg.compile is False and cfg.precision == "fp32" and cfg.channels_last is False
    old = {**Config().to_dict(), "version": 3, "precision": "bf16"}
    del old["channels_last"]
    cfg = Config.from_dict(old)
    assert cfg.channels_last is False and cfg.precision == "bf16"


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_keeps_the_loss_gradients_and_checkpoint(name):
    plain, nhwc = _pair(name)
    speed.prepare(nhwc, "fp32", False, torch.device("cpu"), channels_last=True)
    convs = [p for p in nhwc.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)           # (one input channel: both layouts at once)
    _assert_same_step(nhwc, plain, _episodes(), (1e-5, 1e-4), 1e-3, lambda g: 1e-4)
    fresh = build_model(tiny_config(model=name))             # a checkpoint of either layout loads into the other
    fresh.load_state_dict(nhwc.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), plain.state_dict().values()))
