"""The benchmark's sections, each a list of jobs (one progress-bar tick each) and a summary.

Every timed figure a section reports is a ratio of alternated timings (``measure.alternate``):
a ratio of medians, or for the Pyro overhead and the CPU options the median of the per-round
ratios (with their range, to show the noise). Absolute times and images/s are kept in the JSON
for reference only. The ``dispatch`` section counts operators and host syncs: exact, untimed.
"""
from __future__ import annotations

import contextlib
import functools
import statistics
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import pyro
import torch

from pyro_kpp.bench import measure
from pyro_kpp.bench.reference import kpp_reference_loss
from pyro_kpp.bench.sizes import MODEL_NAMES, Bench, Sizes
from pyro_kpp.data.episodes import make_episodes, test_batches
from pyro_kpp.inference.bound import evaluate
from pyro_kpp.svi import train

PRESET_NAMES = ("paper", "recipe", "cpu")


@dataclass
class Context:
    sizes: Sizes
    data: object                      # pyro_kpp.data.ImageData (Omniglot)
    device: torch.device
    repeats: int
    budget: float                     # seconds of training per model in the quality section
    eval_episodes: int
    eval_samples: int = 100           # importance samples of the evaluation section
    eval_test_episodes: int | None = None   # its test episodes (None: all)
    quality_settings: str = "defaults"  # a key of SPEED_VARIANTS: "defaults" or "eager" (plain float32)


@dataclass
class Job:
    section: str
    key: str
    run: Callable[[Context], dict]


def _timed_models(ctx: Context, benches: dict[str, Bench]) -> dict:
    """Train-step time, eval-step time and peak memory of each bench, alternated across benches."""
    train = measure.alternate({k: b.train_step for k, b in benches.items()}, ctx.repeats, ctx.device)
    evals = measure.alternate({k: b.eval_step for k, b in benches.items()}, ctx.repeats, ctx.device)
    out = {}
    for k, b in benches.items():
        out[k] = {"train_step_s": train[k]["median"], "eval_step_s": evals[k]["median"],
                  "train_images_per_s": b.images / train[k]["median"],
                  "eval_images_per_s": b.images / evals[k]["median"],
                  "peak_memory_mb": measure.peak_memory(b.train_step, ctx.device) / 2 ** 20,
                  "images_per_step": b.images}
    return out


def _ratios(results: dict, base, key: str = "train_step_s") -> dict:
    return {k: v[key] / results[base][key] for k, v in results.items()}


# -- throughput: every model at each preset; the memory path: the same without the shared nets ----
def _throughput(preset: str, shared_nets: str = "conv"):
    def run(ctx: Context) -> dict:
        benches = {m: Bench.build(ctx.sizes.config(m, preset), ctx.data, ctx.device, shared_nets)
                   for m in MODEL_NAMES}
        models = _timed_models(ctx, benches)
        return {"models": models, "train_time_vs_kpp": _ratios(models, "kpp"),
                "eval_time_vs_kpp": _ratios(models, "kpp", "eval_step_s"),
                "memory_vs_kpp": _ratios(models, "kpp", "peak_memory_mb")}
    return run


# -- operators and host syncs per step (counted, not timed) --------------------------------------
def _dispatch(ctx: Context) -> dict:
    out = {}
    for m in MODEL_NAMES:
        b = Bench.build(ctx.sizes.config(m, "paper"), ctx.data, ctx.device)
        b.train_step()                                       # optimizer state exists: steady state
        operators, _ = measure.count_dispatched(b.forward_backward)
        _, syncs = measure.count_dispatched(b.train_step)
        out[m] = {"operators_loss_and_backward": operators, "host_syncs_train_step": syncs}
    return out


