"""LDAdamW (Robert, Safaryan, Modoranu, Alistarh, ICLR 2025, arXiv:2410.16103) in float64 NumPy, PyTorch orientation.

Follows the official ``ldadamw_torch`` step by step: ``left`` / ``right`` projectors of a weight ``(out, in)``,
SVD at the first step and one warm-started power iteration (QR) after, the projection-aware moment update, the
error buffer kept in the gradient (``zero_grad`` leaves it), and plain AdamW for vectors.
"""

from __future__ import annotations

import numpy as np


class LDAdamPort:
    def __init__(self, params: dict, *, lr: float, rank: int, b1=0.908, b2=0.99, eps=1e-8, rho=0.908,
                 proj_type="std", error_feedback=True, weight_decay=0.0) -> None:  # fmt: skip
        self.w = {k: np.array(v, np.float64) for k, v in params.items()}
        self.lr, self.rank, self.b1, self.b2, self.eps, self.rho = lr, rank, b1, b2, eps, rho
        self.ef, self.wd = error_feedback, weight_decay
        self.side: dict = {}
        for k, w in self.w.items():
            if w.ndim < 2:
                continue
            out, inn = w.shape
            right = {"std": out > inn, "reverse_std": out < inn, "input": True, "output": False}[proj_type]
            self.side[k] = "right" if right else "left"
        self.m = {k: (np.zeros(w.shape) if w.ndim < 2 else self._low_zeros(k)) for k, w in self.w.items()}
        self.v = {k: np.zeros_like(m) for k, m in self.m.items()}
        self.proj: dict = dict.fromkeys(self.side)
        self.grad_buf = {k: np.zeros(w.shape) for k, w in self.w.items() if w.ndim == 2}
        self.t = 0

    def _low_zeros(self, k: str) -> np.ndarray:
        out, inn = self.w[k].shape
        return np.zeros((out, self.rank)) if self.side[k] == "right" else np.zeros((self.rank, inn))

    def _project(self, k, p, x):  # noqa: ANN001, ANN202
        return x @ p.T if self.side[k] == "right" else p.T @ x

    def _back(self, k, p, x):  # noqa: ANN001, ANN202
        return x @ p if self.side[k] == "right" else p @ x

    def _power_iteration(self, k, b, init):  # noqa: ANN001, ANN202
        if self.side[k] == "right":
            return np.linalg.qr(b.T @ (b @ init.T))[0].T
        return np.linalg.qr(b @ (b.T @ init))[0]

    def _svd(self, k, a):  # noqa: ANN001, ANN202
        u, _, vh = np.linalg.svd(a, full_matrices=False)
        return vh[: self.rank] if self.side[k] == "right" else u[:, : self.rank]

    def step(self, grads: dict, probe: object = None) -> None:
        t, b1, b2 = self.t, self.b1, self.b2
        for k, g in grads.items():
            g = np.asarray(g, np.float64)
            if g.ndim < 2:  # adamw_step
                self.m[k] = b1 * self.m[k] + (1 - b1) * g
                self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
                d = self.m[k] / (1 - b1 ** (t + 1)) / (np.sqrt(self.v[k] / (1 - b2 ** (t + 1))) + self.eps)
                self.w[k] = self.w[k] - self.lr * d  # the project decays matrices only (weight_decay_mask)
                continue
            grad = g + self.grad_buf[k] if self.ef else g
            prev = self.proj[k]
            if t == 0:
                p = self._svd(k, grad)
                prev = np.zeros_like(p)
            else:
                b = self.rho * self._back(k, prev, self.m[k]) / (1 - b1**t) + (1 - self.rho) * grad
                p = self._power_iteration(k, b, prev)
            low = self._project(k, p, grad)
            if self.ef:
                grad = grad - self._back(k, p, low)
            if self.side[k] == "left":
                change = p.T @ prev
                m_upd = change @ self.m[k]
            else:
                change = prev @ p.T
                m_upd = self.m[k] @ change
            if self.ef:
                grad = grad + b1 / (1 - b1) * self._back(k, prev, self.m[k])
                grad = grad - b1 / (1 - b1) * self._back(k, p, m_upd)
            if t > 0:
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                v = self.v[k] / bc2 - self.m[k] ** 2 / bc1**2
                v = change**2 @ v if self.side[k] == "left" else v @ change**2
                self.v[k] = np.abs(v + m_upd**2 / bc1**2) * bc2
                self.m[k] = m_upd
            self.m[k] = b1 * self.m[k] + (1 - b1) * low
            self.v[k] = b2 * self.v[k] + (1 - b2) * low * low
            d = self.m[k] / (1 - b1 ** (t + 1)) / (np.sqrt(self.v[k] / (1 - b2 ** (t + 1))) + self.eps)
            self.proj[k] = p
            self.grad_buf[k] = grad
            self.w[k] = self.w[k] * (1 - self.lr * self.wd) - self.lr * self._back(k, p, d)
        self.t += 1
