"""f_ST: spatial-transformer reads from the block memory (K++ §3.4, Appendix A)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pyro_kpp.maths.spatial import SpatialTransformerRead, exact_window_keys, key_to_theta


def test_exact_keys_read_the_same_block_as_slicing():
    torch.manual_seed(0)
    memory = torch.randn(3, 2, 32, 32)                                # (B, C, H, W)
    reader = SpatialTransformerRead((8, 8))
    offsets = [[(0, 0), (24, 24)], [(3, 17), (10, 5)], [(24, 0), (16, 16)]]   # (B, K) (top, left)
    keys = torch.stack([torch.stack([exact_window_keys(t, l, (8, 8), (32, 32)) for t, l in row])
                        for row in offsets]).unsqueeze(1)             # (B, T=1, K=2, 3)
    windows = reader(memory, keys)                                    # (B, 1, 2, C, 8, 8)
    assert windows.shape == (3, 1, 2, 2, 8, 8)
    for b, row in enumerate(offsets):
        for k, (top, left) in enumerate(row):
            torch.testing.assert_close(windows[b, 0, k], memory[b, :, top:top + 8, left:left + 8],
                                       atol=1e-5, rtol=0)


def test_leading_sample_dims_read_each_episode_own_memory():
    torch.manual_seed(1)
    memory = torch.randn(2, 3, 16, 16)
    reader = SpatialTransformerRead((4, 4))
    keys = torch.randn(5, 2, 3, 2, 3)                                 # (S, B, T, K, 3)
    out = reader(memory, keys)
    assert out.shape == (5, 2, 3, 2, 3, 4, 4)
    # Reference: one affine_grid/grid_sample per window, straight from the definition.
    s, b, t, k = 4, 1, 2, 0
    theta = key_to_theta(keys[s, b, t, k]).unsqueeze(0)
    grid = F.affine_grid(theta, [1, 3, 4, 4], align_corners=False)
    ref = F.grid_sample(memory[b:b + 1], grid, align_corners=False)[0]
    torch.testing.assert_close(out[s, b, t, k], ref)


def test_one_sampling_call_over_the_memory_itself(monkeypatch):
    """All T*K windows of all episodes come from one grid_sample on the memory, no copies."""
    memory = torch.randn(2, 3, 16, 16)
    calls = []
    real = F.grid_sample

    def spy(inp, grid, **kw):
        calls.append((inp.data_ptr(), tuple(inp.shape)))
        return real(inp, grid, **kw)

    monkeypatch.setattr(F, "grid_sample", spy)
    SpatialTransformerRead((4, 4))(memory, torch.randn(2, 6, 2, 3))
    assert calls == [(memory.data_ptr(), (2, 3, 16, 16))]


def test_gradient_reaches_only_cells_under_the_windows():
    torch.manual_seed(2)
    H = W = 32
    memory = torch.randn(1, 2, H, W, requires_grad=True)
    keys = torch.randn(1, 2, 2, 3) * 0.7                               # arbitrary, unaligned windows
    windows = SpatialTransformerRead((4, 4))(memory, keys)
    (windows * torch.randn_like(windows)).sum().backward()
    grad_support = memory.grad.abs().sum(1)[0] > 0                    # (H, W)

    # Brute force: the bilinear taps of every sampling point (pixel coords, align_corners=False).
    theta = key_to_theta(keys.reshape(-1, 3))
    grid = F.affine_grid(theta, [theta.shape[0], 1, 4, 4], align_corners=False).reshape(-1, 2)
    px = ((grid[:, 0] + 1) * W - 1) / 2
    py = ((grid[:, 1] + 1) * H - 1) / 2
    touched = torch.zeros(H, W, dtype=torch.bool)
    for x, y in zip(px.tolist(), py.tolist()):
        for yy in (math.floor(y), math.floor(y) + 1):
            for xx in (math.floor(x), math.floor(x) + 1):
                if 0 <= yy < H and 0 <= xx < W:
                    touched[yy, xx] = True
    assert grad_support.any()
    assert not (grad_support & ~touched).any(), "gradient reached a cell no window touches"
    assert (~touched).sum() > H * W // 2, "test needs windows that leave most of the memory untouched"


def test_exact_window_gradient_is_exactly_the_block():
    memory = torch.randn(1, 1, 16, 16, requires_grad=True)
    keys = exact_window_keys(4, 8, (4, 4), (16, 16)).reshape(1, 1, 1, 3)
    SpatialTransformerRead((4, 4))(memory, keys).sum().backward()
    expected = torch.zeros(16, 16)
    expected[4:8, 8:12] = 1
    torch.testing.assert_close(memory.grad[0, 0], expected, atol=1e-5, rtol=0)


def test_key_maps_give_the_affine_matrix_by_hand():
    """theta = [[s, 0, x], [0, s, y]]: with "tanh" s, x, y = tanh(y0, y1, y2); with "uniform"
    s = s_min + (s_max - s_min) Phi(y0) and x, y = (1 - s)(2 Phi(y) - 1), Phi the normal CDF."""
    key = [0.3, -0.7, 1.2]
    s, x, y = (math.tanh(k) for k in key)
    torch.testing.assert_close(key_to_theta(torch.tensor([key], dtype=torch.float64)),
                               torch.tensor([[[s, 0.0, x], [0.0, s, y]]], dtype=torch.float64))
    phi = [0.5 * (1 + math.erf(k / math.sqrt(2))) for k in key]
    s = 0.2 + (0.6 - 0.2) * phi[0]
    x, y = ((1 - s) * (2 * p - 1) for p in phi[1:])
    torch.testing.assert_close(key_to_theta(torch.tensor([key], dtype=torch.float64), "uniform", (0.2, 0.6)),
                               torch.tensor([[[s, 0.0, x], [0.0, s, y]]], dtype=torch.float64))


def test_wrong_key_shape_is_a_clear_error():
    reader = SpatialTransformerRead((4, 4))
    with pytest.raises(ValueError, match="keys: expected shape"):
        reader(torch.randn(2, 3, 16, 16), torch.randn(3, 5, 2, 3))     # 3 episodes of keys, 2 memories
    with pytest.raises(ValueError, match="keys: expected shape"):
        reader(torch.randn(2, 3, 16, 16), torch.randn(2, 5, 2, 4))     # keys in R^4
