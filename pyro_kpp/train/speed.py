"""Speed options of training: compiled networks (``--compile``), bf16 autocast (``--precision``) and
the channels-last layout (``--channels-last``, on by default).

None changes the model, its parameters' names or what a checkpoint holds, so all may change on
resume; every evaluation (``pyro_kpp.inference.bound.evaluate``) runs in float32 whatever the training
precision, so a reported bound never depends on them.

* ``compile_networks`` compiles each network of a model with ``torch.compile`` in place
  (``nn.Module.compile``: the state-dict keys stay as they are). Only the plain ``nn.Module``
  networks are compiled (encoder, decoder, heads, writer): the Pyro program around them
  (sample sites, plates, ``PyroModule`` parameters) changes its Python control flow with every
  trace and would make TorchDynamo recompile or break its graph at every site. Where
  compilation is unavailable (no C++ compiler for the CPU backend, an unsupported platform) the
  networks stay eager and the message says why.
* ``--precision bf16`` runs the *networks* in bfloat16 during the training loss (``auto``, the
  default, does so where the device computes bf16 natively, ``resolve_precision``): each network's
  forward is wrapped once (``autocast_networks``) so that, inside ``autocast(...)``, it runs
  under ``torch.autocast`` and returns float32. Everything else stays float32: the
  distributions' log-densities (Pyro's distributions are on no autocast list, so under a global
  autocast they would follow their bf16 inputs), the KL terms, and KM's and DKM's Bayesian
  write and its linear algebra (matrix products would otherwise run in bf16). On CPUs with
  AVX512-BF16 or AMX oneDNN runs the networks' convolutions and products at several times the
  float32 rate; the benchmark's ``speed`` section measures it.
* ``--channels-last`` (on by default) moves the networks' 4-d weights to the NHWC layout, in
  which oneDNN's convolutions run faster on x86 CPUs; the feature maps follow the weights. The
  benchmark's ``options`` section measures it, alone and on top of bf16 or compilation.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_kpp.config import PRECISIONS

#: torch.compile's backend. Tests of the plumbing around compilation (the benchmark's sections)
#: set "aot_eager", which traces the same graphs without generating code, to save minutes.
BACKEND = "inductor"
#: Compiled graphs allowed per code object of a network (TorchDynamo's default is 8). A network
#: compiles one graph per grad mode, input rank and, until it marks a size dynamic, input size;
#: instances of one class (two ``GaussianHead``s) share their ``forward``'s code object. A run
#: that trains, evaluates with particles and samples reached 6; past the limit a network runs
#: eager, silently but for one warning.
RECOMPILE_LIMIT = 32


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
    runs (the CPU backend needs a working C++ compiler, the CUDA backend Triton). Probed once per
    device and backend in a process."""
    return _probe(str(torch.device(device)), BACKEND)


@functools.lru_cache(maxsize=None)
def _probe(device: str, backend: str) -> str | None:
    try:
        probe = torch.compile(lambda t: torch.nn.functional.elu(t) * 2, dynamic=False, backend=backend)
        t = torch.ones(4, device=device, requires_grad=True)
        probe(t).sum().backward()                             # the backward's compiler too
    except Exception as exc:                                  # any backend failure means: stay eager
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}"
    return None


def compile_networks(model: nn.Module, device: torch.device) -> tuple[list[str], str | None]:
    """Compile ``model``'s networks in place (``networks``); returns (the compiled names, None), or
    ([], the reason) when compilation is unavailable on ``device`` and everything stays eager."""
    reason = compile_unavailable(device)
    if reason is not None:
        return [], reason
    # A network that still fails to compile later (an operator the backend lacks) runs eager,
    # with TorchDynamo's warning, instead of stopping the run.
    torch._dynamo.config.suppress_errors = True
    names = networks(model)
    for name in names:
        model.get_submodule(name).compile(backend=BACKEND, recompile_limit=RECOMPILE_LIMIT)
    return names, None


#: The device type whose networks run in bf16 now (inside ``autocast``), or None.
_BF16_DEVICE: str | None = None


