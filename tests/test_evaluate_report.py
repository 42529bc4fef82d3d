"""What evaluate tells a user besides the bounds: Pareto-k of its importance weights, and its defaults."""
from __future__ import annotations

import numpy as np
import pytest

from pyro_kpp import evaluate as evaluate_cli


def test_evaluate_reports_pareto_k(tiny_run, capsys):
    assert evaluate_cli.main([str(tiny_run), "--samples", "21", "--episodes", "2"]) == 0
    out = capsys.readouterr()
    line = next(l for l in out.out.splitlines() if l.startswith("Pareto k of the importance weights"))
    assert "of 8 images" in line
    result = evaluate_cli.evaluate_run(str(tiny_run), samples=21, max_episodes=1, progress=False)
    assert result["pareto_k"]["images"] == 4 and result["pareto_k"]["max"] >= result["pareto_k"]["median"]
    assert np.isfinite(result["pareto_k"]["max"])                 # a real fit, not ArviZ's "too few" inf
    assert evaluate_cli.evaluate_run(str(tiny_run), samples=20, max_episodes=1, progress=False)["pareto_k"] is None


def test_unreliable_iw_bound_is_a_warning_and_few_samples_are_not_fitted():
    summary = evaluate_cli.pareto_summary(np.array([0.2, 0.6, 0.9, 1.1]))
    assert summary["over_0.7"] == 2 and summary["over_0.5"] == 3
    lines = evaluate_cli.pareto_lines(summary)
    assert lines[1].startswith("warning: Pareto k > 0.7 for 2 of 4 images")
    assert len(evaluate_cli.pareto_lines(evaluate_cli.pareto_summary(np.array([0.1, 0.3])))) == 1
    assert "not fitted" in evaluate_cli.pareto_lines(None)[0]


def test_evaluate_help_shows_its_defaults(capsys):
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "importance samples per image (default: 100)" in text and "(default: auto)" in text


def test_progress_counts_every_image_particle():
    """The bar's total is what evaluate draws: S per image, and the gain's paired particles in
    batches of two episodes or more (a lone episode has none)."""
    import torch
    from helpers import tiny_config
    from pyro_kpp.inference.bound import PARTICLE_CHUNK, evaluate
    from pyro_kpp.models import build_model

    model = build_model(tiny_config())
    x = torch.bernoulli(torch.full((4, 4, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    for samples in (2, 6, 40):
        ticks = []
        evaluate(model, [x[:3], x[3:]], samples=samples, tick=ticks.append)
        assert sum(ticks) == evaluate_cli.particle_total(4, 3, 4, samples)
        assert max(ticks) <= PARTICLE_CHUNK * 3 * 4                # one pass: PARTICLE_CHUNK particles at most


def test_compiled_evaluation_gives_the_same_bounds(tiny_run):
    from pyro_kpp.train import speed
    import torch
    if (reason := speed.compile_unavailable(torch.device("cpu"))) is not None:
        pytest.skip(f"torch.compile unavailable: {reason}")
    eager = evaluate_cli.evaluate_run(str(tiny_run), samples=3, max_episodes=4, progress=False)
    compiled = evaluate_cli.evaluate_run(str(tiny_run), samples=3, max_episodes=4, progress=False, compile=True)
    for key in ("test_bound", "test_iw_bound", "memory_gain", "read_nll"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-2), key
