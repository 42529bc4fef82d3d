"""Shared test set-up: real data location and session fixtures (helpers live in helpers.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Real data for tests and for the CLIs they start: $PYRO_KPP_DATA, else ../shared/data.
    os.environ.setdefault("PYRO_KPP_DATA", str(REPO.parent / "shared" / "data"))
    # Figures in tests and in the notebooks they run: a non-interactive backend.
    os.environ.setdefault("MPLBACKEND", "Agg")
    # Test models are tiny: one thread avoids oversubscribing the 2 cores of CI machines.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def omniglot():
    from pyro_kpp.data import load_dataset
    return load_dataset("omniglot")


@pytest.fixture(scope="module")
def model():
    """An untrained K++ with the tiny sizes, in eval mode."""
    from helpers import tiny_config
    from pyro_kpp.models import build_model

    torch.manual_seed(0)
    return build_model(tiny_config()).eval()


@pytest.fixture(scope="module")
def episode():
    """Two binary episodes of four 28x28 images."""
    return torch.bernoulli(torch.full((2, 4, 1, 28, 28), 0.2), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A K++ run directory (checkpoint.pt, metrics, images) trained for 3 steps on Omniglot
    with the tiny sizes of helpers.TINY: a real checkpoint for the CLIs and notebooks."""
    from helpers import tiny_config
    from pyro_kpp.svi import train

    run = tmp_path_factory.mktemp("tiny_run")
    train(tiny_config(max_steps=3), run, progress=False)
    return run
