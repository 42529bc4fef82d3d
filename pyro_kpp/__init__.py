"""pyro_kpp: Kanerva++ and the Kanerva Machine family as Pyro probabilistic programs.

    import pyro_kpp
    model = pyro_kpp.load("runs/omniglot-kpp")
    memory = pyro_kpp.write(model, episode)
    images = pyro_kpp.sample(memory, n=16)
    images = pyro_kpp.iterative_read(model, memory, episode, steps=10)  # K++ eq. 7: (10, T, C, H, W)
    for x in pyro_kpp.episodes("omniglot", split="test", T=32):          # (B, T, 1, 28, 28) batches
        ...
"""
__version__ = "0.1.0"

from pyro_kpp.train.interrupts import quiet_cli_interrupts  # noqa: E402  (first: a Ctrl-C in the imports below)
quiet_cli_interrupts()

from pyro_kpp.api import iterative_read, load, sample, write  # noqa: E402
from pyro_kpp.config import Config  # noqa: E402
from pyro_kpp.data import episodes  # noqa: E402  (a callable module: pyro_kpp.episodes(...))
from pyro_kpp.models import build_model  # noqa: E402
from pyro_kpp.models.base import EpisodicModel, Memory  # noqa: E402
from pyro_kpp.reading.iterative import IterativeReading  # noqa: E402

__all__ = ["Config", "EpisodicModel", "IterativeReading", "Memory", "build_model", "episodes", "iterative_read", "load",
           "sample", "write", "__version__"]
