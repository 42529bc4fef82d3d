"""The discretized mixture of logistics (pyro_kpp.maths.dmol) and the 8-bit path through the models.

The distribution is checked against brute force: its probabilities over every 8-bit value sum
to one, its log-probabilities match a direct float64 computation from logistic CDF differences
(loops over components and channels), and its samples follow its probabilities. Then the 8-bit
path: input checks, Pyro trace shapes, bits/dim, API sampling, and a short Fashion-MNIST run.
"""
from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import tiny_config
from pyro import poutine

import pyro_kpp
from pyro_kpp.inference.bound import evaluate, log_weights, make_elbo, training_loss
from pyro_kpp.maths.dmol import (HALF_BIN, LEVELS, DiscretizedLogisticMixture, channels_from_params,
                           coefficient_count, params_per_component)
from pyro_kpp.maths.likelihoods import DMOL_COMPONENTS, bits_per_dim
from pyro_kpp.models import MODELS, build_model

F64 = torch.float64


def random_mixture(batch, K, C, H, W, dtype=F64, seed=0, log_scale=None) -> DiscretizedLogisticMixture:
    """Random parameters: locations also beyond [-1, 1] (mass piles into the edge bins), scales
    from e^-7 (the floor: almost all mass in one bin) to e^1 (flat over the range)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*batch, K, H, W, generator=g, dtype=dtype)
    loc = 1.6 * (2 * torch.rand(*batch, K, C, H, W, generator=g, dtype=dtype) - 1)
    if log_scale is None:
        log_scale = -7 + 8 * torch.rand(*batch, K, C, H, W, generator=g, dtype=dtype)
    coeffs = 2 * torch.randn(*batch, K, coefficient_count(C), H, W, generator=g, dtype=dtype)
    return DiscretizedLogisticMixture(logits, loc, log_scale.expand(*batch, K, C, H, W), coeffs)


def all_images(C: int, dtype=F64) -> torch.Tensor:
    """Every 1x1 image with C channels on the 8-bit grid: (256^C, C, 1, 1), channel 0 slowest."""
    grid = torch.arange(LEVELS, dtype=dtype) / (LEVELS - 1)
    return torch.cartesian_prod(*[grid] * C).reshape(-1, C, 1, 1)


def bin_mass(v: float, mu: float, s: float) -> float:
    """P(level at v | logistic(mu, s)) by CDF differences in float64, edge bins open. In the upper
    tail the mirrored CDF F(-x; -mu) = 1 - F(x; mu) is used, so tiny masses keep their precision."""
    lo, hi = v - HALF_BIN, v + HALF_BIN
    first, last = v <= -1 + 1e-9, v >= 1 - 1e-9
    if lo > mu and not first:
        mirror = dist.Logistic(torch.tensor(-mu, dtype=F64), torch.tensor(s, dtype=F64))
        upper_tail = lambda x: mirror.cdf(torch.tensor(-x, dtype=F64))  # noqa: E731  P(X > x)
        return float(upper_tail(lo) - (0.0 if last else upper_tail(hi)))
    logistic = dist.Logistic(torch.tensor(mu, dtype=F64), torch.tensor(s, dtype=F64))
    cdf = lambda x: logistic.cdf(torch.tensor(x, dtype=F64))  # noqa: E731
    return float((1.0 if last else cdf(hi)) - (0.0 if first else cdf(lo)))


def direct_log_prob(d: DiscretizedLogisticMixture, x: torch.Tensor) -> float:
    """ln P(x) for one image x (C, H, W) of an unbatched mixture, by loops (PixelCNN++ eq. 2-3)."""
    K, C, H, W = d.loc.shape
    y = 2 * x - 1
    pi = torch.softmax(d.logits, dim=0)
    total = 0.0
    for h, w in itertools.product(range(H), range(W)):
        p_pixel = 0.0
        for k in range(K):
            p = float(pi[k, h, w])
            coeff = iter(torch.tanh(d.coeffs[k, :, h, w]).tolist())
            for c in range(C):
                mu = float(d.loc[k, c, h, w]) + sum(next(coeff) * float(y[j, h, w]) for j in range(c))
                p *= bin_mass(float(y[c, h, w]), mu, math.exp(float(d.log_scale[k, c, h, w])))
            p_pixel += p
        total += math.log(p_pixel)
    return total


# ---------------------------------------------------------------------------------------------
# The distribution
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-10), (torch.float32, 1e-4)])
def test_probabilities_over_256_values_sum_to_one_per_sub_pixel(dtype, tol):
    d = random_mixture((64,), K=3, C=1, H=1, W=1, dtype=dtype)     # 64 independent sub-pixels
    lp = d.log_prob(all_images(1, dtype).unsqueeze(1))               # (256, 64)
    assert lp.shape == (LEVELS, 64) and bool(torch.isfinite(lp).all())
    assert torch.allclose(lp.exp().sum(0), torch.ones((), dtype=dtype), atol=tol)
    # The edge bins carry the tails: a location far below the range puts its mass on level 0.
    far = DiscretizedLogisticMixture(torch.zeros(1, 1, 1, dtype=dtype), torch.full((1, 1, 1, 1), -3.0, dtype=dtype),
                                     torch.full((1, 1, 1, 1), -3.0, dtype=dtype), torch.zeros(1, 0, 1, 1, dtype=dtype))
    assert float(far.log_prob(torch.zeros(1, 1, 1, dtype=dtype)).exp()) > 1 - 1e-6


def test_joint_probabilities_with_channel_coefficients_sum_to_one():
    """Two channels, the second's location moved by the first's value: all 65,536 images."""
    d = random_mixture((8,), K=3, C=2, H=1, W=1)
    lp = d.log_prob(all_images(2).unsqueeze(1))                      # (65536, 8)
    assert torch.allclose(lp.exp().sum(0), torch.ones((), dtype=F64), atol=1e-10)


@pytest.mark.parametrize("C", [1, 3])
def test_log_prob_matches_direct_computation(C):
    d = random_mixture((), K=3, C=C, H=2, W=3, seed=C)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, LEVELS, (5, C, 2, 3), generator=g).to(F64) / (LEVELS - 1)
    x[0] = 0.0                                                       # the edge bins
    x[1] = 1.0
    got = d.log_prob(x)
    want = torch.tensor([direct_log_prob(d, xi) for xi in x], dtype=F64)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)


def test_tiny_probabilities_keep_their_precision_in_float32():
    """A bin 20 scales from the location has mass ~e^-20: PixelCNN++'s float32 CDF difference
    is 0 there (and needs its mid-bin guard); the log-space form stays exact."""
    loc, log_scale = torch.full((1, 1, 1, 1), -0.5), torch.full((1, 1, 1, 1), math.log(0.05))
    d = DiscretizedLogisticMixture(torch.zeros(1, 1, 1), loc, log_scale, torch.zeros(1, 0, 1, 1))
    x = torch.tensor([[[[191 / 255]]]])                              # y = 2 * 191/255 - 1 ~ 0.5
    level_y = 2 * 191 / 255 - 1
    a, b = (level_y + HALF_BIN + 0.5) / 0.05, (level_y - HALF_BIN + 0.5) / 0.05
    assert float(torch.sigmoid(torch.tensor(a)) - torch.sigmoid(torch.tensor(b))) == 0.0  # naive float32
    want = math.log(bin_mass(level_y, -0.5, 0.05))
    assert want < -19
    assert abs(float(d.log_prob(x)) - want) < 1e-4


def test_samples_follow_the_probabilities():
    """Empirical moments of 20,000 two-channel samples against the exact ones from the 65,536
    joint probabilities (5 standard errors): checks the component draw, the rounding to bins
    and that the coefficient acts on the quantized first channel."""
    d = random_mixture((), K=2, C=2, H=1, W=1, seed=3, log_scale=torch.full((2, 2, 1, 1), -2.5, dtype=F64))
    images = all_images(2)                                           # (65536, 2, 1, 1)
    p = d.log_prob(images).exp()
    x = d.sample((20000,), generator=torch.Generator().manual_seed(0))
    assert x.shape == (20000, 2, 1, 1)
    assert bool(((x * 255 - (x * 255).round()).abs() < 1e-9).all()) and 0 <= x.min() and x.max() <= 1
    for f in (lambda v: v[:, 0], lambda v: v[:, 1], lambda v: v[:, 0] * v[:, 1]):
        exact = float((p * f(images).flatten()).sum())
        sd = float((p * (f(images).flatten() - exact) ** 2).sum().sqrt())
        assert abs(float(f(x).mean()) - exact) < 5 * sd / math.sqrt(len(x)) + 1e-12


def test_mean_is_the_continuous_mixture_mean():
    """With small scales and interior locations the continuous mean is within half a level of
    the exact 8-bit mean (the discretization is nearly mean-preserving there)."""
    g = torch.Generator().manual_seed(4)
    d = DiscretizedLogisticMixture(torch.randn(2, 1, 1, generator=g, dtype=F64),
                                   0.4 * torch.randn(2, 2, 1, 1, generator=g, dtype=F64),
                                   torch.full((2, 2, 1, 1), -4.0, dtype=F64),
                                   torch.randn(2, 1, 1, 1, generator=g, dtype=F64))
    images = all_images(2)
    p = d.log_prob(images).exp()
    exact = (p[:, None] * images[:, :, 0, 0]).sum(0)                 # (2,)
    assert torch.allclose(d.mean[:, 0, 0], exact, atol=0.5 / 255)


def test_from_params_layout_and_channel_count():
    K, C, H, W = 2, 3, 2, 2
    assert params_per_component(1) == 3 and params_per_component(3) == 10
    assert channels_from_params(K * 10, K) == 3 and channels_from_params(K * 3, K) == 1
    with pytest.raises(ValueError, match="params: expected K"):
        channels_from_params(K * 4, K)
    params = 0.01 * torch.arange(K * 10 * H * W, dtype=F64).reshape(1, K * 10, H, W)  # inside the clamp
    d = DiscretizedLogisticMixture.from_params(params, K)
    assert d.batch_shape == (1,) and d.event_shape == (C, H, W)
    assert torch.equal(d.logits[0], params[0, :K])
    assert torch.equal(d.loc[0, 1, 2], params[0, K + 1 * C + 2])              # component 1, channel 2
    assert torch.equal(d.log_scale[0, 0, 1], params[0, K + K * C + 1])
    assert torch.equal(d.coeffs[0, 1, 0], params[0, K + 2 * K * C + 1 * 3])  # component 1, (G, R)


def test_validation_shapes_and_expand():
    d = random_mixture((2, 3), K=2, C=1, H=4, W=4, dtype=torch.float32)
    assert d.batch_shape == (2, 3) and d.event_shape == (1, 4, 4)
    e = d.expand((5, 2, 3))
    x = torch.randint(0, LEVELS, (2, 3, 1, 4, 4)).float() / 255
    assert e.log_prob(x).shape == (5, 2, 3) and torch.allclose(e.log_prob(x)[3], d.log_prob(x))
    assert d.sample((7,)).shape == (7, 2, 3, 1, 4, 4)
    with pytest.raises(ValueError):
        d.log_prob(torch.full((2, 3, 1, 4, 4), 0.5))                 # off the grid: validate_args
    with pytest.raises(ValueError, match="logits: expected shape"):
        DiscretizedLogisticMixture(torch.zeros(3, 4, 4), torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4),
                                   torch.zeros(2, 0, 4, 4))


def test_bits_per_dim():
    # bits/dim of an image is -log2 P(image) / D: here from the direct float64 probabilities.
    d = random_mixture((), K=2, C=1, H=2, W=3, seed=5)
    x = torch.randint(0, LEVELS, (1, 2, 3), generator=torch.Generator().manual_seed(2)).to(F64) / 255
    want = -direct_log_prob(d, x) / math.log(2) / 6
    assert bits_per_dim(-float(d.log_prob(x)), (1, 2, 3)) == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# The 8-bit path through the models
# ---------------------------------------------------------------------------------------------


def test_likelihood_checks_reject_the_wrong_data():
    grey = torch.randint(0, LEVELS, (2, 4, 1, 28, 28)).float() / 255
    bern = build_model(tiny_config())
    with pytest.raises(ValueError, match="Bernoulli likelihood needs binary pixels"):
        bern.check_episode(grey)
    model = build_model(tiny_config(data="fashion-mnist", likelihood="dmol"))
    assert model.decoder.deconvs[-1].out_channels == DMOL_COMPONENTS * 3
    model.check_episode(grey)                                        # on the grid: accepted
    model.check_episode((grey > 0.5).float())
    for bad in (grey + 0.3 / 255, grey * 1.5, grey - 0.5):
        with pytest.raises(ValueError, match="dmol likelihood needs 8-bit images"):
            model.check_episode(bad)


def test_trace_shapes_with_the_dmol_likelihood():
    cfg = tiny_config(data="cifar10", image_shape=(3, 32, 32))
    assert cfg.likelihood == "dmol"
    model = build_model(cfg)
    x = torch.randint(0, LEVELS, (2, 4, 3, 32, 32)).float() / 255
    tr = poutine.trace(model.model).get_trace(x)
    site = tr.nodes["x"]
    assert isinstance(site["fn"], DiscretizedLogisticMixture)
    assert site["fn"].batch_shape == (2, 4) and site["fn"].event_shape == (3, 32, 32)
    tr.compute_log_prob()
    assert tr.nodes["x"]["log_prob"].shape == (2, 4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_runs_with_the_dmol_likelihood_on_colour_images(name):
    model = build_model(tiny_config(model=name, likelihood="dmol", image_shape=(3, 32, 32)))
    x = torch.randint(0, LEVELS, (2, 4, 3, 32, 32), generator=torch.Generator().manual_seed(0)).float() / 255
    loss = training_loss(model, x, make_elbo("trace"))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    assert log_weights(model, x, samples=3).shape == (3, 2, 4)
    drawn = pyro_kpp.sample(pyro_kpp.write(model.eval(), x), n=2, binary=True)
    assert drawn.shape == (2, 2, 3, 32, 32)
    model.check_episode(drawn)                                       # 8-bit images


def test_sampling_returns_8_bit_images():
    model = build_model(tiny_config(data="fashion-mnist", likelihood="dmol")).eval()
    x = torch.randint(0, LEVELS, (1, 4, 1, 28, 28)).float() / 255
    memory = pyro_kpp.write(model, x)
    gen = torch.Generator().manual_seed(0)
    drawn = pyro_kpp.sample(memory, n=3, binary=True, generator=gen)
    assert drawn.shape == (1, 3, 1, 28, 28) and drawn.dtype == torch.float32
    model.check_episode(drawn)                                       # on the grid: can be written back
    pixels = pyro_kpp.sample(memory, n=3, binary=True, as_uint8=True, generator=torch.Generator().manual_seed(0))
    assert pixels.dtype == torch.uint8 and torch.equal(pixels, (drawn * 255).round().to(torch.uint8))
    mean = pyro_kpp.sample(memory, n=3)
    assert mean.dtype == torch.float32 and 0 <= float(mean.min()) and float(mean.max()) <= 1


def test_smoke_fashion_mnist_dmol_bound_decreases():
    """Smoke test: a few Adam steps on real 8-bit Fashion-MNIST lower the test bound (nats/image).
    The likelihood is checked against direct probabilities above, the KL terms in each model's tests."""
    from pyro_kpp import data as D
    from pyro_kpp.data.episodes import make_episodes

    try:
        data = D.load_dataset("fashion-mnist", offline=True)
    except D.DataError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")
    cfg = tiny_config(data="fashion-mnist", likelihood="dmol", batch_size=4, episode_length=8)
    episodes = make_episodes(cfg, data, torch.device("cpu"))
    assert not episodes.binarize
    test = [next(iter(episodes.test_episodes()))]
    model = build_model(cfg)
    pyro.set_rng_seed(0)
    before = evaluate(model, test)["elbo"]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    elbo = make_elbo("trace")
    for x in itertools.islice(episodes.train_epoch(0), 30):
        loss = training_loss(model, x, elbo)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pyro.set_rng_seed(0)
    after = evaluate(model, test)["elbo"]
    assert math.isfinite(after) and after < before - 100, (before, after)
