"""The shared argument validators: accepted values, traced values skipped, one error naming the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.optim.checks import check_bool, check_choice, check_int, check_real, is_traced, static_int


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.25), np.int64(1), jnp.asarray(0.75), np.asarray(0.5)])
def test_check_real_accepts_real_scalars_and_returns_the_float(value) -> None:
    assert check_real(value, "x", lo=0.0, hi=1.0) == pytest.approx(float(value))


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        ("0.5", {}, "^x: must be a real number"),
        (True, {}, "^x: must be a real number"),
        (jnp.ones(2), {}, "^x: must be a real number"),
        (float("nan"), {}, "^x: must be finite"),
        (float("inf"), {}, "^x: must be finite"),
        (-0.1, dict(lo=0.0), "^x: must be >= 0.0"),
        (0.0, dict(lo=0.0, lo_open=True), "^x: must be > 0.0"),
        (1.5, dict(hi=1.0), "^x: must be <= 1.0"),
        (1.0, dict(hi=1.0, hi_open=True), "^x: must be < 1.0"),
    ],
)
def test_check_real_errors_name_the_argument(value, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_real(value, "x", **kwargs)


def test_traced_values_are_skipped_and_static_int_names_static_args() -> None:
    seen = []

    @jax.jit
    def f(x, n):
        seen.append((is_traced(x), check_real(x, "x", lo=5.0), check_int(n, "n", lo=5)))
        with pytest.raises(ValueError, match=r"^n: must be static here \(it sets a shape\).*static_args=\('n',\)"):
            static_int(n, "n", "it sets a shape")
        return x

    f(jnp.asarray(1.0), jnp.asarray(1))  # out of range, but only known at run time
    assert seen == [(True, None, None)]
    assert static_int(np.int32(3), "n", "why", lo=1) == 3 and isinstance(static_int(jnp.asarray(3), "n", "why"), int)
    with pytest.raises(ValueError, match="^n: must be >= 4"):
        static_int(3, "n", "why", lo=4)


@pytest.mark.parametrize("value", [3, np.int64(3), jnp.asarray(3, jnp.int32), np.asarray(3, np.uint8)])
def test_check_int_accepts_integers_and_0d_integer_arrays(value) -> None:
    got = check_int(value, "n", lo=3, hi=3)
    assert got == 3 and type(got) is int


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (2.0, "^n: must be an integer"),
        (True, "^n: must be an integer"),
        (np.asarray([3]), "^n: must be an integer"),
        (jnp.asarray(3.0), "^n: must be an integer"),
        (0, "^n: must be >= 1, got 0"),
        (11, "^n: must be <= 10, got 11"),
    ],
)
def test_check_int_errors_name_the_argument(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_int(value, "n", lo=1, hi=10)


def test_check_choice_and_check_bool() -> None:
    check_choice("b", "mode", ("a", "b"))
    with pytest.raises(ValueError, match=r"^mode: unknown value 'c'; expected one of 'a', 'b'$"):
        check_choice("c", "mode", ("a", "b"))
    with pytest.raises(ValueError, match=r"^mode: unknown value 'A'; expected one of 'a', 'b' \(lower case\)$"):
        check_choice("A", "mode", ("a", "b"), hints={"A": "lower case"})
    with pytest.raises(ValueError, match=r"^mode: unknown value \['a'\]"):
        check_choice(["a"], "mode", ("a", "b"), hints={"A": "lower case"})  # unhashable: no hint lookup
    check_bool(False, "flag")
    for bad in (0, "yes", np.bool_(True)):
        with pytest.raises(ValueError, match="^flag: must be a bool"):
            check_bool(bad, "flag")
