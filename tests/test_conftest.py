"""The suite's own fixtures."""

from __future__ import annotations

import numpy as np

SEED_VARIABLE = "LOWRANK_TEST_SEED"  # tests/conftest.py reads it (a module named conftest is not importable here)


def test_the_rng_fixture_replays_the_seed_it_reports(monkeypatch, request):
    monkeypatch.setenv(SEED_VARIABLE, "12345")
    draws = request.getfixturevalue("rng").standard_normal(4)
    np.testing.assert_array_equal(draws, np.random.default_rng(12345).standard_normal(4))
    sections = [content for _, key, content in request.node._report_sections if key == "seed"]
    assert sections == [f"numpy seed 12345; replay with {SEED_VARIABLE}=12345"]


def test_the_rng_fixture_draws_a_fresh_seed_when_none_is_set(monkeypatch, request):
    monkeypatch.delenv(SEED_VARIABLE, raising=False)
    first = request.getfixturevalue("rng").integers(1 << 62)
    (report,) = [content for _, key, content in request.node._report_sections if key == "seed"]
    seed = int(report.split()[2].rstrip(";"))
    assert first == np.random.default_rng(seed).integers(1 << 62)
