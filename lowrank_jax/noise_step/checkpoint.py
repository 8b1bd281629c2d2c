"""Seed-only checkpoints of noise_step: the init seed, the per-step terns packed 5 per byte, the stage changes.

:func:`replay` regenerates every perturbation from (seed, step, i) and re-applies every update: the trained
weights come back bit-exactly from a few bytes per step, without data or forward passes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.noise_step.update import Layout, NoiseStepConfig, Params, apply_update, init_ternary, perturbations


def pack_terns(terns: np.ndarray) -> np.ndarray:
    """Pack terns in {−1, 0, 1} five per byte (base 3, 3⁵ = 243 ≤ 256) along the last axis."""
    t = np.asarray(terns)
    if t.size and (t.min() < -1 or t.max() > 1):
        raise ValueError("terns: values must be in {-1, 0, 1}")
    n = t.shape[-1]
    pad = (-n) % 5
    d = np.pad(t.astype(np.int64) + 1, [(0, 0)] * (t.ndim - 1) + [(0, pad)], constant_values=1)
    d = d.reshape(*t.shape[:-1], -1, 5)
    return (d * (3 ** np.arange(5))).sum(-1).astype(np.uint8)


def unpack_terns(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_terns`: the first ``n`` terns (int8) of each row."""
    p = np.asarray(packed)
    if p.dtype != np.uint8:
        raise ValueError(f"packed: expected uint8, got {p.dtype}")
    if p.size and p.max() > 242:
        raise ValueError("packed: bytes above 242 are not 5-tern codes")
    if n < 0 or n > 5 * p.shape[-1]:
        raise ValueError(f"n: {n} terns do not fit {p.shape[-1]} bytes")
    d = (p[..., None].astype(np.int64) // (3 ** np.arange(5))) % 3
    return (d.reshape(*p.shape[:-1], -1)[..., :n] - 1).astype(np.int8)


@dataclass(frozen=True)
class SeedCheckpoint:
    """A whole noise_step model: config (seed included), kernel shapes, per-step terns and stage changes."""

    cfg: NoiseStepConfig
    shapes: tuple[tuple[str, tuple[int, int]], ...]
    terns_packed: np.ndarray  # (steps, ceil(n/5)) uint8
    stage_starts: tuple[int, ...]  # step at which stage k began (stage 0 at 0); len ≤ len(densities)

    @property
    def steps(self) -> int:
        return int(self.terns_packed.shape[0])

    def stages(self) -> np.ndarray:
        """The density stage of every step."""
        s = np.zeros(self.steps, np.int32)
        for k, start in enumerate(self.stage_starts[1:], 1):
            s[start:] = k
        return s

    def to_bytes(self) -> bytes:
        """``header length (u32) | JSON header | packed terns``."""
        c = self.cfg
        header = json.dumps(
            {
                "n": c.num_perturbations,
                "chunk": c.chunk_size,
                "densities": c.densities,
                "thresholds": c.loss_thresholds,
                "seed": c.seed,
                "capacity": c.capacity,
                "shapes": [[n, list(s)] for n, s in self.shapes],
                "steps": self.steps,
                "stage_starts": list(self.stage_starts),
            },
            separators=(",", ":"),
        ).encode()
        return struct.pack("<I", len(header)) + header + np.ascontiguousarray(self.terns_packed).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> SeedCheckpoint:
        (hlen,) = struct.unpack("<I", data[:4])
        h = json.loads(data[4 : 4 + hlen])
        cfg = NoiseStepConfig(
            num_perturbations=h["n"],
            chunk_size=h["chunk"],
            densities=tuple(h["densities"]),
            loss_thresholds=tuple(h["thresholds"]),
            seed=h["seed"],
            capacity=h["capacity"],
        )
        width = -(-cfg.num_perturbations // 5)
        terns = np.frombuffer(data[4 + hlen :], np.uint8).reshape(h["steps"], width)
        shapes = tuple((n, tuple(s)) for n, s in h["shapes"])
        return cls(cfg, shapes, terns.copy(), tuple(h["stage_starts"]))


def make_checkpoint(cfg: NoiseStepConfig, params: Params, terns: np.ndarray, stages: np.ndarray) -> SeedCheckpoint:
    """A :class:`SeedCheckpoint` from a run's logged terns ``(steps, n)`` and per-step stages ``(steps,)``."""
    t, s = np.asarray(terns), np.asarray(stages)
    if t.ndim != 2 or t.shape[1] != cfg.num_perturbations:
        raise ValueError(f"terns: expected (steps, {cfg.num_perturbations}), got {t.shape}")
    if s.shape != (t.shape[0],) or (s.size and (np.any(np.diff(s) < 0) or s[0] != 0)):
        raise ValueError("stages: expected one non-decreasing stage per step, starting at 0")
    starts = [0] + [int(np.argmax(s >= k)) for k in range(1, int(s.max(initial=0)) + 1)]
    shapes = tuple((n, tuple(int(d) for d in params[n].shape)) for n in sorted(params))
    return SeedCheckpoint(cfg, shapes, pack_terns(t), tuple(starts))


def replay(ckpt: SeedCheckpoint) -> Params:
    """Reconstruct the trained weights from a seed checkpoint (bit-exact; no data, no forward pass)."""
    cfg = ckpt.cfg
    shapes = dict(ckpt.shapes)
    params = init_ternary(cfg, shapes)
    layout = Layout.of(params)
    terns = jnp.asarray(unpack_terns(ckpt.terns_packed, cfg.num_perturbations))
    stages = jnp.asarray(ckpt.stages())

    def body(p, xs):
        step, t, stage = xs
        pos, val = perturbations(cfg, layout, step, stage)
        return apply_update(p, layout, pos, val, t), None

    run = jax.jit(lambda p: jax.lax.scan(body, p, (jnp.arange(ckpt.steps, dtype=jnp.int32), terns, stages))[0])
    return run(params)


def checkpoint_sizes(ckpt: SeedCheckpoint) -> dict[str, int]:
    """Bytes of the seed checkpoint vs the same weights stored dense at 2 bits and in float32."""
    p = sum(a * b for _, (a, b) in ckpt.shapes)
    return {
        "params": p,
        "seed_checkpoint_bytes": len(ckpt.to_bytes()),
        "dense_ternary_2bit_bytes": -(-p // 4),
        "float32_bytes": 4 * p,
    }
