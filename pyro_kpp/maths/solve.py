"""Conjugate gradients for the batched least-squares write of K++ (``--kpp-write solved``).

``conjugate_gradient(apply, rhs, iterations)`` solves apply(M) = rhs for a symmetric positive
definite linear ``apply`` (here R^T R + lambda I, R the read of every image's block at its keys),
one system per leading index (episode), by a fixed number of iterations from M = 0, so that the
solve is an ordinary differentiable function of its inputs (autograd runs through the unrolled
iterations). With exact arithmetic n iterations solve an n-dimensional system; fewer give the
least-squares solution on the Krylov space of the right-hand side (Hestenes & Stiefel, 1952).
"""
from __future__ import annotations

from typing import Callable

import torch

#: Smallest denominator of a step: a converged system (residual 0) stays put instead of dividing 0 by 0.
TINY = 1e-30


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-system inner products: (B, ...) x (B, ...) -> (B, 1, ..., 1)."""
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.dim() - 1)))


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor,
                       iterations: int) -> torch.Tensor:
    """M with apply(M) ~ rhs, for rhs (B, ...), after ``iterations`` steps from M = 0."""
    M = torch.zeros_like(rhs)
    r = rhs
    p = r
    rs = _dot(r, r)
    for _ in range(iterations):
        Ap = apply(p)
        alpha = rs / _dot(p, Ap).clamp_min(TINY)
        M = M + alpha * p
        r = r - alpha * Ap
        rs_next = _dot(r, r)
        p = r + (rs_next / rs.clamp_min(TINY)) * p
        rs = rs_next
    return M
