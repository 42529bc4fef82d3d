"""Measuring tools: alternating step timers, peak memory, FLOP counts, matmul peak, profiles.

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

import statistics
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile
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
