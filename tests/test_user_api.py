"""The API a new user reaches for: episodes from a name, iterative reading on what write takes, short reprs."""
from __future__ import annotations

import pytest
import torch

import pyro_kpp


def test_episodes_returns_ready_test_batches():
    batches = list(pyro_kpp.episodes("omniglot", split="test", T=32))
    assert len(batches) == 32 and batches[0].shape == (8, 32, 1, 28, 28)   # 253 episodes in batches of 8
    assert sum(b.shape[0] for b in batches) == 253
    assert set(batches[0].unique().tolist()) <= {0.0, 1.0}
    again = next(iter(pyro_kpp.episodes("omniglot", split="test", T=32)))
    assert torch.equal(again, batches[0])                          # the fixed test episodes


def test_episodes_train_split_and_bad_split(model):
    x = next(iter(pyro_kpp.episodes("omniglot", split="train", T=4, B=2)))
    assert x.shape == (2, 4, 1, 28, 28)
    assert pyro_kpp.write(model, x).episodes == 2                  # ready for the model
    with pytest.raises(ValueError, match="split: expected one of"):
        pyro_kpp.episodes("omniglot", split="validation")
    assert callable(pyro_kpp.data.episodes.class_episodes)              # still the module


@pytest.mark.parametrize("batched", [False, True])
def test_iterative_read_takes_what_write_takes_and_returns_images(model, episode, batched):
    x = episode if batched else episode[0]
    memory = pyro_kpp.write(model, x)
    images = pyro_kpp.iterative_read(model, memory, x, steps=3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, *x.shape)
    assert 0 <= images.min() and images.max() <= 1
    full = pyro_kpp.iterative_read(model, memory, x, steps=3, full=True)
    assert isinstance(full, pyro_kpp.IterativeReading)
    assert full.params.shape == (3, 2 if batched else 1, 4, 1, 28, 28)
    first = full.means()[0] if batched else full.means()[0, 0]      # step 1 reads at the mean keys: no sampling
    assert torch.allclose(first, images[0], atol=1e-5)


def test_iterative_read_refuses_a_wrong_shape_naming_it(model, episode):
    memory = pyro_kpp.write(model, episode)
    with pytest.raises(ValueError, match=r"episode: expected shape \(T, 1, 28, 28\)"):
        pyro_kpp.iterative_read(model, memory, episode[0, 0], steps=2)


def test_memory_repr_is_one_short_line(model, episode):
    text = repr(pyro_kpp.write(model, episode))
    assert text == "Memory(KanervaPlusPlus, 2 episodes, value (2, 3, 16, 16) float32 on cpu)"
