"""The bound: training loss, per-image log weights, ELBO and importance-weighted bounds.

Reported figure (K++ §4, KM §4): the negative conditional bound per image, i.e. the
negative ELBO of an episode divided by T, averaged over test episodes, in nats/image.
Pyro's ELBO sums log-densities over both plates, so the per-image figure is the total over
B*T images divided by B*T -- one division by T, never more (the DKM pitfall of dividing a
KL by T twice would show up as a mismatch with ``log_weights``; tests check both against
a hand computation).

Importance-weighted bound with S samples of (y, z) per image: given the written memory the
images are conditionally independent, so the weights factor per image:

    ln p(x_t | M) >= E[ ln (1/S) sum_s p(x_t, y_s, z_s | M) / q(y_s, z_s | X) ],

S = 1 is the ELBO; larger S is tighter (Burda et al., 2016).

Leave-one-out bound (``leave_one_out_particles``): the same bounds of ln p(x_t | M written from X
without x_t), each image read from the memory of the other T - 1 images of its episode
(``pyro_kpp.inference.handlers.leave_one_out``). The conditional bound above lets x_t store itself in the memory
it is read from; the leave-one-out bound does not, so it is a density over x_t that can be ranked
against the VAE's ln p(x_t) (for the VAE they are the same bound). The leave-one-out minus the full
figure is the part of the conditional bound that comes from x_t storing itself: a difference of
two bounds, not an amount of information.
"""
from __future__ import annotations

import contextlib
import math

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_kpp.inference.handlers import foreign_memory, held_out, leave_one_out, reuse_embedding
from pyro_kpp.models.base import EpisodicModel

PARTICLE_DIM = -3  # left of the episodes (-2) and images (-1) plates


def make_elbo(name: str):
    """Pyro ELBO by name: 'trace' (Trace_ELBO) or 'meanfield' (TraceMeanField_ELBO, analytic KLs)."""
    if name == "trace":
        return Trace_ELBO()
    if name == "meanfield":
        return TraceMeanField_ELBO()
    raise ValueError(f"elbo: expected 'trace' or 'meanfield', got {name!r}")


class ScaleLatents(Messenger):
    """Multiply the log-densities of every latent site, in model and guide alike, by ``beta``,
    and those of the sites named in ``sites`` by their own factor as well.

    The ELBO becomes E[ln p(x|z)] - beta * KL: a KL warm-up (beta < 1 early in training) that
    keeps the keys and codes from collapsing onto their priors before the memory has any
    structure to offer them; ``sites={"keys": w}`` weights the key KL alone (pyro_kpp.inference.schedules).
    Observed sites (the data, the deterministic memory) are untouched.
    Only training uses it; every reported bound has every weight 1.
    """

    def __init__(self, beta: float, sites: dict[str, float] | None = None):
        super().__init__()
        self.beta = beta
        self.sites = sites or {}

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = msg["scale"] * self.beta * self.sites.get(msg["name"], 1.0)


def training_loss(model: EpisodicModel, x: torch.Tensor, elbo, kl_scale: float = 1.0,
                  key_kl_scale: float = 1.0, key_free_nats: float = 0.0, held_out_folds: int | None = None
                  ) -> torch.Tensor:
    """Differentiable negative ELBO per image of a batch of episodes (B, T, C, H, W).

    ``kl_scale`` < 1 weights the KL terms down, and ``key_kl_scale`` < 1 the key / address KL
    (``model.address_site``) further (see ``ScaleLatents``); both 1 is the true bound.
    ``key_free_nats`` > 0 charges the key KL as max(its mean over the batch's images,
    key_free_nats) ("free bits", Kingma et al., 2016, §C.8): the keys may carry that many nats
    per image for free. This path computes the loss from the traces' Monte Carlo terms
    (``bound_terms``), which is what ``Trace_ELBO`` computes for reparametrised sites.
    ``held_out_folds`` F (``--objective held-out``): the bound of every image read from the memory
    the other F - 1 folds of its episode wrote (``held_out``), not the memory it wrote itself.
    """
    model_fn, guide_fn = model.model, model.guide
    sites = {model.address_site: key_kl_scale} if model.address_site and key_kl_scale != 1.0 else {}
    with scored_episodes(model, x, held_out_folds) as scored:            # (B, T, ...) or (B*F, T/F, ...)
        if key_free_nats > 0:
            model_tr, guide_tr, _ = particle_traces(model, scored, 1)    # one particle: (1, B', T')
            terms = {name: term.expand(1, *scored.shape[:2]).mean()
                     for name, term in bound_terms(model, model_tr, guide_tr, scored.shape[1]).items()}
            keys = torch.clamp(terms.pop("key_kl"), min=key_free_nats) * key_kl_scale
            return terms.pop("reconstruction") + kl_scale * (sum(terms.values()) + keys)
        if kl_scale != 1.0 or sites:
            model_fn, guide_fn = ScaleLatents(kl_scale, sites)(model_fn), ScaleLatents(kl_scale, sites)(guide_fn)
        loss = elbo.differentiable_loss(model_fn, guide_fn, scored)
    return loss / (x.shape[0] * x.shape[1])


