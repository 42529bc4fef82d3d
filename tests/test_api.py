"""The user API: load, write, sample."""
from __future__ import annotations

import pytest
import torch

import pyro_kpp
from pyro_kpp import svi
from pyro_kpp.train.checkpoint import CheckpointError

from helpers import tiny_cli_args


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("api") / "run"
    assert svi.main(["--data", "omniglot", "--run-dir", str(run), "--max-steps", "2", "--no-progress",
                     *tiny_cli_args()]) == 0
    return run


@pytest.fixture(scope="module")
def model(run_dir):
    return pyro_kpp.load(run_dir)


def _episode(T=4, B=None):
    shape = (T, 1, 28, 28) if B is None else (B, T, 1, 28, 28)
    return torch.bernoulli(torch.full(shape, 0.2))


def test_load_gives_an_eval_model_with_the_run_config(model):
    assert not model.training
    assert model.cfg.memory_shape == (3, 16, 16) and model.cfg.data == "omniglot"


def test_write_accepts_one_episode_or_a_batch(model):
    assert pyro_kpp.write(model, _episode()).value.shape == (1, 3, 16, 16)
    memory = pyro_kpp.write(model, _episode(B=3))
    assert memory.value.shape == (3, 3, 16, 16) and memory.episodes == 3


def test_sample_shapes_and_ranges(model):
    memory = pyro_kpp.write(model, _episode(B=2))
    probs = pyro_kpp.sample(memory, n=5)
    assert probs.shape == (2, 5, 1, 28, 28)
    assert probs.min() >= 0 and probs.max() <= 1 and probs.std() > 0
    binary = pyro_kpp.sample(memory, n=5, binary=True)
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    keys = torch.zeros(2, 3, model.cfg.reads, 3)
    assert pyro_kpp.sample(memory, keys).shape == (2, 3, 1, 28, 28)
    # Deterministic with a generator; the mean code gives the same image for the same key.
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(pyro_kpp.sample(memory, n=4, generator=g1), pyro_kpp.sample(memory, n=4, generator=g2))
    a = pyro_kpp.sample(memory, keys, sample_z=False)
    torch.testing.assert_close(a[:, 0], a[:, 1])


def test_sampling_reads_the_memory(model):
    """Different memories give different prior codes, hence images, for the same keys."""
    keys = torch.randn(1, 4, model.cfg.reads, 3)
    m1 = pyro_kpp.Memory(model, torch.randn(1, 3, 16, 16))
    m2 = pyro_kpp.Memory(model, torch.randn(1, 3, 16, 16))
    loc1, _ = model.code_prior(m1.value, keys)
    loc2, _ = model.code_prior(m2.value, keys)
    assert (loc1 - loc2).abs().max() > 1e-2
    a = pyro_kpp.sample(m1, keys, sample_z=False)
    b = pyro_kpp.sample(m2, keys, sample_z=False)
    assert (a - b).abs().max() > 1e-4


def test_bad_inputs_name_the_argument(model):
    with pytest.raises(ValueError, match=r"episode: expected shape \(T, 1, 28, 28\) or \(B, T, 1, 28, 28\), "
                                         r"got \(4, 1, 32, 32\)"):
        pyro_kpp.write(model, torch.zeros(4, 1, 32, 32))
    with pytest.raises(ValueError, match="episode: the Bernoulli likelihood needs binary pixels"):
        pyro_kpp.write(model, torch.full((4, 1, 28, 28), 0.5))
    with pytest.raises(ValueError, match=r"episode: expected shape .* got list"):
        pyro_kpp.write(model, [[0.0]])
    with pytest.raises(TypeError, match="episode: expected a floating-point tensor"):
        pyro_kpp.write(model, torch.zeros(4, 1, 28, 28, dtype=torch.long))
    memory = pyro_kpp.write(model, _episode(B=2))
    with pytest.raises(ValueError, match=r"keys: expected shape \(2, N, 2, 3\)"):
        pyro_kpp.sample(memory, torch.zeros(2, 3, 2, 4))
    with pytest.raises(ValueError, match="n: expected a positive number"):
        pyro_kpp.sample(memory, n=0)
    with pytest.raises(TypeError, match="memory: expected a Memory"):
        pyro_kpp.sample(torch.zeros(1, 3, 16, 16))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        pyro_kpp.load(tmp_path)
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        pyro_kpp.load(tmp_path)
