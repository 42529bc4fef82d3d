"""The benchmark harness: its hand-written K++ loss against Pyro's, and a --quick run end to end."""
from __future__ import annotations

import json

import pyro
import pytest
import torch
from pyro import poutine

from pyro_kpp.bench.__main__ import main
from pyro_kpp.bench.measure import alternate, peak_memory
from pyro_kpp.bench.reference import kpp_reference_loss
from pyro_kpp.bench.sizes import Bench
from pyro_kpp.bound import make_elbo, training_loss

from helpers import tiny_config


@pytest.fixture
def tiny_kpp(omniglot):
    return Bench.build(tiny_config(batch_size=3, episode_length=5), omniglot, torch.device("cpu"))


def _guide_noise(model, x, seed):
    """The standard-normal noises behind the guide's draws of keys and z under ``seed``."""
    pyro.set_rng_seed(seed)
    with model.reuse_embedding():
        tr = poutine.trace(model.guide).get_trace(x)
    noise = []
    for name in ("keys", "z"):
        d = tr.nodes[name]["fn"].base_dist
        noise.append((tr.nodes[name]["value"] - d.loc) / d.scale)
    return noise


def test_reference_loss_equals_trace_elbo_on_the_same_samples(tiny_kpp):
    model, x = tiny_kpp.model, tiny_kpp.x
    eps_keys, eps_z = _guide_noise(model, x, seed=3)
    assert eps_keys.shape == (3, 5, model.cfg.reads, 3) and eps_z.shape == (3, 5, model.cfg.code_size)
    pyro.set_rng_seed(3)                       # Trace_ELBO's guide run draws the same values
    pyro_loss = training_loss(model, x, make_elbo("trace"))
    ref_loss = kpp_reference_loss(model, x, eps_keys, eps_z)
    torch.testing.assert_close(ref_loss, pyro_loss, rtol=1e-5, atol=1e-4)
    # The same gradients too: both losses drive the same parameters the same way.
    g_pyro = torch.autograd.grad(pyro_loss, list(model.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad(ref_loss, list(model.parameters()), allow_unused=True)
    for a, b in zip(g_pyro, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # Other noise gives another value: the reference really uses the noise it is given.
    assert not torch.isclose(kpp_reference_loss(model, x, eps_keys, eps_z + 1.0), ref_loss)


def test_reference_loss_rejects_other_models(omniglot):
    vae = Bench.build(tiny_config(model="vae"), omniglot, torch.device("cpu"))
    with pytest.raises(TypeError, match="model: expected a KanervaPlusPlus"):
        kpp_reference_loss(vae.model, vae.x)


def test_alternate_times_every_function_each_round():
    calls = []
    out = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3,
                    device=torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]        # warm-up, then rotated rounds
    assert all(len(v["times"]) == 3 and v["median"] >= 0 for v in out.values())


def test_peak_memory_sees_a_temporary_tensor():
    def step():
        t = torch.ones(1024, 1024)             # 4 MiB, freed at once
        return float(t.sum())
    peak = peak_memory(step, torch.device("cpu"))
    assert 4 * 2 ** 20 <= peak < 16 * 2 ** 20


def test_quick_run_writes_json_plots_and_table(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["--quick", "--repeats", "1", "--budget", "0.5", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "bench.json").read_text())
    results = report["results"]
    assert set(results) == {"throughput", "overhead", "scaling", "flops", "quality"}
    assert set(results["throughput"]) == {"paper", "cpu"}
    for preset in results["throughput"].values():
        assert set(preset["models"]) == {"kpp", "km", "dkm", "vae"}
        assert preset["train_time_vs_kpp"]["kpp"] == 1.0
        assert all(m["peak_memory_mb"] > 0 and m["train_images_per_s"] > 0 for m in preset["models"].values())
    assert results["overhead"]["kpp"]["step_ratio"] > 0
    assert set(results["scaling"]) == {"memory_area", "slots", "episode_length"}
    assert {p["model"] for p in results["scaling"]["slots"]["points"]} == {"km", "dkm"}
    assert 0 < results["flops"]["kpp"]["fraction_of_peak"]
    assert all(r["steps"] >= 1 and r["test_bound"] > 0 for r in results["quality"].values())
    assert {t["name"] for t in report["targets"]} == {"kpp_vs_dkm", "pyro_overhead", "memory_area", "matmul_peak"}
    for t in report["targets"]:                # each missed target comes with its profile table
        assert bool(t["profile"]) == (not t["met"])
        for profiled in t["profile"].values():
            assert (out / profiled["table"]).stat().st_size > 0 and profiled["top_ops"]
    assert set(report["plots"]) == {"throughput.png", "scaling_memory_area.png", "scaling_slots.png",
                                    "scaling_episode_length.png", "quality.png"}
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "overhead" in printed and "target" in printed and str(out / "bench.json") in printed


def test_bad_sections_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--quick", "--sections", "speed", "--out", str(tmp_path)])
    assert "sections: expected a comma-separated subset" in capsys.readouterr().err
