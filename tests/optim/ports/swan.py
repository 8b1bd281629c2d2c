"""SWAN (Ma, Gong, Scetbon, Meeds, ICML 2025, arXiv:2412.13148) in float64 NumPy, PyTorch orientation.

Algorithm 1 of the paper on one matrix ``G`` (``m (out) × n (in)``): GradNorm standardises each row over its ``n``
entries; GradWhitening multiplies by ``(G Gᵀ)^(-1/2)`` through coupled Newton–Schulz iterations on the normalised
smaller Gram matrix; the step is ``W ← W − lr · scale · ΔW``. Vectors take Adam (optax form, eps after the bias
correction), as the paper keeps the non-matrix parameters on Adam.
"""

from __future__ import annotations

import numpy as np


def grad_norm(g: np.ndarray, eps: float) -> np.ndarray:
    """Each row minus its mean, over its biased standard deviation (``eps`` under the square root)."""
    c = g - g.mean(axis=1, keepdims=True)
    return c / np.sqrt((c * c).mean(axis=1, keepdims=True) + eps)


def inv_sqrt_newton_schulz(a: np.ndarray, steps: int) -> np.ndarray:
    """Coupled Newton–Schulz: ``Y₀ = A/‖A‖_F, Z₀ = I; T = (3I − ZY)/2; Y ← YT; Z ← TZ`` → ``(A/‖A‖_F)^(-1/2)``."""
    y = a / np.linalg.norm(a)
    z = np.eye(a.shape[0])
    for _ in range(steps):
        t = (3 * np.eye(a.shape[0]) - z @ y) / 2
        y, z = y @ t, t @ z
    return z


def whiten(g: np.ndarray, mode: str, steps: int) -> np.ndarray:
    """``(G Gᵀ)^(-1/2) G`` (rows side, m ≤ n) or ``G (Gᵀ G)^(-1/2)``; 'exact' = ``U Vᵀ``; 'none' = ``G``."""
    if mode == "none":
        return g
    if mode == "exact":
        u, s, vh = np.linalg.svd(g, full_matrices=False)
        return (u * (s > max(g.shape) * 1.2e-7 * s.max())) @ vh
    m, n = g.shape
    if m <= n:
        a = g @ g.T
        return inv_sqrt_newton_schulz(a, steps) @ g / np.sqrt(np.linalg.norm(a))
    a = g.T @ g
    return g @ inv_sqrt_newton_schulz(a, steps) / np.sqrt(np.linalg.norm(a))


class SwanPort:
    """SWAN on a dict of float64 weights (PyTorch orientation); ``step(grads)`` applies one update."""

    def __init__(self, params: dict, *, lr: float, normalize=True, whiten="newton_schulz", ns_steps=10,
                 norm_eps=1e-8, scale=1.0, b1=0.9, b2=0.999, eps=1e-8) -> None:  # fmt: skip
        self.w = {k: np.array(v, np.float64) for k, v in params.items()}
        self.lr, self.normalize, self.mode, self.steps = lr, normalize, whiten, ns_steps
        self.norm_eps, self.scale, self.b1, self.b2, self.eps = norm_eps, scale, b1, b2, eps
        self.m: dict = {}
        self.v: dict = {}
        self.t = 0

    def direction(self, g: np.ndarray) -> np.ndarray:
        x = grad_norm(g, self.norm_eps) if self.normalize else g
        return self.scale * whiten(x, self.mode, self.steps)

    def step(self, grads: dict, probe: object = None) -> None:
        self.t += 1
        for k, g in grads.items():
            g = np.asarray(g, np.float64)
            if g.ndim >= 2:
                self.w[k] = self.w[k] - self.lr * self.direction(g)
                continue
            self.m[k] = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v.get(k, 0.0) + (1 - self.b2) * g * g
            m_hat, v_hat = self.m[k] / (1 - self.b1**self.t), self.v[k] / (1 - self.b2**self.t)
            self.w[k] = self.w[k] - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
