"""Noise functions (their statistics), the denoising scores (recomputed by hand) and the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_kpp import denoise as D
from pyro_kpp.data import noise as N
from pyro_kpp.models import build_model
from pyro_kpp.reading.iterative import iterative_read

from helpers import tiny_config


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def binomial_tol(p, n):
    """4 standard deviations of a fraction of n Bernoulli(p) draws."""
    return 4 * math.sqrt(p * (1 - p) / n)


def test_salt_and_pepper_replaces_a_fraction_amount_of_pixels():
    grey = torch.full((100, 1, 28, 28), 0.5)
    out = N.salt_and_pepper(grey, 0.2, gen())
    replaced = out != 0.5
    n = grey.numel()
    assert abs(replaced.float().mean().item() - 0.2) < binomial_tol(0.2, n)
    assert abs((out[replaced] == 1).float().mean().item() - 0.5) < binomial_tol(0.5, int(replaced.sum()))
    # On a binary image about amount / 2 of the pixels flip.
    binary = torch.bernoulli(torch.full((100, 1, 28, 28), 0.3), generator=gen(1))
    flipped = (N.salt_and_pepper(binary, 0.2, gen(2)) != binary).float().mean().item()
    assert abs(flipped - 0.1) < binomial_tol(0.1, n)


def test_speckle_is_multiplicative():
    grey = torch.zeros(50, 1, 28, 28)
    grey[:, :, ::2] = 0.5
    out = N.speckle(grey, 0.2, gen())
    assert torch.equal(out[grey == 0], grey[grey == 0])          # no signal, no noise
    rel = (out[grey == 0.5] - 0.5) / 0.5                          # = n ~ N(0, 0.2^2), no clipping at 0.5 +- 5 std
    assert abs(rel.std().item() - 0.2) < 0.005 and abs(rel.mean().item()) < 0.005


def test_poisson_noise_has_poisson_counts():
    grey = torch.full((100, 1, 28, 28), 0.25)
    out = N.poisson(grey, 8.0, gen())                            # counts ~ Poisson(2)
    counts = out * 8
    assert torch.equal(counts, counts.round())
    assert abs(counts.mean().item() - 2) < 0.03 and abs(counts.var().item() - 2) < 0.06
    assert torch.equal(N.poisson(torch.zeros(2, 1, 4, 4), 1.0, gen()), torch.zeros(2, 1, 4, 4))


def test_blocks_are_size_by_size_squares_inside_the_image():
    x = torch.zeros(20, 1, 28, 28)
    out = N.blocks(x, 1, gen())
    for img in out[:, 0]:
        rows, cols = torch.nonzero(img == 1, as_tuple=True)
        assert len(rows) == 144
        assert rows.max() - rows.min() == 11 and cols.max() - cols.min() == 11
    two = N.blocks(x, 2, gen(), size=5, fill=0.5)
    covered = (two == 0.5).flatten(1).sum(1)
    assert bool(((covered >= 25) & (covered <= 50)).all()) and bool((covered > 25).any())
    with pytest.raises(ValueError, match="size"):
        N.blocks(x, 1, size=29)


def test_noise_arguments_are_checked():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="amount"):
        N.salt_and_pepper(x, 1.5)
    with pytest.raises(ValueError, match="peak"):
        N.poisson(x, 0.0)
    with pytest.raises(ValueError, match="grey levels in \\[0, 1\\]"):
        N.speckle(x + 2, 0.1)
    with pytest.raises(ValueError, match="noise: expected one of"):
        N.corrupt(x, "gaussian")


def test_binarize_pair_shares_the_uniforms():
    grey = torch.rand(50, 1, 28, 28, generator=gen())
    clean, same = N.binarize_pair(grey, grey, gen(1))
    assert torch.equal(clean, same)                               # zero noise: nothing changes
    assert abs(clean.mean().item() - grey.mean().item()) < 0.01
    clean2, noisy = N.binarize_pair(grey, N.salt_and_pepper(grey, 0.1, gen(2)), gen(1))
    assert torch.equal(clean2, clean)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config()).eval()


def test_scores_match_a_hand_computation(model):
    grey = torch.rand(2, 4, 1, 28, 28, generator=gen(3)) ** 4
    clean, noisy = D.corrupt_episodes(model, grey, "salt-and-pepper", 0.2, gen(4))
    reading = D.denoise_episodes(model, clean, noisy, steps=3, generator=gen(5))
    scores = D.DenoiseScores(3)
    scores.add(model, reading, clean, noisy)
    summary = scores.summary()
    assert summary["images"] == 8 and len(summary["steps"]) == 3
    logits = reading.params.double().numpy()                      # (3, 2, 4, 1, 28, 28)
    c = clean.double().numpy()
    log_sig = -np.logaddexp(0, -logits)                           # ln sigmoid(l)
    log_one_minus = -np.logaddexp(0, logits)                      # ln (1 - sigmoid(l))
    ll = (c * log_sig + (1 - c) * log_one_minus).sum(axis=(3, 4, 5)).mean(axis=(1, 2))
    wrong = ((logits > 0) != (c > 0.5)).mean(axis=(3, 4, 5)).mean(axis=(1, 2))
    for i, s in enumerate(summary["steps"]):
        assert s["step"] == i + 1
        assert s["log_likelihood"] == pytest.approx(ll[i], rel=1e-5)
        assert s["pixel_error"] == pytest.approx(wrong[i], rel=1e-6)
    assert summary["noisy_pixel_error"] == pytest.approx((noisy != clean).double().mean().item(), rel=1e-6)


def test_memory_is_written_from_the_noisy_or_the_clean_episode(model):
    grey = torch.rand(2, 4, 1, 28, 28, generator=gen(6))
    clean, noisy = D.corrupt_episodes(model, grey, "blocks", 2, gen(7))
    assert not torch.equal(clean, noisy)
    for source, written in [("noisy", noisy), ("clean", clean)]:
        got = D.denoise_episodes(model, clean, noisy, 2, write_from=source, feedback="threshold")
        want = iterative_read(model, model.write(written), noisy, 2, feedback="threshold")
        assert torch.equal(got.params, want.params)
    with pytest.raises(ValueError, match="write_from"):
        D.denoise_episodes(model, clean, noisy, 2, write_from="both")


def test_evaluate_denoising_rows(model):
    grey = torch.rand(2, 4, 1, 28, 28, generator=gen(8))
    summary, rows, labels = D.evaluate_denoising(model, [grey, grey], "speckle", 0.5, steps=2, generator=gen(9),
                                                 show=3)
    assert summary["images"] == 16
    assert labels == ["clean", "noisy", "step 1", "step 2"]
    assert [tuple(r.shape) for r in rows] == [(3, 1, 28, 28)] * 4


def test_denoise_cli(tiny_run, tmp_path, capsys):
    out = tmp_path / "denoise.png"
    argv = [str(tiny_run), "--noise", "poisson", "--level", "1", "--steps", "2", "--episodes", "2",
            "--out", str(out), "--show", "4"]
    assert D.main(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["noise"] == "poisson" and result["peak"] == 1.0 and result["write_from"] == "noisy"
    assert result["images"] == 2 * 4 and [s["step"] for s in result["steps"]] == [1, 2]
    assert all(s["log_likelihood"] < 0 and 0 <= s["pixel_error"] <= 1 for s in result["steps"])
    with Image.open(out) as im:
        assert im.size[1] > im.size[0] / 2                        # 4 rows of 4 images and their labels
    assert D.main(argv) == 0
    text = capsys.readouterr().out
    assert "log p(clean | recon.)" in text and "noisy" in text
    with pytest.raises(SystemExit):
        D.main([str(tiny_run), "--noise", "poisson", "--steps", "0"])
    assert "--steps: expected a positive integer" in capsys.readouterr().err
