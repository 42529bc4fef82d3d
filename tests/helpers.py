"""Test helpers importable from every test module (``from helpers import tiny_config``)."""
from __future__ import annotations

from pyro_kpp.config import Config

# Small enough that a training step takes milliseconds, large enough to exercise every shape.
TINY = dict(memory_shape=(3, 16, 16), window=8, writer_channels=16, code_size=8, embed_size=32,
            hidden=32, episode_length=4, batch_size=2, eval_episodes=2)


def tiny_config(**overrides) -> Config:
    return Config(**{**TINY, **overrides})


def tiny_cli_args(**overrides) -> list[str]:
    """The TINY settings as ``python -m pyro_kpp.svi`` options."""
    opts = {**TINY, **overrides}
    args = []
    for key, value in opts.items():
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args