# -- CPU options: memory layout, denormals, oneDNN, threads; channels-last with compiled networks -----
@contextlib.contextmanager
def _flush_denormal():
    """Denormal floats flushed to zero inside (where the CPU supports it)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@contextlib.contextmanager
def _threads(n: int):
    """``n`` intra-op threads inside. (Inter-op threads are not an option here: they serve only
    graph-level parallelism, which an eager step never uses, and PyTorch fixes their number at the
    first parallel work of a process.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _under(context: Callable[[], contextlib.AbstractContextManager], step: Callable[[], None]):
    def run():
        with context():
            step()
    return run


#: The CPU options of the ``options`` section, each with the step it is timed against: the eager
#: float32 step, or for channels-last on top of compiled or bf16 networks, those alone (the issue's
#: "channels-last together with compile"). A ratio is (step time with the option) / (the other's):
#: below 1 is faster.
OPTIONS = {"channels_last": "eager", "flush_denormal": "eager", "mkldnn_off": "eager", "one_thread": "eager",
           "compile+channels_last": "compile", "bf16+channels_last": "bf16"}


def _options(ctx: Context) -> dict:
    benches = {}
    for name in ("eager", "channels_last", "compile", "compile+channels_last", "bf16", "bf16+channels_last"):
        variant = name.removesuffix("channels_last").rstrip("+") or "eager"
        cfg = ctx.sizes.config("kpp", **SPEED_VARIANTS[variant], channels_last=name.endswith("channels_last"))
        b = Bench.build(cfg, ctx.data, ctx.device)
        for _ in range(SPEED_WARMUP):
            b.train_step()                                   # compilation, untimed
        benches[name] = b
    eager = benches["eager"].train_step
    steps = measure.alternate({
        **{name: b.train_step for name, b in benches.items()},
        "flush_denormal": _under(_flush_denormal, eager),
        "mkldnn_off": _under(lambda: torch.backends.mkldnn.flags(enabled=False), eager),
        "one_thread": _under(lambda: _threads(1), eager)}, ctx.repeats, ctx.device)
    out = {}
    for k, versus in OPTIONS.items():
        ratios = _paired(steps, k, versus)
        out[k] = {"step_ratio": statistics.median(ratios), "step_ratio_range": [ratios[0], ratios[-1]],
                  "versus": versus, "seconds": steps[k]["median"]}
    return out


# -- Pyro overhead: Trace_ELBO step against the hand-written loss ---------------------------------
def _reference(b: Bench) -> Callable[[], torch.Tensor]:
    """The hand-written K++ loss of ``b``, with Pyro's validation (and so the input value checks)
    off, as in ``Bench.pyro_loss``."""
    def loss():
        with pyro.validation_enabled(False):
            return kpp_reference_loss(b.model, b.x)
    return loss


def _paired(steps: dict, num: str, den: str) -> list[float]:
    """Per-round ratios of two alternated timings, sorted: both calls of a round ran under the same load."""
    return sorted(x / y for x, y in zip(steps[num]["times"], steps[den]["times"]))


def _overhead(ctx: Context) -> dict:
    b = Bench.build(ctx.sizes.config("kpp"), ctx.data, ctx.device)
    ref = _reference(b)
    steps = measure.alternate({"pyro": b.train_step, "reference": lambda: b.step_with(ref),
                               "pyro_forward": lambda: b.pyro_loss().detach(),
                               "reference_forward": lambda: ref().detach()}, ctx.repeats, ctx.device)
    step = _paired(steps, "pyro", "reference")
    forward = _paired(steps, "pyro_forward", "reference_forward")
    return {"step_ratio": statistics.median(step), "forward_ratio": statistics.median(forward),
            "step_ratio_range": [step[0], step[-1]], "forward_ratio_range": [forward[0], forward[-1]],
            "seconds": {k: v["median"] for k, v in steps.items()}}


# -- scaling --------------------------------------------------------------------------------------
def _scaling(ctx: Context, configs: dict[str, object]) -> dict:
    """Median train-step time of each config, and its ratio to the first config of its model."""
    benches = {k: Bench.build(cfg, ctx.data, ctx.device) for k, cfg in configs.items()}
    timed = measure.alternate({k: b.train_step for k, b in benches.items()}, ctx.repeats, ctx.device)
    base: dict[str, tuple[float, int]] = {}                 # model -> (seconds, images) of its first config
    points = []
    for k, b in benches.items():
        cfg, t = b.model.cfg, timed[k]["median"]
        t0, n0 = base.setdefault(cfg.model, (t, b.images))
        points.append({"model": cfg.model, "key": k, "seconds": t, "ratio": t / t0,
                       "per_image_ratio": (t / b.images) / (t0 / n0), "memory_side": cfg.memory_shape[1],
                       "slots": cfg.slots, "T": cfg.episode_length})
    return {"points": points}


def _scale_area(ctx: Context) -> dict:
    window = ctx.sizes.config("kpp").window
    return _scaling(ctx, {f"kpp-{s}": ctx.sizes.config("kpp", memory_shape=(3, s, s), window=window)
                          for s in ctx.sizes.areas})


def _scale_slots(ctx: Context) -> dict:
    return _scaling(ctx, {f"{m}-{k}": ctx.sizes.config(m, slots=k) for m in ("km", "dkm") for k in ctx.sizes.slots})


def _scale_length(ctx: Context) -> dict:
    return _scaling(ctx, {f"{m}-{t}": ctx.sizes.config(m, episode_length=t)
                          for m in MODEL_NAMES for t in ctx.sizes.lengths})


# -- achieved FLOP/s against a measured matmul peak -----------------------------------------------
def _flops(ctx: Context) -> dict:
    b = Bench.build(ctx.sizes.config("kpp"), ctx.data, ctx.device)
    step_flops = measure.count_flops(b.forward_backward)
    mm, mm_flops = measure.matmul(ctx.sizes.matmul_size, ctx.device)
    timed = measure.alternate({"step": b.train_step, "matmul": mm}, ctx.repeats, ctx.device)
    achieved = step_flops / timed["step"]["median"]
    peak = mm_flops / timed["matmul"]["median"]
    return {"step_gflop": step_flops / 1e9, "achieved_gflops": achieved / 1e9, "matmul_peak_gflops": peak / 1e9,
            "matmul_size": ctx.sizes.matmul_size, "fraction_of_peak": achieved / peak,
            "threads": torch.get_num_threads()}


# -- speed options: compiled networks and bf16 autocast against the eager float32 step ------------
#: The variants of the speed section, as Config overrides (pyro_kpp.train.speed).
#: "defaults" is what ``pyro_kpp.svi`` runs with no speed option given (bf16 only where native).
SPEED_VARIANTS = {"eager": {}, "compile": {"compile": True}, "bf16": {"precision": "bf16"},
                  "compile+bf16": {"compile": True, "precision": "bf16"},
                  "defaults": {"precision": "auto", "channels_last": True}}
#: Untimed steps first: compilation, and the recompilation for the optimizer's first update.
SPEED_WARMUP = 3


def _speed_steps(ctx: Context, configs: dict[str, object]) -> dict:
    """Each config's train-step time, alternated, and its speed-up over the first config: the median and
    range of the per-round ratios (both steps of a round ran under the same load)."""
    benches = {k: Bench.build(cfg, ctx.data, ctx.device) for k, cfg in configs.items()}
    for b in benches.values():
        for _ in range(SPEED_WARMUP):
            b.train_step()
    steps = measure.alternate({k: b.train_step for k, b in benches.items()}, ctx.repeats, ctx.device)
    base = next(iter(benches))
    out = {}
    for k, b in benches.items():
        up = _paired(steps, base, k)
        out[k] = {"speedup": statistics.median(up), "speedup_range": [up[0], up[-1]], "seconds": steps[k]["median"],
                  "train_images_per_s": b.images / steps[k]["median"], "compiled": b.compiled,
                  "peak_memory_mb": measure.peak_memory(b.train_step, ctx.device) / 2 ** 20}
    return out


def _speed(model: str):
    def run(ctx: Context) -> dict:
        return {"device": str(ctx.device),
                "variants": _speed_steps(ctx, {k: ctx.sizes.config(model, **v) for k, v in SPEED_VARIANTS.items()})}
    return run


# -- a GPU's figures: K++ against DKM at the paper's sizes, eager and with the speed options --------
def _gpu(ctx: Context) -> dict:
    out = {}
    for preset in ("paper", "recipe"):
        configs = {f"{m} {k}": ctx.sizes.config(m, preset, **SPEED_VARIANTS[k])
                   for k in ("eager", "compile+bf16") for m in ("kpp", "dkm")}
        steps = _speed_steps(ctx, configs)
        out[preset] = {"steps": steps, "device": str(ctx.device),
                       "dkm_over_kpp": {k: steps[f"dkm {k}"]["seconds"] / steps[f"kpp {k}"]["seconds"]
                                        for k in ("eager", "compile+bf16")}}
    return out


# -- evaluation: the test split's bounds with S importance samples ----------------------------------
EVALUATION_VARIANTS = {"eager": {}, "channels_last": {"channels_last": True},
                       "channels_last+compile": {"channels_last": True, "compile": True}}


def _evaluation(ctx: Context) -> dict:
    """Wall time of ``pyro_kpp.inference.bound.evaluate`` (what ``python -m pyro_kpp.evaluate`` runs) over the
    test episodes with S samples, for an untrained K++ at the CPU defaults: in the plain layout, in
    the default channels-last layout (as ``pyro_kpp.evaluate`` runs a default run), and so with
    ``--compile``. Evaluation is float32 whatever the training precision."""
    out = {"samples": ctx.eval_samples, "device": str(ctx.device)}
    for k, layout in EVALUATION_VARIANTS.items():
        b = Bench.build(ctx.sizes.config("kpp", **layout), ctx.data, ctx.device)
        b.model.eval()
        episodes = make_episodes(b.model.cfg, ctx.data, ctx.device)
        n = min(ctx.eval_test_episodes or episodes.num_test_episodes(), episodes.num_test_episodes())
        # compilation, untimed: one batch through every shape the timed run takes
        evaluate(b.model, test_batches(episodes, b.model.cfg.batch_size), samples=ctx.eval_samples)
        result = {}
        timed = measure.alternate({k: lambda: result.update(evaluate(b.model, test_batches(episodes, n),
                                                                     samples=ctx.eval_samples))},
                                  repeats=1, device=ctx.device, warmup=0)
        out[k] = {"seconds": timed[k]["median"], "test_images": result["images"], "episodes": n}
    return out


# -- quality: the bound after a fixed training-time budget ------------------------------------------
def _quality(model: str):
    """The bound after ``ctx.budget`` seconds of ``pyro_kpp.svi`` training, with the package's
    defaults (bf16 where native and channels-last: the fastest settings the ``speed`` and
    ``options`` sections measured on our CPU) or, for ``--quality-settings eager``, the plain
    float32 step."""
    def run(ctx: Context) -> dict:
        settings = SPEED_VARIANTS[ctx.quality_settings]
        cfg = ctx.sizes.config(model, max_minutes=ctx.budget / 60, eval_episodes=ctx.eval_episodes,
                               device=str(ctx.device), **settings)
        with tempfile.TemporaryDirectory() as run_dir:
            history = train(cfg, run_dir, progress=False)
        last = history[-1]
        return {"test_bound": last["test_bound"], "steps": last["step"], "test_images": last["test_images"],
                "train_seconds": last["train_seconds_total"], "kl_scale": last["kl_scale"], "settings": settings,
                "curve": [{"train_seconds": h["train_seconds_total"], "step": h["step"], "test_bound": h["test_bound"]}
                          for h in history]}
    return run


def jobs(sections: list[str]) -> list[Job]:
    plan = {
        "throughput": [Job("throughput", p, _throughput(p)) for p in PRESET_NAMES],
        "memory_path": [Job("memory_path", "paper", _throughput("paper", shared_nets="linear"))],
        "dispatch": [Job("dispatch", "paper", _dispatch)],
        "options": [Job("options", "kpp", _options)],
        "overhead": [Job("overhead", "kpp", _overhead)],
        "scaling": [Job("scaling", "memory_area", _scale_area), Job("scaling", "slots", _scale_slots),
                    Job("scaling", "episode_length", _scale_length)],
        "flops": [Job("flops", "kpp", _flops)],
        "speed": [Job("speed", m, _speed(m)) for m in MODEL_NAMES],
        "evaluation": [Job("evaluation", "kpp", _evaluation)],
        "quality": [Job("quality", m, _quality(m)) for m in MODEL_NAMES],
        "gpu": [Job("gpu", "kpp-dkm", _gpu)],
    }
    return [job for s in sections for job in plan[s]]


SECTIONS = ("throughput", "memory_path", "dispatch", "options", "overhead", "scaling", "flops", "speed", "evaluation",
            "quality", "gpu")
#: Sections a plain ``python -m pyro_kpp.bench`` runs: all but the GPU's (``--sections gpu --device cuda``).
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "gpu")


