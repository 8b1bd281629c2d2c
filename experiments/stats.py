"""Paired statistics of the comparison table: each method against the baseline over the seeds both ran.

Two runs with the same seed start from the same initialisation and see the same batches in the same
order (``lowrank_jax.train.loop``: the state and the data order both come from ``cfg.seed``), so the
seed-to-seed spread they share cancels in their difference. For the seeds ``s = 1..n`` that a method and
the baseline share, evaluated on the same validation tokens:

    d_s  = L_method,s - L_baseline,s            final validation loss, nats per token
    mean = (1/n) sum_s d_s,  sd = sqrt(sum_s (d_s - mean)^2 / (n - 1)),  se = sd / sqrt(n)
    95% CI:  mean -+ t_{0.975, n-1} * se         (Student t, n - 1 degrees of freedom)
    p:       2 * P(T_{n-1} > |mean| / se)        (two-sided paired t test of "no difference")

Perplexity is ``exp(loss)``, so ``exp(d_s)`` is seed ``s``'s perplexity ratio and ``exp(mean)`` their
geometric mean; the ratio's CI is ``exp`` of the difference's CI (exp is increasing). Goals are stated as
a perplexity ratio to the baseline ("≤ 1.05×"): a goal is **met** only when the ratio CI's upper end is
under it, **missed** when its lower end is above it, and **undecided** otherwise.

Student, "The probable error of a mean", Biometrika 6(1), 1908 (the t distribution); the paired design
as in Fisher, "Statistical Methods for Research Workers", 1925, ch. V.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from scipy import stats as scipy_stats

LEVEL = 0.95


@dataclass(frozen=True)
class Paired:
    """The paired difference (method − baseline) in final validation loss over ``n`` shared seeds."""

    keys: tuple[Hashable, ...]  # the pairs' keys (seed, and what else must match), sorted
    mean: float  # nats
    sd: float  # sample standard deviation of the differences (n - 1 in the denominator)
    lo: float  # the CI of the mean difference at ``level``
    hi: float
    p: float  # two-sided; NaN when the differences have no spread
    level: float = LEVEL

    @property
    def n(self) -> int:
        return len(self.keys)

    @property
    def ratio(self) -> float:
        """The geometric mean over the seeds of the perplexity ratio, ``exp(mean)``."""
        return math.exp(self.mean)

    @property
    def ratio_lo(self) -> float:
        return math.exp(self.lo)

    @property
    def ratio_hi(self) -> float:
        return math.exp(self.hi)

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "pairs": [list(k) if isinstance(k, tuple) else k for k in self.keys],
            "mean_diff": self.mean,
            "sd_diff": self.sd,
            "ci": [self.lo, self.hi],
            "ratio": self.ratio,
            "ratio_ci": [self.ratio_lo, self.ratio_hi],
            "p": self.p,
            "level": self.level,
        }


def p_text(p: float | None) -> str:
    """A p value as the tables print it: ``'-'`` for none (or NaN), ``'< 0.001'``, else three decimals."""
    if p is None or math.isnan(p):
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def paired(method: Mapping[Hashable, float], baseline: Mapping[Hashable, float], level: float = LEVEL) -> Paired | None:
    """The paired difference ``method[k] - baseline[k]`` over the keys both have, or None for fewer than two
    pairs or a non-finite loss among them (a diverged run: no interval describes it).

    A key is what two runs must share to be a pair: the seed, with whatever else must match (e.g. the
    validation tokens they were evaluated on); keys of one kind, so that they sort.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a probability in (0, 1), got {level}")
    keys = tuple(sorted(set(method) & set(baseline)))
    d = [method[k] - baseline[k] for k in keys]
    if len(d) < 2 or not all(math.isfinite(x) for x in d):
        return None
    n = len(d)
    mean = math.fsum(d) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * se
    p = float(2.0 * scipy_stats.t.sf(abs(mean) / se, n - 1)) if se > 0 else math.nan
    return Paired(keys, mean, sd, mean - half, mean + half, p, level)


def verdict(p: Paired | None, goal: float) -> str:
    """``'met'`` when the ratio CI's upper end is under ``goal``, ``'missed'`` when its lower end is above it,
    ``'undecided'`` otherwise (and without an interval)."""
    if p is None:
        return "undecided"
    if p.ratio_hi < goal:
        return "met"
    if p.ratio_lo > goal:
        return "missed"
    return "undecided"
