"""Q-GaLore (Zhang et al., arXiv:2407.08296) in float64 NumPy, PyTorch orientation, after the official
``q_galore_torch``: ``GaLoreProjector.project`` (SVD at ``iter % update_proj_gap == 0``, the signed cosine queue and
the interval growth, ``_quantize`` of the projector), ``project_back`` with ``scale``, and the Adam of
bitsandbytes' ``optimizer_update_32bit`` (eps after the bias correction), which the official 8-bit AdamW runs on
tensors under 4096 values. Fresh SVD projectors take our column signs (``probe``: our dequantized projectors),
because the cosine queue is signed.
"""

from __future__ import annotations

import numpy as np


def quantize(w: np.ndarray, group: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official ``_quantize`` (groups of ``group`` row-major values; a short tail zero-padded)."""
    flat = w.reshape(-1)
    flat = np.concatenate([flat, np.zeros(-flat.size % group)]).reshape(-1, group)
    hi, lo = flat.max(axis=1, keepdims=True), flat.min(axis=1, keepdims=True)
    top = 2**bits - 1
    scales = np.maximum(hi - lo, 1e-5) / top
    zeros = np.clip(-np.round(lo / scales), 0, top)
    return np.clip(np.round(flat / scales) + zeros, 0, top), scales, zeros


def dequantize(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, shape: tuple) -> np.ndarray:
    return (scales * (q - zeros)).reshape(-1)[: int(np.prod(shape))].reshape(shape)


class Projector:
    def __init__(self, rank: int, gap: int, scale: float, quant: bool, bits: int, group: int,
                 cos_threshold: float, gamma: float, queue_size: int, right: bool) -> None:  # fmt: skip
        self.rank, self.gap, self.scale, self.quant, self.bits, self.group = rank, gap, scale, quant, bits, group
        self.thr, self.gamma, self.qsize, self.right = cos_threshold, gamma, queue_size, right
        self.matrix = None
        self.past = None
        self.queue: list[float] = []

    def project(self, g: np.ndarray, it: int, ours: np.ndarray) -> np.ndarray:
        if self.matrix is None or it % self.gap == 0:
            u, _, vh = np.linalg.svd(g, full_matrices=False)
            f = vh[: self.rank] if self.right else u[:, : self.rank]
            # our column signs (ours: the dequantized projector in the same layout)
            axis = 1 if self.right else 0
            sign = np.sign(np.sum(f * ours, axis=axis, keepdims=True))
            f = f * np.where(sign == 0, 1, sign)
            vec = (f[:1, :] if self.right else f[:, :1]).reshape(-1)
            if self.past is not None:
                if len(self.queue) == self.qsize:
                    self.queue.pop(0)
                cos = vec @ self.past / max(np.linalg.norm(vec) * np.linalg.norm(self.past), 1e-8)
                self.queue.append(cos)
                if len(self.queue) == self.qsize and sum(self.queue) / self.qsize >= self.thr:
                    self.gap = int(self.gap * self.gamma)
            self.past = vec
            self.matrix = dequantize(*quantize(f, self.group, self.bits), f.shape) if self.quant else f
        return g @ self.matrix.T if self.right else self.matrix.T @ g

    def project_back(self, low: np.ndarray) -> np.ndarray:
        return self.scale * (low @ self.matrix if self.right else self.matrix @ low)


class QGaLorePort:
    def __init__(self, params: dict, *, lr: float, rank: int, update_proj_gap=200, scale=0.25, proj_quant=True,
                 proj_bits=4, proj_group_size=256, cos_threshold=0.4, gamma_proj=2, queue_size=5, b1=0.9, b2=0.95,
                 eps=1e-8) -> None:  # fmt: skip
        self.w = {k: np.array(v, np.float64) for k, v in params.items()}
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.proj = {
            k: Projector(min(rank, *w.shape), update_proj_gap, scale, proj_quant, proj_bits, proj_group_size,
                         cos_threshold, gamma_proj, queue_size, right=w.shape[0] >= w.shape[1])
            for k, w in self.w.items() if w.ndim == 2
        }  # fmt: skip
        self.m: dict = {}
        self.v: dict = {}
        self.t = 0

    def adam(self, k: str, g: np.ndarray) -> np.ndarray:
        self.m[k] = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * g
        self.v[k] = self.b2 * self.v.get(k, 0.0) + (1 - self.b2) * g * g
        c1, c2 = 1 - self.b1 ** (self.t + 1), np.sqrt(1 - self.b2 ** (self.t + 1))
        return c2 / c1 * self.m[k] / (np.sqrt(self.v[k]) + self.eps * c2)

    def step(self, grads: dict, probe: dict | None = None) -> None:
        for k, g in grads.items():
            g = np.asarray(g, np.float64)
            if k not in self.proj:
                self.w[k] = self.w[k] - self.lr * self.adam(k, g)
                continue
            low = self.proj[k].project(g, self.t, probe[k])
            self.w[k] = self.w[k] - self.lr * self.proj[k].project_back(self.adam(k, low))
        self.t += 1
