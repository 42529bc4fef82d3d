"""The benchmark harness: its hand-written K++ loss against Pyro's, and a --quick run end to end."""
from __future__ import annotations

import json

import pyro
import pytest
import torch
from pyro import poutine

from pyro_kpp.bench.__main__ import main
from pyro_kpp.bench.measure import alternate, count_dispatched, peak_memory
from pyro_kpp.bench.reference import kpp_reference_loss
from pyro_kpp.bench.sizes import Bench, LinearDecoder, LinearEncoder
from pyro_kpp.inference.bound import make_elbo, training_loss
from pyro_kpp.svi import train
from pyro_kpp.train import speed

from helpers import tiny_config
from pyro_kpp.inference.handlers import reuse_embedding


@pytest.fixture
def tiny_kpp(omniglot):
    return Bench.build(tiny_config(batch_size=3, episode_length=5), omniglot, torch.device("cpu"))


def _guide_noise(model, x, seed):
    """The standard-normal noises behind the guide's draws of keys and z under ``seed``."""
    pyro.set_rng_seed(seed)
    with reuse_embedding():
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


def test_dispatch_counts_operators_and_names_who_reads_values():
    x = torch.ones(4)

    def fn():
        y = (x + 1).view(2, 2)                 # one operator (add); the view is not counted
        return y.sum().item()                  # sum counted; the read is a host sync, from this line
    operators, syncs = count_dispatched(fn)
    line = fn.__code__.co_firstlineno + 2
    assert operators == 2 and syncs == {f"pyro_kpp:tests/test_bench.py:{line}": 1}


@pytest.mark.parametrize("name", ["kpp", "km", "dkm", "vae"])
def test_training_loss_reads_no_values_without_validation(omniglot, name):
    """The loss and gradient of every model run without host syncs of this package's own once
    Pyro's validation is off (as in pyro_kpp.svi after the first step); with it on, the input
    value checks read the episode (so the count can fail)."""
    b = Bench.build(tiny_config(model=name), omniglot, torch.device("cpu"))
    with pyro.validation_enabled(True):
        _, checked = count_dispatched(lambda: training_loss(b.model, b.x, b.elbo).backward())
    _, steady = count_dispatched(b.forward_backward)
    ours = [k for k in checked if k.startswith("pyro_kpp:models/base.py")]
    assert ours and not any(k.startswith("pyro_kpp") for k in steady), (checked, steady)


def test_the_training_loop_reads_one_value_pair_per_step(omniglot, tmp_path):
    _, syncs = count_dispatched(lambda: train(tiny_config(max_steps=3), tmp_path, progress=False))
    in_loop = {k: n for k, n in syncs.items() if k.startswith("pyro_kpp:pyro_kpp/train/step.py")}
    assert list(in_loop.values()) == [3], in_loop       # one line, once per step


def test_linear_stand_ins_keep_the_shared_nets_shapes(omniglot):
    b = Bench.build(tiny_config(model="km"), omniglot, torch.device("cpu"), shared_nets="linear")
    assert isinstance(b.model.encoder, LinearEncoder) and isinstance(b.model.decoder, LinearDecoder)
    assert b.model.embed(b.x).shape == (*b.x.shape[:2], b.model.cfg.embed_size)
    assert b.model.decode(torch.zeros(3, b.model.cfg.code_size)).shape == (3, *b.x.shape[2:])
    b.train_step()
    with pytest.raises(ValueError, match="shared_nets: expected one of"):
        Bench.build(tiny_config(), omniglot, torch.device("cpu"), shared_nets="none")


@pytest.fixture
def fast_compile(monkeypatch):
    """The benchmark's compiled variants traced without code generation (tests/test_speed.py checks
    the real compiler's numbers): minutes saved."""
    monkeypatch.setattr(speed, "BACKEND", "aot_eager")