@contextlib.contextmanager
def autocast(precision: str, device: torch.device):
    """The training loss's context: inside it, networks wrapped by ``autocast_networks`` run in
    bf16 when ``precision`` resolves to "bf16" on ``device`` (``resolve_precision``); for "fp32"
    it does nothing."""
    global _BF16_DEVICE
    previous = _BF16_DEVICE
    _BF16_DEVICE = device.type if resolve_precision(precision, device) == "bf16" else previous
    try:
        yield
    finally:
        _BF16_DEVICE = previous


def _to_float32(out):
    if isinstance(out, tuple):
        return tuple(_to_float32(o) for o in out)
    return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def autocast_networks(model: nn.Module) -> list[str]:
    """Wrap the forward of each of ``model``'s networks (``networks``) so that inside ``autocast``
    with bf16 it runs under ``torch.autocast`` and returns float32 tensors; outside, it is the
    plain forward. An instance attribute: parameters and state-dict keys are unchanged. Returns
    the names wrapped (each network once, however often it is called)."""
    names = networks(model)
    for name in names:
        net = model.get_submodule(name)
        if getattr(net.forward, "_bf16_wrapped", False):
            continue
        plain = net.forward

        def forward(*args, _plain=plain, **kwargs):
            if _BF16_DEVICE is None:
                return _plain(*args, **kwargs)
            with torch.autocast(_BF16_DEVICE, dtype=torch.bfloat16):
                out = _plain(*args, **kwargs)
            return _to_float32(out)
        # Its own code object: TorchDynamo keeps compiled graphs, and counts them against its
        # recompile limit (8), per code object; one shared by every network's wrapper overflowed
        # during a run (grad and no-grad modes times each network's shapes) and left the rest eager.
        forward.__code__ = forward.__code__.replace()
        forward._bf16_wrapped = True
        net.forward = forward
    return names


#: What computes bf16 natively, per device type (``bf16_native``), as the run's message names it.
NATIVE_BF16 = {"cpu": "neither AVX512-BF16 nor AMX", "cuda": "compute capability below 8.0"}


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16 support; a CPU with AVX512-BF16 or
    AMX); elsewhere oneDNN emulates bf16, slower than float32."""
    return _bf16_native(str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _bf16_native(device: str) -> bool:
    if torch.device(device).type == "cuda":       # Ampere and later; older GPUs emulate bf16
        return torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a training loss runs in on ``device``: "auto" is "bf16" where it is native
    (``bf16_native``: 1.35-1.42x a K++ step on this package's AMX CPU, bounds at equal steps as in
    float32; README "Speed"), else "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return precision


def prepare(model: nn.Module, precision: str, compile: bool, device: torch.device,
            channels_last: bool = False) -> tuple[list[str], str | None]:
    """Apply the speed options to a model about to train (or evaluate): the channels-last layout,
    the bf16 wrappers, then compilation. Returns the compiled networks and what to tell the user
    (None: nothing)."""
    if channels_last:
        # 4-d weights (the convolutions') in NHWC: a convolution with a channels-last weight
        # computes and returns channels-last maps, so the layout carries through each network.
        model.to(memory_format=torch.channels_last)
    notes = []
    if resolve_precision(precision, device) == "bf16":
        autocast_networks(model)
        if precision == "auto":
            notes.append(f"precision auto: the networks train in bf16 ({device.type} computes it natively; "
                         f"--precision fp32 for float32); evaluation is float32")
        elif not bf16_native(device):
            notes.append(f"--precision bf16: this {device.type} has no native bf16 ({NATIVE_BF16[device.type]}), so "
                         f"it is emulated and slower than float32")
    elif precision == "auto":
        notes.append(f"precision auto: the networks train in float32 (this {device.type} has no native bf16: "
                     f"{NATIVE_BF16[device.type]}; --precision bf16 would emulate it, slower)")
    names = []
    if compile:
        names, reason = compile_networks(model, device)
        notes.append(f"compiled with torch.compile: {', '.join(names)}" if names else
                     f"--compile: torch.compile is unavailable here ({reason}); running eager")
    return names, "\n".join(notes) or None