@contextlib.contextmanager
def scored_episodes(model: EpisodicModel, x: torch.Tensor, held_out_folds: int | None):
    """The episodes a training loss scores, with each episode's embedding and memory computed once:
    x itself (the paper's bound), or its held-out folds, each reading the other folds' memory."""
    if held_out_folds is None:
        with reuse_embedding():
            yield x
    else:
        with held_out(model, x, held_out_folds) as held:
            yield held


class TrainingLoss(nn.Module):
    """``training_loss`` of ``model`` as a module whose ``forward`` returns it: what
    ``DistributedDataParallel`` wraps for data-parallel training (``pyro_kpp.train.distributed``)."""

    def __init__(self, model: EpisodicModel, elbo, held_out_folds: int | None = None):
        super().__init__()
        self.model = model
        self.elbo = elbo
        self.held_out_folds = held_out_folds

    def forward(self, x: torch.Tensor, kl_scale: float = 1.0, key_kl_scale: float = 1.0,
                key_free_nats: float = 0.0) -> torch.Tensor:
        return training_loss(self.model, x, self.elbo, kl_scale, key_kl_scale, key_free_nats, self.held_out_folds)


def _per_image(site, T: int) -> torch.Tensor:
    """A site's log-density per image: (S, B, T) or (S, B, 1).

    Sites inside the ``images`` plate contribute per image. Episode-level sites (e.g. a
    latent memory) are spread evenly over the episode's T images, so summing over images
    counts them exactly once.
    """
    lp = site["log_prob"]
    if not any(f.name == "images" for f in site["cond_indep_stack"]):
        lp = lp / T
    return lp


def _counted(site) -> bool:
    return site["type"] == "sample" and not site_is_subsample(site) and not site["infer"].get("_deterministic")


def term_name(model: EpisodicModel, site: str) -> str:
    """The bound's term a latent site's KL belongs to (TERMS)."""
    if site == model.address_site:
        return "key_kl"
    return {"z": "code_kl", "memory": "memory_kl", "memory_row_cov": "memory_kl"}.get(site, f"{site}_kl")


#: The terms of the negative bound, nats/image: -E[ln p(x|z)], then each latent's KL (K++ eq. 4,
#: KM eq. 12, DKM's bound); a model reports those it has (the VAE has no key or memory KL).
TERMS = ("reconstruction", "code_kl", "key_kl", "memory_kl")


def bound_terms(model: EpisodicModel, model_tr, guide_tr, T: int) -> dict[str, torch.Tensor]:
    """The negative bound's terms per particle and image, (S, B, T) or broadcastable: they sum to
    minus the log weight. Each KL is the Monte Carlo estimate ln q - ln p at the guide's draw."""
    terms = {}
    for name, site in model_tr.nodes.items():
        if not _counted(site):
            continue
        if site["is_observed"]:
            terms["reconstruction"] = -_per_image(site, T)
        else:
            term = term_name(model, name)                  # KM's memory is two sites, one term
            terms[term] = terms.get(term, 0.0) + _per_image(guide_tr.nodes[name], T) - _per_image(site, T)
    return terms


