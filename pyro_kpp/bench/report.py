"""The benchmark's outputs: the printed table of ratios and the PNG plots."""
from __future__ import annotations

from pathlib import Path

from pyro_kpp.bench.sizes import MODEL_NAMES


#: What ``--quick`` prints instead of a target's verdict, and above the table.
QUICK_VERDICT = "not judged (--quick)"
QUICK_NOTE = ("--quick: tiny sizes and few repeats check the code paths, not the targets, which apply to the full "
              "sizes only (run without --quick for a verdict)")


def table_rows(results: dict, targets: list, quick: bool = False) -> list[tuple[str, str, str]]:
    """(section, measurement, value) rows: ratios first, absolute figures only where no ratio exists.
    ``quick``: the targets' values without a verdict (``QUICK_VERDICT``): a ratio measured at the
    tiny sizes says nothing about the target, so neither MET nor NOT MET would be true."""
    rows = []
    for section in ("throughput", "memory_path"):
        for preset, r in results.get(section, {}).items():
            for m in MODEL_NAMES:
                v = r["models"][m]
                rows.append((section, f"{preset} {m}: train / eval step time vs kpp, memory vs kpp",
                             f"{r['train_time_vs_kpp'][m]:.2f}x / {r['eval_time_vs_kpp'][m]:.2f}x, "
                             f"{r['memory_vs_kpp'][m]:.2f}x ({v['train_images_per_s']:.0f} train img/s, "
                             f"{v['peak_memory_mb']:.0f} MB)"))
    for m, r in results.get("dispatch", {}).get("paper", {}).items():
        syncs = r["host_syncs_train_step"]
        ours = sum(n for k, n in syncs.items() if k.startswith("pyro_kpp"))
        rows.append(("dispatch", f"paper {m}: operators per loss+backward; host syncs per step "
                                 f"(pyro_kpp / pyro / torch.optim host counters)",
                     f"{r['operators_loss_and_backward']}; {ours} / {syncs.get('pyro', 0)} / "
                     f"{syncs.get('torch.optim', 0)}"))
    for option, r in results.get("options", {}).get("kpp", {}).items():
        lo, hi = r["step_ratio_range"]
        rows.append(("options", f"cpu kpp: train step time with {option} / {r['versus']} (range of rounds)",
                     f"{r['step_ratio']:.3f}x ({lo:.2f}-{hi:.2f})"))
    if "overhead" in results:
        r = results["overhead"]["kpp"]
        lo, hi = r["step_ratio_range"]
        rows.append(("overhead", "K++ Trace_ELBO / hand-written: train step (range), forward",
                     f"{r['step_ratio']:.3f}x ({lo:.2f}-{hi:.2f}), {r['forward_ratio']:.3f}x"))
    for axis, r in results.get("scaling", {}).items():
        label = {"memory_area": "memory_side", "slots": "slots", "episode_length": "T"}[axis]
        by_model: dict[str, list[str]] = {}
        for p in r["points"]:
            by_model.setdefault(p["model"], []).append(f"{p[label]}:{p['ratio']:.2f}")
        for m, pts in by_model.items():
            rows.append(("scaling", f"{m} step time vs {label} (ratio to first)", " ".join(pts)))
    if "flops" in results:
        r = results["flops"]["kpp"]
        rows.append(("flops", "K++ step achieved / matmul peak",
                     f"{r['fraction_of_peak']:.1%} ({r['achieved_gflops']:.1f} / {r['matmul_peak_gflops']:.1f} "
                     f"GFLOP/s, {r['threads']} threads)"))
    for m, section in results.get("speed", {}).items():
        for k, r in section["variants"].items():
            if k != "eager":
                lo, hi = r["speedup_range"]
                note = ", compile unavailable: eager" if "compile" in k and not r["compiled"] else ""
                rows.append(("speed", f"{section['device']} {m}: train images/s with {k} / eager (range of rounds)",
                             f"{r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}; {r['train_images_per_s']:.0f} img/s{note})"))
    if "evaluation" in results:
        r = results["evaluation"]["kpp"]
        for k in (k for k in r if isinstance(r[k], dict)):
            rows.append(("evaluation", f"kpp, {k}: {r[k]['episodes']} test episodes ({r[k]['test_images']} images), "
                                       f"S = {r['samples']}", f"{r[k]['seconds']:.1f} s"))
    for preset, r in results.get("gpu", {}).get("kpp-dkm", {}).items():
        for k, ratio in r["dkm_over_kpp"].items():
            kpp = r["steps"][f"kpp {k}"]
            rows.append(("gpu", f"{preset} sizes on {r['device']}, {k}: DKM / K++ step time; K++ images/s, "
                                f"peak memory", f"{ratio:.2f}x; {kpp['train_images_per_s']:.0f} img/s, "
                                                f"{kpp['peak_memory_mb']:.0f} MB"))
    for m, r in results.get("quality", {}).items():
        rows.append(("quality", f"{m}: test bound after {r['train_seconds']:.0f} s ({r['steps']} steps)",
                     f"{r['test_bound']:.2f} nats/image"))
    for t in targets:
        verdict = QUICK_VERDICT if quick else "MET" if t.met else "NOT MET"
        rows.append(("target", t.text, f"{t.value:.3f} {verdict}"))
    return rows


def format_table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(2)] if rows else [0, 0]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows)


def write_plots(results: dict, out: Path) -> list[Path]:
    """One PNG per measured section with something to plot; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    groups = {preset: r["train_time_vs_kpp"] for preset, r in results.get("throughput", {}).items()}
    groups.update({f"{preset}, linear shared nets": r["train_time_vs_kpp"]
                   for preset, r in results.get("memory_path", {}).items()})
    if groups:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(groups)
        for i, (label, ratios) in enumerate(groups.items()):
            ax.bar([j + i * width for j in range(len(MODEL_NAMES))], [ratios[m] for m in MODEL_NAMES],
                   width, label=label)
        ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(MODEL_NAMES))], MODEL_NAMES)
        ax.set_ylabel("train step time / K++'s")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(groups), fontsize=8)
        save(fig, "throughput.png")
    axes = {"memory_area": ("memory_side", "memory side H = W"), "slots": ("slots", "slots"),
            "episode_length": ("T", "episode length T")}
    for axis, r in results.get("scaling", {}).items():
        key, label = axes[axis]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in dict.fromkeys(p["model"] for p in r["points"]):
            pts = [p for p in r["points"] if p["model"] == m]
            ax.plot([p[key] for p in pts], [p["ratio"] for p in pts], "o-", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("step time / first point's")
        ax.legend()
        save(fig, f"scaling_{axis}.png")
    if "quality" in results:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, r in results["quality"].items():
            curve = r["curve"]
            ax.plot([p["train_seconds"] / 60 for p in curve], [p["test_bound"] for p in curve], "o-", ms=3,
                    label=f"{m}: {r['test_bound']:.1f}")
        ax.set_xlabel("training time (minutes, evaluation excluded)")
        ax.set_ylabel("test -ELBO (nats/image), lower is better")
        ax.legend(title="model: final bound")
        save(fig, "quality.png")
    return written