@dataclass
class Target:
    name: str
    text: str
    value: float
    met: bool
    profile: dict = field(default_factory=dict)


def targets(results: dict) -> list[Target]:
    """The issue's speed targets, judged on what was measured (never asserted in tests)."""
    out = []
    if "throughput" in results:
        r = results["throughput"]["paper"]["train_time_vs_kpp"]["dkm"]
        out.append(Target("kpp_vs_dkm", "K++ training step >= 3x faster than DKM (paper sizes)", r, r >= 3))
    if "overhead" in results:
        r = results["overhead"]["kpp"]["step_ratio"]
        out.append(Target("pyro_overhead", "Trace_ELBO step <= 1.05x the hand-written loss", r, r <= 1.05))
    if "scaling" in results:
        r = results["scaling"]["memory_area"]["points"][-1]["ratio"]
        out.append(Target("memory_area", "K++ step <= 1.3x from the smallest to the largest memory", r, r <= 1.3))
    if "flops" in results:
        r = results["flops"]["kpp"]["fraction_of_peak"]
        out.append(Target("matmul_peak", "K++ step >= 35% of the measured matmul peak", r, r >= 0.35))
    if "speed" in results:
        r = results["speed"]["kpp"]["variants"]["compile"]["speedup"]
        out.append(Target("compile", "K++ training images/s compiled / eager >= 1.5x (CPU defaults)", r, r >= 1.5))
    if "evaluation" in results:
        r = min(results["evaluation"]["kpp"][k]["seconds"] for k in EVALUATION_VARIANTS)
        n = results["evaluation"]["kpp"]["eager"]["episodes"]
        out.append(Target("evaluation", f"K++ evaluation of {n} test episodes, S = "
                                        f"{results['evaluation']['kpp']['samples']}, <= 180 s", r, r <= 180))
    return out


