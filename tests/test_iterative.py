"""Iterative reading, generation helpers, class-structured episodes and the generation CLI."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

import pyro_kpp
from pyro_kpp.data import DataError, ImageData
from pyro_kpp.data.episodes import class_episodes
from pyro_kpp.generation import MODES, main as generation_main
from pyro_kpp.models import MODELS, build_model
from pyro_kpp.reading import iterative as G

from helpers import tiny_config


def test_iterative_read_returns_every_step_and_leaves_the_memory_alone(model, episode):
    memory = model.write(episode)
    before = memory.value.clone()
    reading = pyro_kpp.iterative_read(model, memory, episode, steps=3, full=True,
                                      generator=torch.Generator().manual_seed(0))
    assert reading.steps == 3
    assert reading.queries.shape == (3, 2, 4, 1, 28, 28)
    assert reading.keys.shape == (3, 2, 4, 2, 3)
    assert reading.params.shape == (3, 2, 4, 1, 28, 28)
    assert reading.means().shape == (3, 2, 4, 1, 28, 28)
    assert torch.equal(memory.value, before)
    assert torch.equal(reading.queries[0], episode)
    # Fed-back queries are samples of the reconstruction: binary, so valid Bernoulli inputs.
    assert set(reading.queries[1:].unique().tolist()) <= {0.0, 1.0}


def test_first_step_is_the_ordinary_reconstruction(model, episode):
    memory = model.write(episode)
    reading = G.iterative_read(model, memory, episode, steps=1)
    direct = model.generate(memory, model.infer_keys(episode), sample_z=False)
    assert torch.allclose(reading.params[0], direct)


def test_each_step_reads_from_the_previous_reconstruction(model, episode):
    memory = model.write(episode)
    reading = G.iterative_read(model, memory, episode, steps=4, feedback="threshold")
    for i in range(1, 4):
        mode = (torch.sigmoid(reading.params[i - 1]) > 0.5).float()
        assert torch.equal(reading.queries[i], mode)
        assert torch.allclose(reading.keys[i], model.infer_keys(mode))
        assert torch.allclose(reading.params[i], model.generate(memory, reading.keys[i], sample_z=False))


def test_sampled_feedback_is_reproducible_with_a_generator(model, episode):
    memory = model.write(episode)
    a = G.iterative_read(model, memory, episode, 3, generator=torch.Generator().manual_seed(5))
    b = G.iterative_read(model, memory, episode, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.queries, b.queries) and torch.equal(a.params, b.params)


def test_iterative_read_rejects_bad_input(model, episode):
    memory = model.write(episode)
    with pytest.raises(ValueError, match="steps"):
        G.iterative_read(model, memory, episode, 0)
    with pytest.raises(ValueError, match="x: the Bernoulli likelihood needs binary pixels"):
        G.iterative_read(model, memory, torch.full_like(episode, 0.5), 2)
    with pytest.raises(ValueError, match="x: expected 2 episodes"):
        G.iterative_read(model, memory, episode[:1], 2)
    other = build_model(tiny_config())
    with pytest.raises(ValueError, match="memory: it was written by another model"):
        G.iterative_read(other, memory, episode, 2)
    with pytest.raises(ValueError, match="feedback"):
        G.iterative_read(model, memory, episode, 2, feedback="mean")


def test_clean_up_starts_from_the_generation(model, episode):
    memory = model.write(episode)
    keys = model.prior_keys(memory, 5, generator=torch.Generator().manual_seed(0))
    params = G.clean_up(model, memory, keys, steps=3, generator=torch.Generator().manual_seed(0))
    assert params.shape == (4, 2, 5, 1, 28, 28)
    assert torch.allclose(params[0], model.generate(memory, keys, sample_z=False))
    assert G.clean_up(model, memory, keys, steps=0).shape == (1, 2, 5, 1, 28, 28)


def test_perturbed_keys_are_local_gaussian_perturbations():
    base = torch.randn(2, 3, 2, 3)
    keys = G.perturbed_keys(base, 4000, std=0.1, generator=torch.Generator().manual_seed(0))
    assert keys.shape == (2, 3 * 4000, 2, 3)
    eps = keys.view(2, 3, 4000, 2, 3) - base.unsqueeze(2)    # perturbations of key j are rows j*n..
    assert eps.mean().abs() < 3 * 0.1 / math.sqrt(eps.numel())
    assert abs(eps.std().item() - 0.1) < 0.002
    assert torch.equal(G.perturbed_keys(base, 2, std=0.0), base.repeat_interleave(2, dim=1))


def test_interpolation_runs_between_the_two_images_keys(model, episode):
    a, b = torch.randn(2, 2, 3), torch.randn(2, 2, 3)
    path = G.interpolate_keys(a, b, 5)
    assert path.shape == (2, 5, 2, 3)
    assert torch.allclose(path[:, 0], a) and torch.allclose(path[:, -1], b)
    assert torch.allclose(path[:, 2], (a + b) / 2)
    memory = model.write(episode)
    out = G.interpolate(model, memory, episode, 0, 3, n=4)
    keys = model.infer_keys(episode)
    assert out.shape == (2, 4, 1, 28, 28)
    assert torch.allclose(out[:, 0], model.generate(memory, keys[:, :1], sample_z=False)[:, 0], atol=1e-5)
    assert torch.allclose(out[:, -1], model.generate(memory, keys[:, 3:4], sample_z=False)[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="j: expected an image index"):
        G.interpolate(model, memory, episode, 0, 4)


@pytest.mark.parametrize("classes", [2, 4, 12])
def test_class_episodes_hold_exactly_n_characters(omniglot, classes):
    x, labels = class_episodes(omniglot, classes, 12, episodes=3, seed=1)
    assert x.shape == (3, 12, 1, 28, 28) and labels.shape == (3, 12)
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    for e in range(3):
        counts = torch.bincount(labels[e]).tolist()
        shares = sorted(c for c in counts if c)
        assert len(shares) == classes                        # exactly n characters
        assert shares[-1] - shares[0] <= 1                   # shared as evenly as possible
    # The images are the labelled test images themselves (grey levels when not binarized).
    grey, same = class_episodes(omniglot, classes, 12, episodes=3, seed=1, binarize=False)
    assert torch.equal(same, labels)
    for e, t in [(0, 0), (2, 11)]:
        candidates = omniglot.test[omniglot.test_labels == labels[e, t]].float() / 255
        assert any(torch.equal(grey[e, t], c) for c in candidates)


def test_class_episodes_errors(omniglot):
    with pytest.raises(DataError, match="classes: only"):
        class_episodes(omniglot, 2, 32)                       # 16 test images of one character: none
    with pytest.raises(DataError, match="cannot all appear"):
        class_episodes(omniglot, 5, 4)
    blank = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    unlabelled = ImageData("toy", blank, blank)
    with pytest.raises(DataError, match="no class labels"):
        class_episodes(unlabelled, 1, 2)


@pytest.mark.parametrize("mode", MODES)
def test_generation_cli_writes_each_figure(tiny_run, tmp_path, mode, capsys):
    out = tmp_path / f"{mode}.png"
    args = [str(tiny_run), mode, "--out", str(out), "-n", "4", "--steps", "2"]
    if mode == "one-shot":
        args += ["--classes", "4"]
    assert generation_main(args) == 0
    with Image.open(out) as im:
        assert im.size[0] > 100 and im.size[1] > 50
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_reads_iteratively_through_the_interface(name, episode):
    torch.manual_seed(0)
    model = build_model(tiny_config(model=name)).eval()
    memory = model.write(episode)
    before = [v.clone() for v in (memory.value if isinstance(memory.value, tuple) else (memory.value,))]
    reading = G.iterative_read(model, memory, episode, 2, generator=torch.Generator().manual_seed(0))
    assert reading.params.shape == (2, 2, 4, 1, 28, 28) and reading.keys.shape[:3] == (2, 2, 4)
    after = memory.value if isinstance(memory.value, tuple) else (memory.value,)
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert G.clean_up(model, memory, model.prior_keys(memory, 3), 1).shape == (2, 2, 3, 1, 28, 28)


def test_one_shot_figure_of_a_class_run_draws_its_test_classes(tiny_class_run, tmp_path, monkeypatch):
    """A run trained on class episodes is shown characters of its own test split (new alphabets)."""
    import pyro_kpp.generation as generation
    from pyro_kpp.data.omniglot import OMNIGLOT_BACKGROUND_CHARACTERS
    drawn = []

    def spy(pool, *args, **kwargs):
        drawn.append(pool)
        return class_episodes(pool, *args, **kwargs)

    monkeypatch.setattr(generation, "class_episodes", spy)
    out = tmp_path / "one-shot.png"
    assert generation_main([str(tiny_class_run), "one-shot", "--out", str(out), "-n", "4", "--steps", "1",
                            "--classes", "2", "-T", "4"]) == 0
    assert len(drawn[0].test) == 13_180 and int(drawn[0].test_labels.min()) >= OMNIGLOT_BACKGROUND_CHARACTERS
