"""The comparison table's paired statistics (experiments/stats.py) against hand computations.

The Student-t quantiles and tail probabilities for 1 and 2 degrees of freedom have closed forms (1: the
Cauchy distribution; 2: F(t) = 1/2 + t / (2 sqrt(t^2 + 2))), so these checks do not go through scipy.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture()
def stats(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import stats

    return stats


def t_quantile_df2(q: float) -> float:
    a = 2.0 * q - 1.0
    return a * math.sqrt(2.0 / (1.0 - a * a))


def two_sided_p_df2(t: float) -> float:
    return 1.0 - abs(t) / math.sqrt(t * t + 2.0)


def test_three_seeds_by_hand(stats):
    """Three seeds: d = (0.05, 0.02, 0.08), mean 0.05, sd 0.03, se 0.03 / sqrt(3), df 2."""
    base = {0: 3.00, 1: 3.01, 2: 3.02}
    method = {0: 3.05, 1: 3.03, 2: 3.10}
    p = stats.paired(method, base)
    se = 0.03 / math.sqrt(3.0)
    half = t_quantile_df2(0.975) * se  # 4.3027 * 0.017321 = 0.074524
    assert p.n == 3 and p.keys == (0, 1, 2)
    assert p.mean == pytest.approx(0.05, abs=1e-12) and p.sd == pytest.approx(0.03, abs=1e-12)
    assert (p.lo, p.hi) == pytest.approx((0.05 - half, 0.05 + half), abs=1e-12)
    assert half == pytest.approx(0.074524, abs=1e-6)
    assert p.p == pytest.approx(two_sided_p_df2(0.05 / se), abs=1e-12)  # t = 2.8868, p = 0.10197
    assert p.p == pytest.approx(0.10197, abs=1e-5)
    assert (p.ratio, p.ratio_lo, p.ratio_hi) == pytest.approx((math.exp(0.05), math.exp(p.lo), math.exp(p.hi)))
    # the ratio is the geometric mean of the seeds' perplexity ratios
    seeds = [math.exp(method[s]) / math.exp(base[s]) for s in base]
    assert p.ratio == pytest.approx(math.prod(seeds) ** (1 / 3), rel=1e-12)
    d = p.to_dict()
    assert d["n"] == 3 and d["ci"] == [p.lo, p.hi] and d["ratio_ci"] == [p.ratio_lo, p.ratio_hi] and d["level"] == 0.95


def test_only_shared_keys_pair_and_two_pairs_use_one_degree_of_freedom(stats):
    """Seed 2 only in the method and seed 3 only in the baseline: two pairs, d = (0.1, 0.3); the 90% CI with
    1 degree of freedom uses the Cauchy quantile tan(pi (q - 1/2))."""
    method = {(0, 256): 3.1, (1, 256): 3.3, (2, 256): 9.0}
    base = {(0, 256): 3.0, (1, 256): 3.0, (3, 256): 1.0, (2, 512): 3.0}
    p = stats.paired(method, base, level=0.9)
    assert p.keys == ((0, 256), (1, 256)) and p.level == 0.9
    sd = math.sqrt(((0.1 - 0.2) ** 2 + (0.3 - 0.2) ** 2) / 1)
    half = math.tan(math.pi * (0.95 - 0.5)) * sd / math.sqrt(2.0)
    assert p.mean == pytest.approx(0.2) and (p.lo, p.hi) == pytest.approx((0.2 - half, 0.2 + half))
    t = 0.2 / (sd / math.sqrt(2.0))
    assert p.p == pytest.approx(1.0 - 2.0 / math.pi * math.atan(t))


def test_against_numpy_and_the_t_table_on_random_seeds(rng, stats):
    """Five seeds drawn fresh: mean and sd as numpy computes them, the quantile from the t table (df 4: 2.776)."""
    base = rng.uniform(2.9, 3.1, 5)
    method = base + rng.normal(0.03, 0.02, 5)
    p = stats.paired(dict(enumerate(method)), dict(enumerate(base)))
    d = method - base
    half = 2.7764451051977987 * d.std(ddof=1) / math.sqrt(5)
    assert p.mean == pytest.approx(d.mean(), rel=1e-12) and p.sd == pytest.approx(d.std(ddof=1), rel=1e-12)
    assert (p.lo, p.hi) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-9)


def test_goal_verdicts_follow_the_interval(stats):
    p = stats.paired({0: 3.05, 1: 3.03, 2: 3.10}, {0: 3.00, 1: 3.01, 2: 3.02})  # ratio CI 0.976-1.133
    assert (round(p.ratio_lo, 3), round(p.ratio_hi, 3)) == (0.976, 1.133)
    assert stats.verdict(p, 1.14) == "met"  # the upper end under the goal
    assert stats.verdict(p, 1.10) == "undecided"  # the point estimate (1.051) under it is not enough
    assert stats.verdict(p, 0.97) == "missed"  # the lower end above it
    assert stats.verdict(None, 1.05) == "undecided"


def test_what_has_no_interval(stats):
    assert stats.paired({0: 3.0}, {0: 2.9}) is None  # one pair
    assert stats.paired({0: 3.0, 1: math.inf}, {0: 2.9, 1: 2.9}) is None  # a diverged run
    assert stats.paired({0: 3.0, 1: 3.1}, {2: 2.9, 3: 2.9}) is None  # no shared seed
    same = stats.paired({0: 3.5, 1: 3.75}, {0: 3.25, 1: 3.5})  # no spread: a point, p undefined
    assert same.lo == pytest.approx(same.hi) and math.isnan(same.p)
    for level in (0.0, 1.0, 95):
        with pytest.raises(ValueError, match="level"):
            stats.paired({0: 3.0, 1: 3.1}, {0: 2.9, 1: 3.0}, level=level)
