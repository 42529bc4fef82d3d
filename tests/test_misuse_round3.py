"""Issue 23, part B: misuse of the API and of the CLIs' options gets one clear error naming the
argument, up front; absurd sizes are refused with the number; long work shows its progress."""
from __future__ import annotations

import re

import numpy as np
import pyro
import pytest
import torch

import pyro_kpp
from pyro_kpp import denoise
from pyro_kpp import evaluate
from pyro_kpp import generation as generation_cli
from pyro_kpp import svi
from pyro_kpp.config import Config
from pyro_kpp.data.noise import MAX_PEAK, blocks, poisson
from pyro_kpp.denoise import evaluate_denoising
from pyro_kpp.models import build_model
from pyro_kpp.reading.iterative import MAX_READ_STEPS, iterative_read
from pyro_kpp.train import footprint
from pyro_kpp.viz.grids import png_path

from helpers import make_mnist, tiny_cli_args, tiny_config


def _error(capsys, call, *argv) -> str:
    """``call(argv)`` exits with status 2 and one error line, no traceback; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        call([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def _twins(name: str):
    """Two models of one kind and the same sizes, and an episode batch: their memories have equal shapes."""
    torch.manual_seed(0)
    a, b = (build_model(tiny_config(model=name)).eval() for _ in range(2))
    return a, b, torch.bernoulli(torch.full((2, 4, 1, 28, 28), 0.2))


# -- item 7: another model's memory -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["kpp", "km", "dkm", "vae"])
def test_every_memory_method_refuses_another_models_memory(name):
    model, other, x = _twins(name)
    foreign = pyro_kpp.write(other, x)
    keys = model.prior_keys(model.write(x), 3)                       # (B, 3, *key_shape): the right shape
    calls = {"generate": lambda: model.generate(foreign, keys),
             "read": lambda: model.read(foreign, x, model.infer_keys(x)),
             "prior_keys": lambda: model.prior_keys(foreign, 3),
             "infer_keys": lambda: model.infer_keys(x, foreign)}
    for method, call in calls.items():
        with pytest.raises(ValueError, match="memory: it was written by another model"):
            call()
            pytest.fail(f"{name}.{method} read another model's memory")


def test_dkm_generate_names_the_model_that_wrote_a_km_memory():
    torch.manual_seed(0)
    km, dkm = build_model(tiny_config(model="km")).eval(), build_model(tiny_config(model="dkm")).eval()
    memory = pyro_kpp.write(km, torch.bernoulli(torch.full((2, 4, 1, 28, 28), 0.2)))
    with pytest.raises(ValueError, match=r"another model \(a KanervaMachine\)"):
        dkm.generate(memory, torch.zeros(2, 3, dkm.cfg.slots))


# -- item 8: counts, and a memory of one episode -----------------------------------------------------
def test_sample_takes_any_integral_n_and_refuses_bools_and_floats(model, episode):
    memory = pyro_kpp.write(model, episode)
    assert pyro_kpp.sample(memory, n=np.int64(4)).shape[:2] == (2, 4)
    assert pyro_kpp.sample(memory, n=torch.tensor(3)).shape[:2] == (2, 3)
    for bad in (True, 4.0, "4"):
        with pytest.raises(TypeError, match=r"n: expected a positive number of samples, got (bool|float|str)"):
            pyro_kpp.sample(memory, n=bad)


def test_a_memory_of_one_episode_says_episode(model, episode):
    assert "1 episode," in repr(pyro_kpp.write(model, episode[:1]))


# -- API misuse: raw library errors before -----------------------------------------------------------
@pytest.mark.parametrize("bad", [None, "runs/omniglot-kpp", torch.nn.Linear(2, 2)])
def test_write_names_a_model_that_is_not_one(bad, episode):
    with pytest.raises(TypeError, match="model: expected a pyro_kpp model"):
        pyro_kpp.write(bad, episode)


def test_tensors_on_another_device_are_named(model, episode):
    with pytest.raises(ValueError, match=r"episode: expected a tensor on the model's device cpu, got meta"):
        pyro_kpp.write(model, episode.to("meta"))
    memory = pyro_kpp.write(model, episode)
    with pytest.raises(ValueError, match="keys: expected a tensor on the model's device"):
        model.generate(memory, torch.zeros(2, 3, 2, 3, device="meta"))


def test_a_seed_is_not_a_generator(model, episode):
    memory = pyro_kpp.write(model, episode)
    with pytest.raises(TypeError, match=r"generator: expected a torch.Generator or None, got int 5"):
        pyro_kpp.sample(memory, generator=5)
    with pytest.raises(TypeError, match="generator: expected a torch.Generator"):
        pyro_kpp.iterative_read(model, memory, episode, steps=2, generator=5)


def test_build_model_and_episodes_name_their_arguments():
    with pytest.raises(TypeError, match="cfg: expected a pyro_kpp.Config, got dict"):
        pyro_kpp.build_model({"model": "kpp"})
    with pytest.raises(ValueError, match="data: expected one of omniglot"):
        pyro_kpp.episodes("omniglott")


def test_load_none_names_the_argument():
    with pytest.raises(TypeError, match="run_dir: expected a run directory or checkpoint path"):
        pyro_kpp.load(None)


def test_keys_of_no_images_are_refused(model, episode):
    memory = pyro_kpp.write(model, episode)
    with pytest.raises(ValueError, match=r"keys: expected shape \(2, N, 2, 3\), N >= 1"):
        pyro_kpp.sample(memory, torch.zeros(2, 0, 2, 3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_episodes_on_cuda_without_a_gpu_is_named():
    with pytest.raises(ValueError, match="device: 'cuda' was requested but CUDA is not available"):
        pyro_kpp.episodes("omniglot", device="cuda")


def test_a_nan_episode_is_refused_by_write_even_without_validation(model, episode):
    x = episode.clone()
    x[0, 1, 0, 3, 3] = float("nan")
    with pyro.validation_enabled(False):
        with pytest.raises(ValueError, match="episode: contains NaN or Inf values"):
            pyro_kpp.write(model, x)
        with pytest.raises(ValueError, match="episode: contains NaN or Inf values"):
            model.write(x)


# -- item 9: absurd values are bounded, with the reason ----------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("memory_blur", 1e6, "memory_blur: expected a number of memory pixels from 0 to 64"),
    ("dkm_write_iterations", 1_000_000, "dkm_write_iterations: expected at most 10"),
    ("lr", 1e300, "lr: expected a positive learning rate of at most 1"),
])
def test_absurd_config_values_are_bounded(field, value, message):
    with pytest.raises(ValueError, match=message):
        Config(model="dkm" if field.startswith("dkm") else "kpp", **{field: value})


def test_iterative_reading_steps_are_bounded(model, episode):
    memory = pyro_kpp.write(model, episode)
    with pytest.raises(ValueError, match=f"steps: expected at most {MAX_READ_STEPS}"):
        iterative_read(model, memory, episode, MAX_READ_STEPS + 1)


def test_noise_levels_that_overflow_or_repeat_are_refused():
    x = torch.ones(2, 1, 28, 28)
    with pytest.raises(ValueError, match=re.escape(f"at most {MAX_PEAK:g}")):
        poisson(x, 1e300)
    with pytest.raises(ValueError, match=r"count: expected at most 289 blocks"):
        blocks(x, 1_000_000)


def test_evaluate_refuses_absurd_sample_counts_before_loading(tmp_path, capsys):
    with pytest.raises(ValueError, match="samples: expected at most 10000"):
        evaluate.evaluate_run(str(tmp_path / "no-run"), samples=1_000_000)
    with pytest.raises(ValueError, match="max_episodes: expected a positive integer, got 0"):
        evaluate.evaluate_run(str(tmp_path / "no-run"), max_episodes=0)
    assert "argument --episodes: expected a positive integer" in _error(
        capsys, evaluate.main, tmp_path / "no-run", "--episodes", "-2")


def test_denoise_and_generation_bound_their_options_before_loading(capsys, tmp_path):
    missing = tmp_path / "no-run"
    assert "--steps: expected at most" in _error(capsys, denoise.main, missing, "--noise", "speckle",
                                                  "--steps", 1_000_000)
    assert "-n: expected at most 64" in _error(capsys, generation_cli.main, missing, "random", "--out",
                                                tmp_path / "g.png", "-n", 1_000_000)
    assert "--out: expected a .png file name" in _error(capsys, denoise.main, missing, "--noise", "speckle",
                                                         "--out", tmp_path / "figure.jpg")


def test_denoise_level_and_out_on_a_run(capsys, tiny_run, tmp_path):
    assert "--level (peak): expected a positive, finite count" in _error(
        capsys, denoise.main, tiny_run, "--noise", "poisson", "--level", 1e300)
    out = tmp_path / "figure"
    assert denoise.main([str(tiny_run), "--noise", "speckle", "--steps", "1", "--episodes", "1",
                         "--out", str(out)]) == 0
    assert f"figure: {out}.png" in capsys.readouterr().out
    assert (tmp_path / "figure.png").is_file() and not out.exists()


def test_generation_prints_the_file_it_wrote(capsys, tiny_run, tmp_path):
    out = tmp_path / "generated"
    assert generation_cli.main([str(tiny_run), "random", "--out", str(out), "-n", "2"]) == 0
    assert f"wrote {out}.png" in capsys.readouterr().out
    assert (tmp_path / "generated.png").is_file()


def test_png_path_says_where_a_figure_goes(tmp_path):
    assert png_path(tmp_path / "a") == tmp_path / "a.png"
    assert png_path(tmp_path / "a.PNG") == tmp_path / "a.PNG"
    with pytest.raises(ValueError, match="is a folder"):
        png_path(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        png_path(tmp_path / "missing" / "a.png")


def test_denoising_ticks_every_step_for_the_progress_bar(model):
    grey = torch.rand(2, 4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ticks = []
    evaluate_denoising(model, [grey, grey], "speckle", steps=3, tick=lambda: ticks.append(1))
    assert len(ticks) == 2 * 3                                    # batches x steps: an ETA from the first step


# -- sizes that cannot fit: one estimator, refused up front with the number ----------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    make_mnist(root, n_train=16, n_test=8)
    return root


@pytest.mark.parametrize("argv, option", [
    (["--batch-size", "10000000"], "--batch-size 10000000"),
    (["--reads", "1000000"], "--reads 1000000"),
    (["--code-size", "1000000"], "--code-size 1000000"),
    (["--model", "km", "--slots", "1000000"], "--slots 1000000"),
    (["--model", "dkm", "--slots", "1000000"], "--slots 1000000"),
])
def test_sizes_that_cannot_fit_are_refused_with_the_number(argv, option, capsys, tmp_path, small_data, monkeypatch):
    monkeypatch.setattr(footprint, "device_bytes", lambda device: 64 * 2**30)   # the same on every machine
    run = tmp_path / "run"
    line = _error(capsys, svi.main, "--data", "mnist", "--data-dir", small_data, "--run-dir", run, "--no-progress",
                  *tiny_cli_args(), *argv)
    assert "memory: a training step of this config needs about" in line and "more than the 64.0 GiB" in line
    assert option in line
    assert not run.exists()                                      # nothing left behind


@pytest.mark.parametrize("name", ["kpp", "km", "dkm", "vae"])
def test_the_estimate_extrapolated_from_two_episodes_matches_a_dry_run_of_the_batch(name):
    cfg = tiny_config(model=name, batch_size=8)
    cfg.image_shape = (1, 28, 28)
    with torch.device("meta"):
        model = build_model(cfg)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    direct = footprint.PARAMETER_COPIES * params + footprint._forward_bytes(model, cfg, 8)
    assert direct <= footprint.training_bytes(cfg) <= 1.05 * direct


def test_the_default_config_fits_a_laptop():
    assert footprint.training_bytes(Config()) < 4 * 2**30


@pytest.mark.parametrize("argument", ["T", "B", "classes"])
def test_episodes_names_its_own_arguments(argument):
    """``pyro_kpp.episodes(T=0)`` names T, not the Config field it sets (episode_length)."""
    with pytest.raises(ValueError, match=rf"^{argument}: expected a positive integer"):
        next(iter(pyro_kpp.episodes("omniglot", **{argument: 0})))
