"""pyro_kpp: Kanerva++ and the Kanerva Machine family as Pyro probabilistic programs.

    import pyro_kpp
    model = pyro_kpp.load("runs/omniglot-kpp")
    memory = pyro_kpp.write(model, episode)
    images = pyro_kpp.sample(memory, n=16)
    steps = pyro_kpp.iterative_read(model, memory, episode, steps=10)   # K++ eq. 7
"""
__version__ = "0.1.0"

from .api import load, sample, write  # noqa: E402
from .config import Config  # noqa: E402
from .episodic import EpisodicModel, Memory  # noqa: E402
from .generation import IterativeReading, iterative_read  # noqa: E402
from .registry import build_model  # noqa: E402

__all__ = ["Config", "EpisodicModel", "IterativeReading", "Memory", "build_model", "iterative_read", "load",
           "sample", "write", "__version__"]
