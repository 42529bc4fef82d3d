"""Speed options of training: compiled networks (``--compile``) and bf16 autocast (``--precision``).

Neither changes the model, its parameters' names or what a checkpoint holds, so both may change
on resume; every evaluation (``pyro_kpp.bound.evaluate``) runs in float32 whatever the training
precision, so a reported bound never depends on them.

* ``compile_networks`` compiles each network of a model with ``torch.compile`` in place
  (``nn.Module.compile``: the state-dict keys stay as they are). Only the plain ``nn.Module``
  networks are compiled (encoder, decoder, heads, writer): the Pyro program around them
  (sample sites, plates, ``PyroModule`` parameters) changes its Python control flow with every
  trace and would make TorchDynamo recompile or break its graph at every site. Where
  compilation is unavailable (no C++ compiler for the CPU backend, an unsupported platform) the
  networks stay eager and the message says why.
* ``autocast`` runs the training loss under ``torch.autocast`` in bfloat16: matrix products and
  convolutions in bf16, reductions and the log-densities in float32 (PyTorch's autocast lists).
  On CPUs with AMX or AVX512-BF16 oneDNN runs these at several times the float32 rate; the
  benchmark's ``speed`` section measures it, and the README gives the bound reached both ways.
"""
from __future__ import annotations

import contextlib

import torch
from pyro.nn import PyroModule
from torch import nn

PRECISIONS = ("fp32", "bf16")
#: torch.compile's backend. Tests of the plumbing around compilation (the benchmark's sections)
#: set "aot_eager", which traces the same graphs without generating code, to save minutes.
BACKEND = "inductor"


def networks(model: nn.Module, prefix: str = "") -> list[str]:
    """Names of the plain ``nn.Module`` networks with parameters inside ``model``, descending into
    ``PyroModule`` children (whose attribute access goes through Pyro's parameter store)."""
    names = []
    for name, child in model.named_children():
        if isinstance(child, PyroModule):
            names += networks(child, f"{prefix}{name}.")
        elif any(True for _ in child.parameters()):
            names.append(prefix + name)
    return names


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, or None when a small probe compiles and
    runs (the CPU backend needs a working C++ compiler, the CUDA backend Triton)."""
    try:
        probe = torch.compile(lambda t: torch.nn.functional.elu(t) * 2, dynamic=False, backend=BACKEND)
        probe(torch.ones(4, device=device))
    except Exception as exc:                                  # any backend failure means: stay eager
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}"
    finally:
        torch._dynamo.reset()
    return None


def compile_networks(model: nn.Module, device: torch.device) -> tuple[list[str], str | None]:
    """Compile ``model``'s networks in place (``networks``); returns (the compiled names, None), or
    ([], the reason) when compilation is unavailable on ``device`` and everything stays eager."""
    reason = compile_unavailable(device)
    if reason is not None:
        return [], reason
    names = networks(model)
    for name in names:
        model.get_submodule(name).compile(backend=BACKEND)
    return names, None


def autocast(precision: str, device: torch.device):
    """The training loss's context: ``torch.autocast`` in bf16, or nothing for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16 support; a CPU with AVX512-BF16 or
    AMX, as oneDNN reports it); elsewhere bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
