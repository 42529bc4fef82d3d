"""Measuring tools: alternating step timers, peak memory, FLOP counts, matmul peak, profiles,
operator and host-sync counts.

Timing on shared, noisy machines: every compared function runs once per round, in a rotated
order, for ``repeats`` rounds after a warm-up call each, and the median is kept. A burst of
load from another process then hits every contender alike, and only ratios of medians are
reported as results.

Peak memory (choice): on CUDA, ``torch.cuda.max_memory_allocated`` above the memory allocated
before the step. On the CPU the process's resident set is useless for this (glibc keeps freed
pages, ``ru_maxrss`` only ever grows, and tracemalloc does not see torch's allocator), so we
run the step under ``torch.profiler`` with ``profile_memory=True`` and replay its allocation
events in time order: the peak of torch-allocated bytes above the step's start (activations,
gradients, temporaries; the parameters and optimizer state allocated before are excluded).
"""
from __future__ import annotations

import collections
import contextlib
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
              warmup: int = 1) -> dict[str, dict]:
    """Median seconds per call of each function, timed in alternation: {name: {median, times}}."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(t), "times": t} for name, t in times.items()}


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by torch during ``fn()`` above what was allocated before (see module doc)."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                   if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in sizes:                 # allocations are positive, frees negative
        current += nbytes
        peak = max(peak, current)
    return peak


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls and convolutions that ``fn()`` runs (``FlopCounterMode``)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul(n: int, device: torch.device) -> tuple[Callable[[], object], int]:
    """A float32 n x n by n x n matmul and its FLOP count 2 n^3: the machine's peak yardstick."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return (lambda: torch.mm(a, b)), 2 * n ** 3


def profile_table(fn: Callable[[], object], steps: int = 3, rows: int = 25) -> tuple[str, list[dict]]:
    """torch.profiler over ``steps`` calls: the operator table by self CPU time, and its top rows."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return table, [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
                   for e in top]


# -- host syncs ---------------------------------------------------------------------------------
_PROJECT = Path(__file__).resolve().parents[2]          # the checkout: pyro_kpp/, models/, guides/
_TORCH_INTERNALS = ("_dynamo", "_compile.py", "overrides.py", "_tensor.py", "utils")


def _sync_origin(stack: list[traceback.FrameSummary]) -> str:
    """Who asked for a value: "torch.optim", "torch.distributions", "pyro" (any installed package
    by its name), "pyro_kpp:<file>:<line>" for this project's code, or "other"."""
    for frame in reversed(stack):                        # innermost first
        parts = Path(frame.filename).parts
        if "site-packages" in parts:
            package = parts[parts.index("site-packages") + 1:]
            if package[0] == "torch" and package[1] in _TORCH_INTERNALS:
                continue
            return ".".join(package[:2]) if package[0] == "torch" else package[0]
        path = Path(frame.filename).resolve()
        if _PROJECT in path.parents and "bench" not in path.parts:
            return f"pyro_kpp:{path.relative_to(_PROJECT)}:{frame.lineno}"
    return "other"


_NOT_COMPUTE = (torch.ops.aten.detach, torch.ops.aten.lift_fresh, torch.ops.aten._local_scalar_dense)


class _Dispatched(TorchDispatchMode):
    """Counts the operators that compute (views excluded) and the host reads by origin."""

    def __init__(self):
        super().__init__()
        self.operators = 0
        self.host_syncs: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:          # .item(), bool(t), ...
            self.host_syncs[_sync_origin(traceback.extract_stack()[:-1])] += 1
        elif not func.is_view and func.overloadpacket not in _NOT_COMPUTE:
            self.operators += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _counting_tolist(counter: collections.Counter):
    """``Tensor.tolist`` reads values without dispatching an operator on the CPU: count it here."""
    original = torch.Tensor.tolist

    def tolist(self):
        counter[_sync_origin(traceback.extract_stack()[:-1])] += 1
        return original(self)
    torch.Tensor.tolist = tolist
    try:
        yield
    finally:
        torch.Tensor.tolist = original


def count_dispatched(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """(operators, host syncs by origin) of one call ``fn()``.

    Operators: the ATen operators that compute something (views, detach and value reads are
    not counted), run in the calling thread, the backward pass included on the CPU. On a GPU
    each is at least one kernel launch, so the count bounds a step's launch overhead from
    below; torch.optim's foreach ops count per tensor here, as the CPU runs them.

    Host syncs: reads of tensor values by the host (``aten::_local_scalar_dense``: each
    ``.item()``, ``bool(tensor)``; and each ``.tolist()``), by origin (``_sync_origin``). On a GPU each
    waits for the device to finish its queue, except for tensors kept on the host, such as
    torch.optim's step counters.
    """
    with _Dispatched() as mode, _counting_tolist(mode.host_syncs):
        fn()
    return mode.operators, dict(mode.host_syncs)
