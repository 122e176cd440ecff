"""Tests for ft_keras.schedules: drop-fraction decay and update steps (hand-computed values)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from ft_keras.schedules import (
    DECAYS,
    check_decay,
    drop_fraction,
    is_update_step,
    update_steps,
)


# ----------------------------------------------------------------------------- check_decay
@pytest.mark.parametrize(
    "name, normalised",
    [
        ("constant", "constant"),
        ("cosine", "cosine"),
        ("Cosine", "cosine"),
        ("CONSTANT", "constant"),
    ],
)
def test_check_decay_normalises(name, normalised):
    assert check_decay(name) == normalised


@pytest.mark.parametrize("bad", ["linear", "cos", ""])
def test_check_decay_rejects(bad):
    with pytest.raises(ValueError, match="decay"):
        check_decay(bad)


@pytest.mark.parametrize("bad", [None, 3, ("cosine",)])
def test_check_decay_rejects_non_strings_with_type_error(bad):
    with pytest.raises(TypeError, match="decay"):
        check_decay(bad)


def test_drop_fraction_rejects_unknown_decay():
    with pytest.raises(ValueError, match="decay"):
        drop_fraction(10, 0.3, decay="exponential", end_step=100)


def test_decays_tuple():
    assert set(DECAYS) == {"constant", "cosine"}


# ----------------------------------------------------------------------------- drop_fraction
@pytest.mark.parametrize("step", [0, 1, 50, 100, 10**7])
def test_constant_is_initial(step):
    assert drop_fraction(step, 0.3, decay="constant") == 0.3
    assert drop_fraction(step, 0.5, decay="constant", end_step=100, final=0.005) == 0.5


def test_constant_tensor():
    value = drop_fraction(tf.constant(123), 0.3, decay="constant")
    assert tf.is_tensor(value) and value.dtype == tf.float64  # float64: no float32 rounding of p * n
    assert float(value) == pytest.approx(0.3, abs=1e-15)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.3),
        (25, 0.15 * (1.0 + math.sqrt(0.5))),  # cos(pi/4)
        (50, 0.15),
        (75, 0.15 * (1.0 - math.sqrt(0.5))),
        (100, 0.0),
        (101, 0.0),  # clipped past end_step
        (10_000, 0.0),
        (-10, 0.3),  # clipped below 0
    ],
)
def test_cosine_rigl(step, expected):
    assert drop_fraction(step, 0.3, decay="cosine", end_step=100) == pytest.approx(
        expected, abs=1e-12
    )


def test_cosine_is_default_decay():
    assert drop_fraction(50, 0.3, end_step=100) == pytest.approx(0.15, abs=1e-12)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.5),
        (500, 0.005 + 0.495 * 0.5),  # 0.2525
        (1000, 0.005),
        (2000, 0.005),
        (250, 0.005 + 0.495 * 0.5 * (1.0 + math.sqrt(0.5))),
    ],
)
def test_cosine_with_final(step, expected):
    value = drop_fraction(step, 0.5, decay="cosine", end_step=1000, final=0.005)
    assert value == pytest.approx(expected, abs=1e-12)


def test_cosine_is_monotone_non_increasing():
    values = [drop_fraction(t, 0.5, "cosine", 300, 0.005) for t in range(0, 400)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(0.5) and values[-1] == pytest.approx(0.005)


@pytest.mark.parametrize("end_step", [None, 0, -5])
def test_cosine_needs_positive_end_step(end_step):
    with pytest.raises(ValueError, match="end_step"):
        drop_fraction(10, 0.3, decay="cosine", end_step=end_step)
    with pytest.raises(ValueError, match="end_step"):
        drop_fraction(tf.constant(10), 0.3, decay="cosine", end_step=end_step)


@pytest.mark.parametrize(
    "initial, end_step, final", [(0.3, 100, 0.0), (0.5, 1000, 0.005), (0.8, 37, 0.1)]
)
@pytest.mark.parametrize("dtype", [tf.int32, tf.int64])
def test_cosine_tensor_matches_python(initial, end_step, final, dtype):
    steps = list(range(-5, 2 * end_step, max(1, end_step // 20))) + [end_step, end_step + 1]
    for step in steps:
        expected = drop_fraction(step, initial, "cosine", end_step, final)
        value = drop_fraction(tf.constant(step, dtype), initial, "cosine", end_step, final)
        assert tf.is_tensor(value)
        assert float(value) == pytest.approx(expected, abs=1e-6), step


def test_cosine_tensor_in_tf_function():
    @tf.function
    def schedule(step):
        return drop_fraction(step, 0.3, "cosine", 100)

    assert float(schedule(tf.constant(50, tf.int64))) == pytest.approx(0.15, abs=1e-6)
    assert float(schedule(tf.constant(200, tf.int64))) == pytest.approx(0.0, abs=1e-6)


def test_module_docstring_example():
    assert drop_fraction(50, initial=0.3, decay="cosine", end_step=100) == pytest.approx(0.15)
    assert is_update_step(200, update_every=100, end_step=1000) is True


# ----------------------------------------------------------------------------- is_update_step
@pytest.mark.parametrize(
    "step, kwargs, expected",
    [
        (0, {}, False),  # step 0 is not > start_step 0
        (99, {}, False),
        (100, {}, True),
        (101, {}, False),
        (199, {}, False),
        (200, {}, True),
        (10**6, {}, True),  # no end
        (900, {"end_step": 1000}, True),
        (999, {"end_step": 1000}, False),
        (1000, {"end_step": 1000}, False),  # end_step is exclusive
        (1100, {"end_step": 1000}, False),
        (1000, {"end_step": 1001}, True),
        (200, {"start_step": 200}, False),  # start_step is exclusive
        (300, {"start_step": 200}, True),
        (300, {"start_step": 250}, True),
        (200, {"start_step": 250}, False),
        (500, {"start_step": 200, "end_step": 500}, False),
        (400, {"start_step": 200, "end_step": 500}, True),
        (-100, {}, False),
    ],
)
def test_is_update_step_python(step, kwargs, expected):
    assert is_update_step(step, 100, **kwargs) is expected


def test_is_update_step_every_step():
    assert [t for t in range(0, 6) if is_update_step(t, 1, end_step=4)] == [1, 2, 3]


@pytest.mark.parametrize(
    "every, end_step, start_step",
    [(100, None, 0), (100, 750, 0), (7, 50, 10), (1, None, 0), (3, 31, 3), (100, 1000, 250)],
)
@pytest.mark.parametrize("dtype", [tf.int32, tf.int64])
def test_is_update_step_tensor_matches_python(every, end_step, start_step, dtype):
    steps = np.arange(-3, 1201)
    python = np.array([is_update_step(int(t), every, end_step, start_step) for t in steps])
    # Vector of steps in one call ...
    vector = is_update_step(tf.constant(steps, dtype), every, end_step, start_step)
    assert vector.dtype == tf.bool
    np.testing.assert_array_equal(vector.numpy(), python)
    # ... and a few scalar tensors.
    for t in (0, every, 2 * every, every + 1, start_step, start_step + every):
        if end_step is not None:
            t = min(t, end_step + every)
        scalar = is_update_step(tf.constant(t, dtype), every, end_step, start_step)
        assert scalar.shape == () and bool(scalar) == is_update_step(t, every, end_step, start_step)


def test_is_update_step_tensor_in_tf_function():
    @tf.function
    def check(step):
        return is_update_step(step, 100, end_step=1000, start_step=100)

    assert not bool(check(tf.constant(100, tf.int64)))
    assert bool(check(tf.constant(200, tf.int64)))
    assert not bool(check(tf.constant(1000, tf.int64)))


# ----------------------------------------------------------------------------- update_steps
@pytest.mark.parametrize(
    "args, kwargs, expected",
    [
        ((1000, 100), {}, [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]),
        ((1000, 100), {"end_step": 750}, [100, 200, 300, 400, 500, 600, 700]),
        ((1000, 100), {"end_step": 700}, [100, 200, 300, 400, 500, 600]),
        ((1000, 100), {"start_step": 300}, [400, 500, 600, 700, 800, 900, 1000]),
        ((1050, 100), {"start_step": 250, "end_step": 800}, [300, 400, 500, 600, 700]),
        ((99, 100), {}, []),
        ((100, 100), {}, [100]),
        ((20, 3), {"end_step": 15, "start_step": 3}, [6, 9, 12]),
        ((5, 1), {}, [1, 2, 3, 4, 5]),
        ((0, 1), {}, []),
    ],
)
def test_update_steps_hand(args, kwargs, expected):
    assert update_steps(*args, **kwargs) == expected


def test_update_steps_matches_is_update_step():
    for every, end_step, start_step in [(7, 60, 0), (10, None, 25), (4, 41, 8)]:
        expected = [t for t in range(1, 101) if is_update_step(t, every, end_step, start_step)]
        assert update_steps(100, every, end_step, start_step) == expected


if __name__ == "__main__":  # bazel test / python tests/test_schedules.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
