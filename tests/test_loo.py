"""The leave-one-out bound ln p(x_t | M written from X without x_t): against a hand computation on
a tiny Kanerva Machine, its shapes, that the memory of image t really excludes x_t, the VAE's equal
to its plain bound, DKM's importance weights by episode; class-structured episodes; and the
random-key samples' class measure."""
from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Normal

from pyro_kpp.data import DataError
from pyro_kpp.data.episodes import Episodes
from pyro_kpp.data.omniglot import OMNIGLOT_BACKGROUND_CHARACTERS
from pyro_kpp.inference import memory_use
from pyro_kpp.inference.bound import evaluate, leave_one_out_particles, log_weights, particle_traces
from pyro_kpp.inference.handlers import leave_one_out, reuse_embedding
from pyro_kpp.models import build_model

from helpers import tiny_config

SIZES = {"kpp": {}, "km": dict(slots=6, address_size=5), "dkm": dict(slots=6), "vae": {}}


def episode(B=2, T=3, seed=0):
    return torch.bernoulli(torch.full((B, T, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(seed))


def tiny(name: str, **extra):
    torch.manual_seed(0)
    return build_model(tiny_config(model=name, **SIZES[name], **extra)).double().eval()


def km_write_by_hand(model, E_others, eps_y, eps_z):
    """KM's q(M | X_-t) by brute-force conditioning of vec(M) on Z = W M + noise (eq. 8-11), for the
    other images' embeddings E_others (n, D) and the write's standard-normal draws."""
    y_loc, y_scale = model.q.address_head(E_others)
    W = model.weights(y_loc + y_scale * eps_y)                             # (n, K)
    z_loc, z_scale = model.q.write_code_head(E_others)
    Z = z_loc + z_scale * eps_z                                            # (n, L)
    L = Z.shape[-1]
    R0, U0 = model.prior.loc, model.prior.row_covariance()
    I_L = torch.eye(L, dtype=Z.dtype)
    prior_cov = torch.kron(I_L, U0)
    A = torch.kron(I_L, W)                                                 # vec(Z) = A vec(M) + noise
    S = A @ prior_cov @ A.T + torch.eye(len(A), dtype=Z.dtype)
    gain = torch.linalg.solve(S, A @ prior_cov).T
    mean = R0.T.reshape(-1) + gain @ (Z.T.reshape(-1) - A @ R0.T.reshape(-1))
    return mean.view(L, -1).T                                              # (K, L)


def test_km_leave_one_out_log_weights_equal_the_hand_computation():
    """Image t is read from the memory its episode's other images wrote by the Bayes update, and its
    log weight is eq. 12's with that memory: ln p(x|z) + ln p(z|y,M_-t) + ln p(y) - ln q(z|x,y,M_-t) - ln q(y|x)."""
    model = tiny("km")
    B, T = 2, 3
    x = episode(B, T).double()
    torch.manual_seed(5)
    with leave_one_out(model, x) as single, reuse_embedding():
        model_tr, guide_tr, lw = particle_traces(model, single, 1)                  # lw (1, B*T, 1)
    torch.manual_seed(5)                                 # the same draws through the public function
    bounds, lw_public, _ = leave_one_out_particles(model, x, 1)
    torch.testing.assert_close(lw_public, lw.view(1, B, T), rtol=1e-9, atol=1e-9)   # row b*T + t is (b, t)
    torch.testing.assert_close(bounds["elbo"], lw.view(B, T), rtol=1e-9, atol=1e-9)

    # the same draws, by hand: the write of the B*T leave-one-out episodes draws y, then z
    S, L = model.cfg.address_size, model.cfg.code_size
    torch.manual_seed(5)
    eps_y, eps_z = torch.randn(B * T, T - 1, S, dtype=x.dtype), torch.randn(B * T, T - 1, L, dtype=x.dtype)
    E = model.encoder(x.flatten(0, 1)).unflatten(0, (B, T))                        # (B, T, D)
    memory = model_tr.nodes["memory"]["value"][0, :, 0]                           # (B*T, K, L)
    y, z = guide_tr.nodes["y"]["value"][0, :, 0], guide_tr.nodes["z"]["value"][0, :, 0]   # (B*T, S), (B*T, L)
    for b in range(B):
        for t in range(T):
            row, others = b * T + t, [j for j in range(T) if j != t]
            R = km_write_by_hand(model, E[b, others], eps_y[row], eps_z[row])
            torch.testing.assert_close(memory[row], R, rtol=1e-8, atol=1e-8)
            w = model.key_net(y[row]) @ torch.nn.functional.normalize(model.addresses_raw, dim=-1).T   # (K,)
            readout = w @ R                                                        # (L,)
            y_loc, y_scale = model.q.address_head(E[b, t])
            z_loc, z_scale = model.q.code_head(torch.cat([E[b, t], readout]))
            log_q = Normal(y_loc, y_scale).log_prob(y[row]).sum() + Normal(z_loc, z_scale).log_prob(z[row]).sum()
            log_p = Normal(0.0, 1.0).log_prob(y[row]).sum() + Normal(readout, 1.0).log_prob(z[row]).sum()
            logits = model.decoder(z[row].unsqueeze(0))[0]
            log_p = log_p + Bernoulli(logits=logits).log_prob(x[b, t]).sum()
            torch.testing.assert_close(lw[0, row, 0], log_p - log_q, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_leave_one_out_shapes_and_evaluate_reports_it(name):
    model = tiny(name)
    x = episode(B=3, T=4).double()
    with leave_one_out(model, x) as single, reuse_embedding():
        model_tr, guide_tr, lw = particle_traces(model, single, 5)
    assert single.shape == (12, 1, 1, 28, 28) and lw.shape == (5, 12, 1)
    assert model_tr.nodes["x"]["log_prob"].shape == (5, 12, 1)
    bounds, lw, terms = leave_one_out_particles(model, x, 5)
    assert lw.shape == (5, 3, 4) and bounds["elbo"].shape == bounds["iw"].shape == (3, 4)
    assert all(term.shape == (3, 4) for term in terms.values()) and "reconstruction" in terms
    torch.testing.assert_close(-sum(terms.values()), bounds["elbo"])              # the terms sum to the bound
    r = evaluate(model, [x], samples=5, leave_one_out=True)
    assert {"loo", "loo_iw", "loo_terms"} <= set(r) and r["loo_iw"] <= r["loo"] + 1e-9
    assert "loo" not in evaluate(model, [x], samples=2)                          # off by default


def leave_one_out_memory(model, x, seed=3):
    """The memory each image is read from inside ``leave_one_out`` (the prior for DKM), (B*T, ...)."""
    torch.manual_seed(seed)
    with leave_one_out(model, x) as single, reuse_embedding():
        model_tr, _, _ = particle_traces(model, single, 1)
    site = model_tr.nodes["memory"]
    value = site["fn"].loc if model.memory_is_latent else site["value"]   # DKM: the prior q(M | X_-t)
    event = len(site["fn"].event_shape)
    return value.reshape(len(single), *value.shape[-event:])             # (B*T, ...)


@pytest.mark.parametrize("name", ["kpp", "km", "dkm"])
def test_leave_one_out_memory_excludes_the_image(name):
    """Changing x_t leaves the memory image t reads unchanged and changes the other images' memories."""
    model = tiny(name)
    B, T, t = 2, 4, 1
    x = episode(B, T).double()
    changed = x.clone()
    changed[0, t] = 1 - changed[0, t]
    before, after = leave_one_out_memory(model, x), leave_one_out_memory(model, changed)
    torch.testing.assert_close(after[t], before[t], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(after[t + 1], before[t + 1])            # image t is in image t+1's memory
    torch.testing.assert_close(after[T:], before[T:], rtol=1e-9, atol=1e-9)   # the other episode's untouched


def test_dkm_leave_one_out_prior_is_its_own_write_of_the_other_images():
    """DKM's leave-one-out memory is q(M | X_-t): its sequential write of the other images' codes."""
    model = tiny("dkm")
    B, T = 2, 3
    x = episode(B, T).double()
    prior = leave_one_out_memory(model, x)
    codes = model.q.codes(model.embed(x))                              # (B, T, L)
    for b in range(B):
        for t in range(T):
            R, _ = model.write_memory(codes[b, [j for j in range(T) if j != t]].unsqueeze(0))
            torch.testing.assert_close(prior[b * T + t], R[0], rtol=1e-9, atol=1e-9)


def test_vae_leave_one_out_is_its_plain_bound():
    model = tiny("vae")
    x = episode(B=2, T=4).double()
    torch.manual_seed(1)
    full = log_weights(model, x, 3)                                    # (S, B, T)
    torch.manual_seed(1)
    _, loo, _ = leave_one_out_particles(model, x, 3)                   # the same draws, image by image
    torch.testing.assert_close(loo, full, rtol=1e-9, atol=1e-9)


def test_leave_one_out_needs_two_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        leave_one_out_particles(tiny("kpp"), episode(B=2, T=1).double(), 1)


@pytest.mark.parametrize("name,shape", [("dkm", (4, 2, 1)), ("km", (4, 2, 3))])
def test_pareto_weights_are_those_the_bound_uses(name, shape):
    """DKM's IW bound weights whole episodes, so its Pareto k is fitted on episode weights."""
    seen = []
    evaluate(tiny(name), [episode(B=2, T=3).double()], samples=4, on_log_weights=seen.append)
    assert [tuple(w.shape) for w in seen] == [shape]


# ---- class-structured episodes ---------------------------------------------------------------

@pytest.mark.parametrize("classes", [2, 8])
def test_class_episodes_hold_n_classes_of_t_over_n_images_and_are_seeded(omniglot, classes):
    ep = Episodes(omniglot, 32, 4, seed=7, classes=classes)
    train_labels = ep.data.train_labels[ep.train_order(0)[:3].cpu()].flatten(0, 1)    # (3*B, T)
    for labels in (train_labels, ep.test_labels()):
        for row in labels:
            counts = torch.bincount(row)
            assert int((counts > 0).sum()) == classes and set(counts[counts > 0].tolist()) == {32 // classes}
    # background characters train, the evaluation alphabets' new characters test
    assert int(ep.data.train_labels.max()) < OMNIGLOT_BACKGROUND_CHARACTERS <= int(ep.test_labels().min())
    same, other = Episodes(omniglot, 32, 4, seed=7, classes=classes), Episodes(omniglot, 32, 4, seed=8, classes=classes)
    assert torch.equal(same.train_order(0), ep.train_order(0))
    assert not torch.equal(other.train_order(0), ep.train_order(0))
    assert not torch.equal(ep.train_order(1), ep.train_order(0))
    assert torch.equal(next(iter(other.test_episodes())), next(iter(ep.test_episodes())))   # fixed, whatever the seed
    assert torch.equal(next(iter(same.train_epoch(0))), next(iter(ep.train_epoch(0))))    # and their bits


def test_random_episodes_unchanged_without_classes(omniglot):
    ep = Episodes(omniglot, 32, 4, seed=0)
    assert ep.data is omniglot and ep.num_test_episodes() == len(omniglot.test) // 32


@pytest.mark.parametrize("kwargs,match", [
    (dict(classes=3), "must divide the episode length"),
    (dict(classes=1), "needs 32 images of each"),
    (dict(classes=2, valid_images=64), "valid_images"),
])
def test_class_episode_errors(omniglot, kwargs, match):
    with pytest.raises(DataError, match=match):
        Episodes(omniglot, 32, 4, seed=0, **kwargs)


def test_class_measure_counts_samples_nearest_an_episode_class(monkeypatch):
    """A sample whose nearest test image is of one of its episode's classes counts; chance is the
    fraction of test images in the episode's classes."""
    pool = torch.eye(6).view(6, 1, 2, 3)                                 # six distinct images
    pool_labels = torch.tensor([0, 0, 1, 2, 3, 3])
    samples = pool[[0, 3, 4, 5]].flatten(1).view(2, 2, 6)                # nearest: labels 0, 2 | 3, 3
    monkeypatch.setattr(memory_use, "random_key_samples", lambda model, memory, n, generator: samples)
    model = tiny("vae").float()
    x = torch.zeros(2, 2, 1, 28, 28)
    out = memory_use.class_affinity(model, x, torch.tensor([[0, 1], [2, 3]]), pool, pool_labels)
    assert out["in_classes"].tolist() == [[1.0, 0.0], [1.0, 1.0]]
    torch.testing.assert_close(out["chance"], torch.tensor([3 / 6, 3 / 6]))


def test_config_episode_classes_option_and_migration():
    from pyro_kpp.config import Config
    old = {k: v for k, v in Config().to_dict().items() if k != "episode_classes"}
    assert Config.from_dict({**old, "version": 4}).episode_classes is None       # v4 runs drew random episodes
    assert Config(episode_classes=4).episode_classes == 4
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="episode_classes"):
            Config(episode_classes=bad)


def test_evaluate_cli_prints_the_leave_one_out_column(tiny_run, capsys):
    from pyro_kpp import evaluate as evaluate_cli
    assert evaluate_cli.main([str(tiny_run), "-S", "2", "--episodes", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "leave-one-out bound" in out and "storing itself" in out
    r = evaluate_cli.evaluate_run(str(tiny_run), samples=2, max_episodes=2, progress=False)
    assert r["loo_minus_full"] == pytest.approx(r["test_loo_bound"] - r["test_bound"]) and r["conditional_bound"]
    assert "test_loo_bound" not in evaluate_cli.evaluate_run(str(tiny_run), samples=2, max_episodes=2,
                                                             progress=False, leave_one_out=False)


def test_progress_counts_the_leave_one_out_particles():
    from pyro_kpp.evaluate import particle_total
    x = episode(B=4, T=3).double()
    ticks = []
    evaluate(tiny("kpp"), [x[:3], x[3:]], samples=2, tick=ticks.append, leave_one_out=True)
    assert sum(ticks) == particle_total(4, 3, 3, 2, leave_one_out=True) > particle_total(4, 3, 3, 2)


def test_random_episodes_of_a_class_run_cut_its_test_classes_at_random(omniglot):
    """The contrast: the class split's test images (new alphabets) in random episodes."""
    from pyro_kpp.config import Config
    from pyro_kpp.data.episodes import make_episodes
    cfg = Config(episode_classes=4, batch_size=4)
    classes = make_episodes(cfg, omniglot, torch.device("cpu"))
    random = make_episodes(cfg, omniglot, torch.device("cpu"), random_episodes=True)
    assert random.classes is None and classes.classes == 4
    assert len(random.data.test) == len(classes.data.test) == 13_180                   # the evaluation alphabets
    assert random.num_test_episodes() == 13_180 // 32
    labels = random.test_labels()                                                     # (E, T)
    assert int(labels.min()) >= OMNIGLOT_BACKGROUND_CHARACTERS
    distinct = torch.tensor([len(row.unique()) for row in labels]).float()
    assert distinct.mean() > 20                                      # about 31 characters, not 4
    with pytest.raises(ValueError, match="random_episodes: the run's episodes are random already"):
        make_episodes(Config(), omniglot, torch.device("cpu"), random_episodes=True)


def test_evaluate_a_class_run_on_its_classes_and_on_random_episodes(tiny_class_run, tiny_run, capsys):
    from pyro_kpp import evaluate as evaluate_cli
    kw = dict(samples=2, max_episodes=2, progress=False)
    own = evaluate_cli.evaluate_run(str(tiny_class_run), **kw)
    contrast = evaluate_cli.evaluate_run(str(tiny_class_run), random_episodes=True, **kw)
    assert own["episode_structure"] == "2 classes" and contrast["episode_structure"] == "random"
    assert own["test_images"] == contrast["test_images"] == 2 * 4
    # a random episode of 4 drawings holds more of the 659 test characters than one of 2 characters
    assert contrast["sample_nearest_in_classes_chance"] > own["sample_nearest_in_classes_chance"]
    assert evaluate_cli.main([str(tiny_class_run), "-S", "2", "--episodes", "1", "--no-progress",
                              "--random-episodes"]) == 0
    assert "test images in episodes of random" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:                         # a run of random episodes: refused, by name
        evaluate_cli.main([str(tiny_run), "-S", "2", "--episodes", "1", "--random-episodes"])
    assert stop.value.code == 2 and "random_episodes" in capsys.readouterr().err