def profiled_steps(target: str, ctx: Context) -> dict[str, Callable[[], None]]:
    """The training steps behind a missed target, warmed up, to run under torch.profiler:
    K++'s step, and beside it the step it is compared with (DKM's, the hand-written loss's)."""
    if target == "evaluation":
        return {}                                            # the evaluation's own profile: README
    if target == "memory_area":
        side = ctx.sizes.areas[-1]
        cfgs = {"kpp": ctx.sizes.config("kpp", memory_shape=(3, side, side))}
    elif target == "kpp_vs_dkm":
        cfgs = {m: ctx.sizes.config(m, "paper") for m in ("kpp", "dkm")}
    elif target == "compile":
        cfgs = {k: ctx.sizes.config("kpp", **SPEED_VARIANTS[k]) for k in ("eager", "compile")}
    else:
        cfgs = {"kpp": ctx.sizes.config("kpp")}
    steps = {}
    for name, cfg in cfgs.items():
        b = Bench.build(cfg, ctx.data, ctx.device)
        steps[name] = b.train_step
        if target == "pyro_overhead":
            steps["reference"] = functools.partial(b.step_with, _reference(b))
    for step in steps.values():
        for _ in range(SPEED_WARMUP):
            step()                                           # warm-up (and compilation) outside the profile
    return steps
