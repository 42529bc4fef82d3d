"""K++'s solved write (``--kpp-write solved``): conjugate gradients against a direct solve, the
block read's adjoint, exact read-back where the windows do not overlap, and the code maps' start."""
from __future__ import annotations

import pytest
import torch

from pyro_kpp.config import Config
from pyro_kpp.maths.solve import conjugate_gradient
from pyro_kpp.models import build_model

from helpers import tiny_config


def test_conjugate_gradient_matches_a_direct_solve():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    spd = A @ A.transpose(-1, -2) + 0.5 * torch.eye(6, dtype=torch.float64)      # (3, 6, 6), one system each
    b = torch.randn(3, 6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: (spd @ v.unsqueeze(-1)).squeeze(-1), b, iterations=6)
    torch.testing.assert_close(x, torch.linalg.solve(spd, b), rtol=1e-8, atol=1e-8)


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(tiny_config(**{"kpp_write": "solved", "memory_blur": 0.0, **overrides})).eval()


@pytest.mark.parametrize("blur", [0.0, 1.5])
def test_the_block_read_adjoint_is_its_transpose(blur):
    model = _model(memory_blur=blur)
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 4, 2, 3, generator=g)
    M = torch.randn(2, *model.cfg.memory_shape, generator=g)
    V = torch.randn(2, 4, 2, model.cfg.memory_shape[0], model.block_res(), model.block_res(), generator=g)
    lhs = (model.read_blocks(M, keys) * V).sum()
    rhs = (M * model.read_blocks_adjoint(V, keys)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_blocks_written_where_windows_do_not_overlap_read_back_exactly(monkeypatch):
    """Two images, one window each, in opposite corners: the least-squares write returns each
    image's block at its keys (up to the ridge)."""
    model = _model(reads=1, episode_length=2, memory_shape=(3, 32, 32), window=8, kpp_block_res=4)
    # uniform key map: each key component in R maps to a centre in (-1, 1); opposite corners
    keys = torch.tensor([[[[-1.5, -1.5, 0.0]], [[1.5, 1.5, 0.0]]]])              # (1, T=2, K=1, 3)
    E = torch.zeros(1, 2, model.cfg.embed_size)
    monkeypatch.setattr(model.q, "key_posterior", lambda E: (keys, torch.ones_like(keys)))
    with torch.no_grad():
        target = model.code_map(model.q.code_head(E)[0]).reshape(1, 2, 1, 3, 4, 4)
        back = model.read_blocks(model.solved_write(E), keys)
    assert float((back - target).norm() / target.norm()) < 1e-2


def test_the_code_readout_starts_as_the_inverse_of_the_code_map():
    model = _model()
    product = model.code_readout.weight @ model.code_map.weight                    # (L, L)
    torch.testing.assert_close(product, torch.eye(model.cfg.code_size), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides, match", [
    ({"kpp_posterior": "read"}, "kpp_posterior"),
    ({"code_size": 1000}, "kpp_block_res"),
    ({"kpp_block_res": 3, "code_size": 8}, "divisor"),
])
def test_the_solved_write_refuses_what_it_cannot_store(overrides, match):
    with pytest.raises(ValueError, match=match):
        Config(kpp_write="solved", **overrides)


def test_the_solved_write_trains_its_code_maps(episode):
    """The Pyro program runs with the solved write, and the ELBO's gradient reaches A and B."""
    from pyro_kpp.inference.bound import make_elbo, training_loss

    model = _model().train()
    loss = training_loss(model, episode, make_elbo("trace"))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.code_map.weight.grad.abs().sum() > 0 and model.code_readout.weight.grad.abs().sum() > 0