def particle_traces(model: EpisodicModel, x: torch.Tensor, samples: int):
    """Guide and replayed model traces of ``samples`` vectorised particles, log-densities computed.

    Returns (model_trace, guide_trace, log_weights) with log_weights (S, B, T). Call it inside
    ``reuse_embedding()`` so the particles share one encoder pass.
    """
    B, T = x.shape[:2]
    with pyro.plate("particles", samples, dim=PARTICLE_DIM):
        guide_tr = poutine.trace(model.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    lw = -sum(bound_terms(model, model_tr, guide_tr, T).values())
    return model_tr, guide_tr, lw.expand(samples, B, T)


#: Particles per vectorised pass: with B = 8 episodes of T = 32 images, 16 particles decode
#: 4,096 images at once, where the decoder's convolutions run near their peak rate on a CPU.
PARTICLE_CHUNK = 16


def _particles(model: EpisodicModel, x: torch.Tensor, samples: int, chunk: int = PARTICLE_CHUNK, tick=None):
    """Log weights (S, B, T) and the terms' means over the S particles, each (B, T). The encoder
    runs once for all S (``reuse_embedding``); ``tick(n)``, if given, is called with the number of
    image-particles done after each pass."""
    B, T = x.shape[:2]
    lws, sums = [], {}
    with reuse_embedding():
        for start in range(0, samples, chunk):
            model_tr, guide_tr, lw = particle_traces(model, x, min(chunk, samples - start))
            lws.append(lw)
            for name, term in bound_terms(model, model_tr, guide_tr, T).items():
                sums[name] = sums.get(name, 0.0) + term.expand(lw.shape).sum(0)
            if tick is not None:
                tick(lw.numel())
    return torch.cat(lws), {name: total / samples for name, total in sums.items()}


@torch.no_grad()
def log_weights(model: EpisodicModel, x: torch.Tensor, samples: int = 1, chunk: int = PARTICLE_CHUNK) -> torch.Tensor:
    """ln p(x_t, y, z | M) - ln q(y, z | X) for ``samples`` draws per image: (S, B, T)."""
    return _particles(model, x, samples, chunk)[0]


def iw_log_weights(model: EpisodicModel, lw: torch.Tensor) -> torch.Tensor:
    """The log weights the IW bound averages, from per-image ones lw (S, B, T): the same, or for a
    latent memory (DKM) the episodes' (S, B, 1), the product over the T images that share each
    particle's memory. Pareto k is fitted on these (``pyro_kpp.evaluate``)."""
    return lw.sum(-1, keepdim=True) if model.memory_is_latent else lw


def _bounds(model: EpisodicModel, lw: torch.Tensor) -> dict[str, torch.Tensor]:
    S, T = lw.shape[0], lw.shape[-1]
    weights = iw_log_weights(model, lw)                          # (S, B, T) or (S, B, 1)
    iw = (torch.logsumexp(weights, 0) - math.log(S)) / (T if model.memory_is_latent else 1)
    return {"elbo": lw.mean(0), "iw": iw.expand(lw.shape[1:])}


@torch.no_grad()
def leave_one_out_particles(model: EpisodicModel, x: torch.Tensor, samples: int, tick=None):
    """Bounds of ln p(x_t | M written from X without x_t) for the episodes x (B, T, C, H, W), T >= 2.

    Returns the per-image bounds {"elbo", "iw"} (B, T), the log weights (S, B, T) and the ELBO's
    terms (B, T) each. Each image is a one-image episode reading the memory its T - 1 neighbours
    wrote (``pyro_kpp.inference.handlers.leave_one_out``), so the IW bound is per image for every model (DKM's
    leave-one-out memory is drawn per image).
    """
    B, T = x.shape[:2]
    with leave_one_out(model, x) as single:                       # (B*T, 1, C, H, W)
        lw, terms = _particles(model, single, samples, tick=tick)   # (S, B*T, 1), {term: (B*T, 1)}
    bounds = {name: b.view(B, T) for name, b in _bounds(model, lw).items()}
    return bounds, lw.view(samples, B, T), {name: term.view(B, T) for name, term in terms.items()}


def image_bounds(model: EpisodicModel, x: torch.Tensor, samples: int = 1) -> dict[str, torch.Tensor]:
    """Per-image ELBO estimate (mean of S log weights) and IW bound (log-mean-exp): (B, T) each.

    When the memory is a latent variable (``model.memory_is_latent``, DKM) the T images share
    each particle's memory draw, so the weights no longer factor per image: the IW bound is
    taken over whole episodes, ln (1/S) sum_s prod_t w_st, and each image gets 1/T of it.
    """
    return _bounds(model, log_weights(model, x, samples))


#: Particles per image of the paired own/foreign-memory ELBOs behind the memory gain.
GAIN_SAMPLES = 4


class _Replay:
    """Save the RNG state of ``device`` (and the CPU's) now; ``rewind()`` goes back to it, so two
    computations can draw the same random numbers."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.state = torch.random.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    def rewind(self) -> None:
        torch.random.set_rng_state(self.state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)


def _add(totals: dict, terms: dict[str, torch.Tensor]) -> None:
    for name, term in terms.items():
        totals[name] = totals.get(name, 0.0) + float(term.sum())


def particle_passes(samples: int, episodes: int, leave_one_out: bool = False) -> int:
    """Particles per image ``evaluate`` draws for a batch of ``episodes``: the S of the bounds (twice
    with the leave-one-out bound), and for two episodes or more the gain's paired own / other-memory
    particles (re-drawn unless S is ``GAIN_SAMPLES`` or fewer). For progress bars: ``tick`` counts
    image-particles."""
    passes = samples * (2 if leave_one_out else 1)
    if episodes < 2:
        return passes
    k = min(samples, GAIN_SAMPLES)
    return passes + k + (k if k != samples else 0)


@torch.no_grad()
def evaluate(model: EpisodicModel, batches, samples: int = 1, tick=None, on_log_weights=None,
             leave_one_out: bool = False) -> dict:
    """Negative bounds in nats/image over the episode batches (e.g. the fixed test episodes).

    Returns the negative ELBO (``elbo``) and IW bound (``iw``) with S samples, and the ELBO's
    terms (``terms``: TERMS, nats/image, summing to ``elbo``). The memory's use: ``memory_gain``
    is the negative ELBO with the memory written from another episode of the batch (episode b
    reads episode b + 1's) minus that with the episode's own, in nats/image, over the images of
    batches of two episodes or more (``gain_images``). Both ELBOs use the *same* random draws
    (``min(S, GAIN_SAMPLES)`` particles, the RNG rewound), so what does not read the memory
    cancels exactly: the VAE's gain is 0 to the bit. ``foreign_terms`` are the terms with the
    other episode's memory. ``on_log_weights``, if given, is called with each batch's log weights
    as the IW bound uses them (``iw_log_weights``: (S, B, T), DKM's (S, B, 1)), e.g. for Pareto-k
    diagnostics; ``tick(n)``, if given, after each vectorised pass with the n image-particles it
    evaluated (``particle_passes`` per image in all).

    ``leave_one_out``: also the negative leave-one-out bounds (``loo``, ``loo_iw``, S samples) and
    the ELBO's terms (``loo_terms``), each image read from the memory written without it
    (``leave_one_out_particles``); needs T >= 2.
    """
    was_training = model.training
    model.eval()
    elbo_sum = iw_sum = gain_sum = 0.0
    images = gain_images = 0
    terms, foreign_terms, loo, loo_terms = {}, {}, {}, {}
    for x in batches:
        replay = _Replay(x.device)
        lw, own_terms = _particles(model, x, samples, tick=tick)  # (S, B, T), {term: (B, T)}
        if on_log_weights is not None:
            on_log_weights(iw_log_weights(model, lw))
        b = _bounds(model, lw)
        elbo_sum += float(b["elbo"].sum())
        iw_sum += float(b["iw"].sum())
        images += b["elbo"].numel()
        _add(terms, own_terms)
        if leave_one_out:
            loo_bounds, _, terms_loo = leave_one_out_particles(model, x, samples, tick=tick)
            _add(loo, loo_bounds)
            _add(loo_terms, terms_loo)
        if x.shape[0] < 2:                                       # no other episode to swap with
            continue
        k = min(samples, GAIN_SAMPLES)
        if k != samples:
            replay.rewind()
            lw = _particles(model, x, k, tick=tick)[0]
        replay.rewind()
        with foreign_memory():
            lw_other, other_terms = _particles(model, x, k, tick=tick)
        gain_sum += float((lw[:k] - lw_other).mean(0).sum())
        gain_images += lw_other[0].numel()
        _add(foreign_terms, other_terms)
    model.train(was_training)
    if images == 0:
        raise ValueError("evaluate: no episodes to evaluate")
    loo_out = {"loo": -loo["elbo"] / images, "loo_iw": -loo["iw"] / images,
               "loo_terms": {name: total / images for name, total in loo_terms.items()}} if leave_one_out else {}
    return {"elbo": -elbo_sum / images, "iw": -iw_sum / images, "samples": samples, "images": images,
            **loo_out, "terms": {name: total / images for name, total in terms.items()},
            "memory_gain": gain_sum / gain_images if gain_images else None,
            "foreign_terms": {name: total / gain_images for name, total in foreign_terms.items()}
            if gain_images else None,
            "gain_images": gain_images}
