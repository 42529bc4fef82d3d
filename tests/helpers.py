"""Test helpers importable from every test module (``from helpers import tiny_config``)."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from pyro.poutine.util import site_is_subsample

from pyro_kpp.config import Config

# Small enough that a training step takes milliseconds, large enough to exercise every shape.
TINY = dict(memory_shape=(3, 16, 16), window=8, writer_channels=16, code_size=8, embed_size=32,
            hidden=32, episode_length=4, batch_size=2, eval_episodes=2)


def tiny_config(**overrides) -> Config:
    return Config(**{**TINY, **overrides})


def site_shapes(trace) -> dict[str, tuple[tuple, tuple]]:
    """{sample site: (batch_shape, event_shape)} of a Pyro trace, plates' subsample sites left out."""
    return {name: (tuple(site["fn"].batch_shape), tuple(site["fn"].event_shape))
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


def site_plates(trace) -> dict[str, set[str]]:
    """{sample site: names of the plates it is in} of a Pyro trace."""
    return {name: {f.name for f in site["cond_indep_stack"]} for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


def tiny_cli_args(**overrides) -> list[str]:
    """The TINY settings as ``python -m pyro_kpp.svi`` options."""
    opts = {**TINY, **overrides}
    args = []
    for key, value in opts.items():
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the big-endian idx format of (Fashion-)MNIST."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", (0x08 << 8) | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.tobytes())


def make_mnist(root: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """A synthetic MNIST stand-in in torchvision's raw layout: root/MNIST/raw/*-idx?-ubyte."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels"] = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", arrays[f"{prefix}-images"])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", arrays[f"{prefix}-labels"])
    return arrays


def exit_line(capsys, call, *argv) -> str:
    """``call(argv)`` exits with status 2 and one error line, no traceback; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        call(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]
