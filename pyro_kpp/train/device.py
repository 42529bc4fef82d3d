"""Device selection: ``auto`` is CUDA when present, else the CPU.

Only the CPU and CUDA are accepted: other torch devices (``mps``, ``meta``, ...) lack
operators these models use or hold no data (``meta``), and would fail mid-run.
"""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):   # mps, meta, ...: untested here, refused
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} was requested but CUDA is not available on this machine")
    return device
