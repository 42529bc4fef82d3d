"""Posterior draws, KL terms, InferenceData, Pareto-k and read-window drawing (pyro_kpp.inference.posterior)."""
from __future__ import annotations

import warnings

import matplotlib.pyplot as plt  # the Agg backend: conftest sets MPLBACKEND
import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pyro_kpp.inference import posterior as I
from pyro_kpp.inference.bound import log_weights
from pyro_kpp.maths.spatial import SpatialTransformerRead, exact_window_keys
from pyro_kpp.models import MODELS, build_model

from helpers import tiny_config

warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")


@pytest.fixture(scope="module")
def draws(model, episode):
    return I.posterior_draws(model, episode, samples=8, seed=3)


def test_draws_shapes_and_weights_agree_with_the_bound(model, episode, draws):
    assert {k: tuple(v.shape) for k, v in draws.samples.items()} == {"keys": (8, 2, 4, 2, 3), "z": (8, 2, 4, 8)}
    assert {k: tuple(v.shape) for k, v in draws.kl.items()} == {"keys": (2, 4), "z": (2, 4)}
    torch.manual_seed(3)                                          # the same draws as posterior_draws(seed=3)
    assert torch.allclose(draws.log_weights, log_weights(model, episode, samples=8, chunk=8), atol=1e-4)


@torch.no_grad()
def test_kl_terms_match_closed_forms(model, episode, draws):
    E = model.embed(episode)
    key_loc, key_scale = model.q.key_posterior(E)                 # (B, T, K, 3)
    kl_keys = kl_divergence(Normal(key_loc, key_scale), Normal(0.0, 1.0)).sum((-2, -1))
    assert torch.allclose(draws.kl["keys"], kl_keys, atol=1e-4)
    # E_q(y)[KL(q(z|X) || p(z|M, y))] over the same 8 key draws.
    z_loc, z_scale = model.q.code_head(E)                         # (B, T, L)
    p_loc, p_scale = model.code_prior(model.write(episode).value, draws.samples["keys"])  # (S, B, T, L)
    kl_z = kl_divergence(Normal(z_loc, z_scale), Normal(p_loc, p_scale)).sum(-1).mean(0)
    assert torch.allclose(draws.kl["z"], kl_z, atol=1e-4)
    rows = I.kl_table(draws, episode=1)
    assert [r["image"] for r in rows] == [0, 1, 2, 3]
    assert rows[2]["total"] == pytest.approx(float(kl_keys[1, 2] + kl_z[1, 2]), abs=1e-4)


def test_inference_data_dims(draws):
    idata = I.to_inference_data(draws, episode=1, event_dims={"keys": ["read", "component"]},
                                coords={"component": ["s", "x", "y"]})
    keys = idata.posterior["keys"]
    assert keys.dims == ("chain", "draw", "image", "read", "component")
    assert keys.shape == (1, 8, 4, 2, 3)
    assert list(keys.coords["component"].values) == ["s", "x", "y"]
    np.testing.assert_allclose(keys.values[0], draws.samples["keys"][:, 1].numpy())
    assert idata.posterior["z"].dims == ("chain", "draw", "image", "z_dim_0")
    assert idata.sample_stats["log_weight"].dims == ("chain", "draw", "image")
    np.testing.assert_allclose(idata.sample_stats["log_weight"].values[0], draws.log_weights[:, 1].numpy())
    with pytest.raises(ValueError, match="episode"):
        I.to_inference_data(draws, episode=2)
    with pytest.raises(ValueError, match="event_dims"):
        I.to_inference_data(draws, event_dims={"keys": ["read"]})


def test_pareto_k_separates_light_and_heavy_tailed_weights():
    g = torch.Generator().manual_seed(0)
    light = 0.1 * torch.randn(2000, 1, 1, generator=g)            # nearly equal weights
    u = torch.rand(2000, 1, 1, generator=g)
    heavy = -torch.log(u) / 1.25                                  # weights Pareto with tail index 1.25: k = 0.8
    k = I.pareto_k(torch.cat([light, heavy], dim=2))
    assert k.shape == (1, 2)
    assert k[0, 0] < 0.5 and k[0, 1] > 0.65


@pytest.mark.parametrize("top,left", [(0, 0), (3, 5), (8, 8), (0, 8)])
def test_window_rectangle_is_where_the_key_reads(top, left):
    key = exact_window_keys(top, left, (8, 8), (16, 16))
    rect = I.window_rectangles(key, (16, 16))
    assert torch.allclose(rect, torch.tensor([left, top, 8.0, 8.0]), atol=1e-4)
    # The reader returns exactly the memory under the rectangle.
    memory = torch.randn(1, 3, 16, 16)
    window = SpatialTransformerRead((8, 8))(memory, key.view(1, 1, 1, 3))[0, 0, 0]
    l, t, w, h = (round(v) for v in rect.tolist())
    assert torch.allclose(window, memory[0, :, t:t + h, l:l + w], atol=1e-5)


def test_draw_windows_places_patches_on_pixel_edges():
    fig, ax = plt.subplots()
    ax.imshow(np.zeros((16, 16)))
    keys = torch.stack([exact_window_keys(3, 5, (8, 8), (16, 16)), exact_window_keys(0, 0, (8, 8), (16, 16))])
    keys[1, 0] = -keys[1, 0]                                      # mirrored: same rectangle, dashed
    p = I.draw_windows(ax, keys, (16, 16))
    assert p[0].get_xy() == pytest.approx((4.5, 2.5), abs=1e-4)
    assert (p[0].get_width(), p[0].get_height()) == pytest.approx((8, 8), abs=1e-4)
    assert p[1].get_xy() == pytest.approx((-0.5, -0.5), abs=1e-4)
    assert p[0].get_linestyle() == "-" and p[1].get_linestyle() == "--"
    plt.close(fig)


def test_memory_plots(model, episode):
    memory = model.write(episode)
    keys = model.infer_keys(episode)[0]                           # (T, K, 3)
    fig = I.plot_memory(memory, keys)
    panels = [ax for ax in fig.axes if ax.images and ax.get_title().startswith("channel")]
    assert len(panels) == 3 and all(len(ax.patches) == 4 * 2 for ax in panels)
    plt.close(fig)
    fig = I.plot_image_windows(memory, keys[:3], episode[0, :3])
    assert len(fig.axes) == 6 and len(fig.axes[1].patches) == 2
    plt.close(fig)
    with pytest.raises(ValueError, match="keys: expected keys for the 2 images"):
        I.plot_image_windows(memory, keys, episode[0, :2])
    with pytest.raises(ValueError, match="block memory"):
        I.plot_memory((torch.zeros(2, 3), torch.zeros(3)))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_models_draws_share_the_bounds_weights(name, episode):
    torch.manual_seed(0)
    model = build_model(tiny_config(model=name)).eval()
    draws = I.posterior_draws(model, episode, samples=4, seed=1)
    assert draws.samples and all(v.shape[:3] == (4, 2, 4) for v in draws.samples.values())
    assert set(draws.samples) <= set(draws.kl) and all(v.shape == (2, 4) for v in draws.kl.values())
    torch.manual_seed(1)
    assert torch.allclose(draws.log_weights, log_weights(model, episode, samples=4, chunk=4), atol=1e-3)
    idata = I.to_inference_data(draws)
    assert set(idata.posterior.data_vars) == set(draws.samples)