def test_quick_run_writes_json_plots_and_table(tmp_path, capsys, fast_compile):
    out = tmp_path / "results"
    assert main(["--quick", "--repeats", "1", "--budget", "0.5", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "bench.json").read_text())
    results = report["results"]
    assert set(results) == {"throughput", "memory_path", "dispatch", "options", "overhead", "scaling", "flops",
                            "speed", "evaluation", "quality"}
    assert set(results["throughput"]) == {"paper", "recipe", "cpu"}
    for preset in [*results["throughput"].values(), results["memory_path"]["paper"]]:
        assert set(preset["models"]) == {"kpp", "km", "dkm", "vae"}
        assert preset["train_time_vs_kpp"]["kpp"] == 1.0
        assert all(m["peak_memory_mb"] > 0 and m["train_images_per_s"] > 0 for m in preset["models"].values())
    assert results["overhead"]["kpp"]["step_ratio"] > 0
    for counts in results["dispatch"]["paper"].values():       # steady state: no syncs of ours
        assert counts["operators_loss_and_backward"] > 0
        assert not any(k.startswith("pyro_kpp") for k in counts["host_syncs_train_step"])
    options = results["options"]["kpp"]
    assert set(options) == {"channels_last", "flush_denormal", "mkldnn_off", "one_thread", "compile+channels_last",
                            "bf16+channels_last"}
    assert options["compile+channels_last"]["versus"] == "compile" and options["one_thread"]["versus"] == "eager"
    assert all(0 < o["step_ratio_range"][0] <= o["step_ratio"] <= o["step_ratio_range"][1] for o in options.values())
    assert set(results["scaling"]) == {"memory_area", "slots", "episode_length"}
    assert {p["model"] for p in results["scaling"]["slots"]["points"]} == {"km", "dkm"}
    assert 0 < results["flops"]["kpp"]["fraction_of_peak"]
    assert all(r["steps"] >= 1 and r["test_bound"] > 0 for r in results["quality"].values())
    assert all(r["curve"][-1]["test_bound"] == r["test_bound"] for r in results["quality"].values())
    assert all(r["settings"] == {"precision": "auto", "channels_last": True} for r in results["quality"].values())
    for section in results["speed"].values():
        variants = section["variants"]
        assert set(variants) == {"eager", "compile", "bf16", "compile+bf16", "defaults"} and variants["eager"]["speedup"] == 1.0
        assert all(v["train_images_per_s"] > 0 and v["speedup"] > 0 for v in variants.values())
    evaluation = results["evaluation"]["kpp"]
    assert {evaluation[k]["test_images"] for k in ("eager", "channels_last", "channels_last+compile")} == {2 * 4}
    assert {t["name"] for t in report["targets"]} == {"kpp_vs_dkm", "pyro_overhead", "memory_area", "matmul_peak",
                                                      "compile", "evaluation"}
    for t in report["targets"]:                # each missed step target comes with its profile table
        if t["name"] == "evaluation":          # (the evaluation target times a whole run, not a step)
            continue
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
        main(["--quick", "--sections", "speedy", "--out", str(tmp_path)])
    assert "sections: expected a comma-separated subset" in capsys.readouterr().err


def test_gpu_section_runs_on_the_cpu(tmp_path, capsys, fast_compile):
    """The command a GPU user runs (``--sections gpu --device cuda``), tiny and on the CPU: so it is
    known to work end to end when a GPU is present."""
    out = tmp_path / "gpu"
    assert main(["--quick", "--repeats", "1", "--sections", "gpu", "--device", "cpu", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "bench.json").read_text())
    for preset in ("paper", "recipe"):
        r = report["results"]["gpu"]["kpp-dkm"][preset]
        assert set(r["steps"]) == {"kpp eager", "dkm eager", "kpp compile+bf16", "dkm compile+bf16"}
        assert r["dkm_over_kpp"]["eager"] > 0 and r["device"] == "cpu"
    assert "DKM / K++ step time" in capsys.readouterr().out
