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
"""
from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .episodic import EpisodicModel

PARTICLE_DIM = -3  # left of the episodes (-2) and images (-1) plates


def make_elbo(name: str):
    """Pyro ELBO by name: 'trace' (Trace_ELBO) or 'meanfield' (TraceMeanField_ELBO, analytic KLs)."""
    if name == "trace":
        return Trace_ELBO()
    if name == "meanfield":
        return TraceMeanField_ELBO()
    raise ValueError(f"elbo: expected 'trace' or 'meanfield', got {name!r}")


class ScaleLatents(Messenger):
    """Multiply the log-densities of every latent site, in model and guide alike, by ``beta``.

    The ELBO becomes E[ln p(x|z)] - beta * KL: a KL warm-up (beta < 1 early in training) that
    keeps the keys and codes from collapsing onto their priors before the memory has any
    structure to offer them. Observed sites (the data, the deterministic memory) are untouched.
    Only training uses it; every reported bound has beta = 1.
    """

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = msg["scale"] * self.beta


def training_loss(model: EpisodicModel, x: torch.Tensor, elbo, kl_scale: float = 1.0) -> torch.Tensor:
    """Differentiable negative ELBO per image of a batch of episodes (B, T, C, H, W).

    ``kl_scale`` < 1 weights the KL terms down (see ``ScaleLatents``); 1 is the true bound.
    """
    model_fn, guide_fn = model.model, model.guide
    if kl_scale != 1.0:
        model_fn, guide_fn = ScaleLatents(kl_scale)(model_fn), ScaleLatents(kl_scale)(guide_fn)
    with model.reuse_embedding():
        loss = elbo.differentiable_loss(model_fn, guide_fn, x)
    return loss / (x.shape[0] * x.shape[1])


def _site_log_probs(trace, T: int) -> torch.Tensor:
    """Sum of a trace's log-densities, per image: (S, B, T).

    Sites inside the ``images`` plate contribute per image. Episode-level sites (e.g. a
    latent memory) are spread evenly over the episode's T images, so summing over images
    counts them exactly once.
    """
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("_deterministic"):
            continue
        lp = site["log_prob"]
        if not any(f.name == "images" for f in site["cond_indep_stack"]):
            lp = lp / T
        total = total + lp
    return total


def particle_traces(model: EpisodicModel, x: torch.Tensor, samples: int):
    """Guide and replayed model traces of ``samples`` vectorised particles, log-densities computed.

    Returns (model_trace, guide_trace, log_weights) with log_weights (S, B, T). Call it inside
    ``model.reuse_embedding()`` so the particles share one encoder pass.
    """
    B, T = x.shape[:2]
    with pyro.plate("particles", samples, dim=PARTICLE_DIM):
        guide_tr = poutine.trace(model.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    lw = _site_log_probs(model_tr, T) - _site_log_probs(guide_tr, T)
    return model_tr, guide_tr, lw.expand(samples, B, T)


@torch.no_grad()
def log_weights(model: EpisodicModel, x: torch.Tensor, samples: int = 1, chunk: int = 16) -> torch.Tensor:
    """ln p(x_t, y, z | M) - ln q(y, z | X) for ``samples`` draws per image: (S, B, T)."""
    with model.reuse_embedding():
        return torch.cat([particle_traces(model, x, min(chunk, samples - start))[2]
                          for start in range(0, samples, chunk)])


def image_bounds(model: EpisodicModel, x: torch.Tensor, samples: int = 1) -> dict[str, torch.Tensor]:
    """Per-image ELBO estimate (mean of S log weights) and IW bound (log-mean-exp): (B, T) each.

    When the memory is a latent variable (``model.memory_is_latent``, DKM) the T images share
    each particle's memory draw, so the weights no longer factor per image: the IW bound is
    taken over whole episodes, ln (1/S) sum_s prod_t w_st, and each image gets 1/T of it.
    """
    lw = log_weights(model, x, samples)
    S, T = lw.shape[0], lw.shape[-1]
    if model.memory_is_latent:
        iw = (torch.logsumexp(lw.sum(-1, keepdim=True), 0) - math.log(S)) / T
        return {"elbo": lw.mean(0), "iw": iw.expand(lw.shape[1:])}
    return {"elbo": lw.mean(0), "iw": torch.logsumexp(lw, 0) - math.log(S)}


@torch.no_grad()
def evaluate(model: EpisodicModel, batches, samples: int = 1, progress=None) -> dict[str, float]:
    """Negative bounds in nats/image over the episode batches (e.g. the fixed test episodes)."""
    was_training = model.training
    model.eval()
    elbo_sum = iw_sum = 0.0
    images = 0
    for x in batches if progress is None else progress(batches):
        b = image_bounds(model, x, samples)
        elbo_sum += float(b["elbo"].sum())
        iw_sum += float(b["iw"].sum())
        images += b["elbo"].numel()
    model.train(was_training)
    if images == 0:
        raise ValueError("evaluate: no episodes to evaluate")
    return {"elbo": -elbo_sum / images, "iw": -iw_sum / images, "samples": samples, "images": images}
