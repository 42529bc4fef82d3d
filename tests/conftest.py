"""Shared test set-up: real data location and session fixtures (helpers live in helpers.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
#: Caches the tests write (decoded Omniglot tensors, ...): inside the clone, gitignored, unless
#: $PYRO_KPP_CACHE names another folder. Tests never write outside the clone and the temp dir.
TEST_CACHE = REPO / ".test-cache"
NO_DATA = ("no data: set PYRO_KPP_DATA=/path/to/data (the folder holding omniglot-py/, MNIST/raw/, "
           "FashionMNIST/raw/), or run the quick start's svi command in this clone first")


def find_data_root(repo: Path = REPO) -> tuple[Path | None, str]:
    """Where the tests read real data, and why (for the report header).

    1. ``$PYRO_KPP_DATA``, as CI and a user who exports it set it: used as given, so a wrong
       folder fails loudly instead of skipping.
    2. Else the data root of this clone's newest run (``runs/*/config.json``, whose ``data_dir``
       svi stores resolved): the quick start's ``PYRO_KPP_DATA=/path/to/data python -m
       pyro_kpp.svi ...`` sets the variable for that one command, and ``pytest`` in the same
       shell must find the same data. Chosen over a file that the CLI would write into the
       user's home: it adds no state outside the clone, belongs to this clone, and follows the
       data the user last trained on (a run made elsewhere with ``--run-dir`` is not seen).
    3. Else none: tests that need real data are skipped with ``NO_DATA`` (one line).

    Tests run offline (``$PYRO_KPP_OFFLINE=1`` unless set): no test downloads into, or creates
    folders under, a data root.
    """
    if os.environ.get("PYRO_KPP_DATA"):
        return Path(os.environ["PYRO_KPP_DATA"]), "$PYRO_KPP_DATA"
    configs = sorted((repo / "runs").glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for config in configs:
        try:
            root = json.loads(config.read_text()).get("data_dir")
        except (OSError, ValueError):
            continue
        if root and Path(root).is_dir():
            return Path(root), f"the newest run, {config.parent.relative_to(repo)}"
    return None, NO_DATA


DATA_ROOT, DATA_SOURCE = find_data_root()


def pytest_configure(config):
    if DATA_ROOT is not None:   # the CLIs that tests start inherit it
        os.environ["PYRO_KPP_DATA"] = str(DATA_ROOT)
    # A data set missing from the root is an error, never a download into it.
    os.environ.setdefault("PYRO_KPP_OFFLINE", "1")
    os.environ.setdefault("PYRO_KPP_CACHE", str(TEST_CACHE))
    # Figures in tests and in the notebooks they run: a non-interactive backend.
    os.environ.setdefault("MPLBACKEND", "Agg")
    # Test models are tiny: one thread avoids oversubscribing the 2 cores of CI machines.
    torch.set_num_threads(1)


def pytest_report_header(config):
    return f"pyro_kpp data: {DATA_ROOT} (from {DATA_SOURCE})" if DATA_ROOT else f"pyro_kpp {NO_DATA}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without data, a test that needed it is skipped with ``NO_DATA`` instead of failing with
    the loader's message (it names a folder of the test cache, which would mislead)."""
    report = (yield).get_result()
    if DATA_ROOT is None and report.failed and call.excinfo is not None and _missing_data(call.excinfo):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {NO_DATA}")


def _missing_data(excinfo) -> bool:
    """A DataError (or a CLI's message of one, offline) about a data set that is not there."""
    from pyro_kpp.data import DataError

    return excinfo.errisinstance(DataError) or "offline mode is on, so it is not downloaded" in str(excinfo.value)


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


@pytest.fixture(scope="session")
def tiny_class_run(tmp_path_factory) -> Path:
    """As ``tiny_run``, trained for 2 steps on class-structured episodes (2 characters of 2 drawings)."""
    from helpers import tiny_config
    from pyro_kpp.svi import train

    run = tmp_path_factory.mktemp("tiny_class_run")
    train(tiny_config(max_steps=2, episode_classes=2), run, progress=False)
    return run
