"""Non-finite and malformed state is refused with a named error; every CLI failure exits 2 with one line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pyro_kpp
from pyro_kpp import api
from pyro_kpp import evaluate as evaluate_cli
from pyro_kpp import svi
from pyro_kpp.bench.__main__ import main as bench_main
from pyro_kpp.denoise import main as denoise_main
from pyro_kpp.generation import main as generation_main
from pyro_kpp.models import MODELS, build_model
from pyro_kpp.models.base import Memory
from pyro_kpp.reading.iterative import iterative_read
from pyro_kpp.train import session
from pyro_kpp.train.checkpoint import load_checkpoint, save_checkpoint

from helpers import exit_line, tiny_cli_args, tiny_config

FLOATS = [torch.float64, torch.float16, torch.bfloat16]



@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: build_model(tiny_config(model=name, slots=8, address_size=8)).eval() for name in sorted(MODELS)}


# -- non-finite hyperparameters and weights ---------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "argument --lr: expected a finite number"),
    (["--lr", "nan"], "argument --lr: expected a finite number"),
    (["--clip-norm", "nan"], "argument --clip-norm: expected a finite number"),
    (["--clip-norm", "-1"], "--clip-norm: expected a finite norm >= 0"),
    (["--max-minutes", "inf"], "argument --max-minutes: expected a finite number"),
])
def test_nonfinite_hyperparameters_are_refused_at_parse_time(argv, message, tmp_path, capsys):
    run = tmp_path / "r"
    assert message in exit_line(capsys, svi.main, *argv, "--run-dir", str(run))
    assert not run.exists()


def test_nonfinite_noise_levels_are_refused(tiny_run, capsys):
    assert "argument --level" in exit_line(capsys, denoise_main, str(tiny_run), "--noise", "speckle", "--level", "inf")
    assert "argument --std" in exit_line(capsys, generation_main, str(tiny_run), "perturbed", "--out", "x.png",
                                          "--std", "nan")
    with pytest.raises(ValueError, match="peak: expected a positive, finite"):
        pyro_kpp.data.noise.corrupt(torch.zeros(1, 1, 4, 4), "poisson", float("inf"))


def test_a_checkpoint_with_nonfinite_weights_is_refused(tiny_run, tmp_path, capsys):
    state = load_checkpoint(tiny_run)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    save_checkpoint(tmp_path / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "format_version")})
    with pytest.raises(ValueError, match=f"NaN or Inf values .*{name}"):
        pyro_kpp.load(tmp_path)
    assert "NaN or Inf" in exit_line(capsys, evaluate_cli.main, str(tmp_path), "-S", "2")


def test_weights_that_turn_nonfinite_in_training_are_never_saved(tmp_path, monkeypatch, capsys):
    real = session.build_optimizer

    def poisoned(cfg, model, steps_per_epoch):
        optimizer, scheduler = real(cfg, model, steps_per_epoch)
        step = optimizer.step

        def poisoned_step(*args, **kwargs):
            out = step(*args, **kwargs)
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            return out

        optimizer.step = poisoned_step
        return optimizer, scheduler

    monkeypatch.setattr(session, "build_optimizer", poisoned)
    run = tmp_path / "run"
    line = exit_line(capsys, svi.main, "--data", "omniglot", "--run-dir", str(run), "--no-progress",
                      *tiny_cli_args(), "--max-steps", "1")
    assert "weights became non-finite by step 1" in line and "No checkpoint was written" in line
    assert not run.exists()


# -- empty episodes, dtypes, memories ----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(0, 4), (2, 0)])
def test_empty_episodes_are_errors_for_every_model(models, name, shape):
    x = torch.zeros(*shape, 1, 28, 28)
    with pytest.raises(ValueError, match="episode: expected at least one episode of at least one image"):
        models[name].write(x)
    with pytest.raises(ValueError, match="episode: expected at least one episode"):
        pyro_kpp.write(models[name], x)


@pytest.mark.parametrize("dtype", FLOATS)
def test_episode_dtypes_are_converted_by_the_api_and_named_by_the_model(model, episode, dtype):
    with pytest.raises(TypeError, match=f"episode: expected dtype torch.float32 .* got {dtype}"):
        model.write(episode.to(dtype))
    converted = pyro_kpp.write(model, episode.to(dtype))
    assert torch.allclose(converted.value, pyro_kpp.write(model, episode).value)


def test_key_dtypes_are_converted_by_sample_and_named_by_generate(model, episode):
    memory = model.write(episode)
    keys = model.prior_keys(memory, 3).double()
    with pytest.raises(TypeError, match="keys: expected dtype torch.float32 .* got torch.float64"):
        model.generate(memory, keys)
    assert pyro_kpp.sample(memory, keys).shape == (2, 3, 1, 28, 28)


def test_foreign_and_malformed_memories_are_refused(models, episode):
    kpp, km = models["kpp"], models["km"]
    good = kpp.write(episode)
    cases = [
        (Memory(kpp, torch.zeros(2, 3, 8, 8)), ValueError, r"expected a kpp memory of shape \(B, 3, 16, 16\)"),
        (Memory(kpp, km.write(episode).value), ValueError, "expected a kpp memory"),
        (Memory(kpp, torch.zeros(0, 3, 16, 16)), ValueError, "B >= 1"),
        (Memory(kpp, torch.full((2, 3, 16, 16), float("nan"))), ValueError, "memory: contains NaN or Inf"),
        (Memory(kpp, good.value.double()), TypeError, "memory: expected dtype torch.float32"),
        (Memory(km, (torch.zeros(2, 8, 8), torch.zeros(2, 8, 7))), ValueError, r"km memory of shape \(B, 8, 8\) and"),
    ]
    keys = {kpp: kpp.prior_keys(good, 2), km: km.prior_keys(km.write(episode), 2)}   # valid keys
    for memory, error, message in cases:
        with pytest.raises(error, match=message):
            pyro_kpp.sample(memory, n=2)
        with pytest.raises(error, match=message):
            memory.model.generate(memory, keys[memory.model])
    with pytest.raises(ValueError, match="written by another model"):
        iterative_read(models["dkm"], good, episode, 1)
    with pytest.raises(TypeError, match="memory: expected a Memory"):
        pyro_kpp.sample(good.value)


def test_sampling_many_images_runs_in_bounded_chunks(model, episode, monkeypatch):
    memory = model.write(episode)
    sizes = []
    real = model.generate

    def recorded(memory, keys, **kwargs):
        sizes.append(keys.shape[0] * keys.shape[1])
        return real(memory, keys, **kwargs)

    monkeypatch.setattr(model, "generate", recorded)
    images = pyro_kpp.sample(memory, n=1000, as_uint8=True, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1000, 1, 28, 28) and images.dtype == torch.uint8
    assert max(sizes) <= api.SAMPLE_CHUNK and sum(sizes) == 2000


# -- CLI paths that used to end in tracebacks --------------------------------------------------

@pytest.mark.parametrize("device", ["mps", "meta"])
def test_svi_refuses_unsupported_devices_before_making_a_folder(device, tmp_path, capsys):
    run = tmp_path / "r"
    assert "--device: expected 'auto', 'cpu', 'cuda'" in exit_line(capsys, svi.main, "--device", device,
                                                                  "--run-dir", str(run))
    assert not run.exists()


def test_bench_refuses_a_file_as_out_and_unsupported_devices(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("")
    assert "--out:" in exit_line(capsys, bench_main, "--quick", "--sections", "flops", "--out", str(target))
    assert "device:" in exit_line(capsys, bench_main, "--quick", "--device", "mps", "--out", str(tmp_path / "b"))


def test_denoise_show_zero_is_a_clear_error(tiny_run, capsys):
    line = exit_line(capsys, denoise_main, str(tiny_run), "--noise", "speckle", "--show", "0")
    assert "argument --show: expected a positive integer" in line


def test_evaluate_a_checkpoint_without_config(tiny_run, tmp_path, capsys):
    state = load_checkpoint(tiny_run)
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": state["model"], "step": state["step"]})
    assert "lacks ['config']" in exit_line(capsys, evaluate_cli.main, str(tmp_path))


@pytest.mark.parametrize("argv, message", [
    (["interpolate", "-T", "1"], "--episode-length: interpolate needs episodes of at least 2 images"),
    (["random", "-T", "0"], "argument -T/--episode-length: expected a positive integer"),
])
def test_generation_episode_length_errors(tiny_run, tmp_path, capsys, argv, message):
    line = exit_line(capsys, generation_main, str(tiny_run), *argv, "--out", str(tmp_path / "f.png"))
    assert message in line


def test_python_m_generation_prints_no_runpy_warning():
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "pyro_kpp.generation", "--help"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0 and "Warning" not in out.stderr, out.stderr
