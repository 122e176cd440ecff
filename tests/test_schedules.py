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


# ------------------------------------------------------------------------ schedule objects
from ft_keras import schedules  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.parametrize("schedule", [
    schedules.ConstantDrop(update_every=50, drop_fraction=0.5, start_step=10),
    schedules.CosineDrop(update_every=100, drop_fraction=0.3, end_step=1000,
                         final_drop_fraction=0.01),
])
def test_schedule_objects_round_trip_their_config(schedule):
    config = schedule.get_config()
    again = type(schedule).from_config(config)
    assert again == schedule and hash(again) == hash(schedule)
    assert schedules.get(schedules.serialize(schedule)) == schedule
    assert schedules.get(schedule) is schedule
    assert repr(schedule).startswith(type(schedule).__name__ + "(")


def test_schedule_objects_agree_with_the_functions():
    cosine = schedules.CosineDrop(update_every=100, drop_fraction=0.3, end_step=1000)
    for step in (1, 100, 500, 999, 1000):
        is_update, fraction = cosine(step)
        assert is_update == is_update_step(step, 100, end_step=1000)
        assert fraction == pytest.approx(drop_fraction(step, 0.3, "cosine", 1000))
    assert cosine.update_steps(1000) == list(range(100, 1000, 100))
    is_update, fraction = cosine(tf.constant(500, tf.int64))
    assert bool(is_update) and float(fraction) == pytest.approx(0.15)
    constant = schedules.ConstantDrop(update_every=3, drop_fraction=0.5)
    assert constant(6) == (True, 0.5) and constant(7) == (False, 0.5)


def test_cosine_schedule_needs_an_end_step_to_be_evaluated():
    cosine = schedules.CosineDrop(update_every=10, drop_fraction=0.3)
    with pytest.raises(ValueError, match="end_step=None"):
        cosine(5)
    assert cosine.with_end_step(100)(50) == (True, pytest.approx(0.15))


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(update_every=0), ValueError, "update_every=0"),
    (dict(update_every=2.0), TypeError, "update_every"),
    (dict(drop_fraction=0.0), ValueError, "drop_fraction=0.0"),
    (dict(start_step=6, end_step=4), ValueError, "start_step=6 must be smaller than end_step=4"),
    (dict(start_step=5, end_step=5), ValueError, "start_step=5"),
    (dict(update_every=10, start_step=15, end_step=20), ValueError,
     "end_step=20 leaves no mask update.*20"),
    (dict(start_step=-1), ValueError, "start_step=-1"),
])
def test_schedule_objects_refuse_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        schedules.ConstantDrop(**kwargs)


def test_schedules_get_refuses_unknown_identifiers():
    with pytest.raises(ValueError, match="is not a schedule"):
        schedules.get({"class_name": "Linear", "config": {}})
    with pytest.raises(TypeError, match="schedule must be a DropSchedule"):
        schedules.serialize("cosine")


def test_edst_plan_object():
    plan = schedules.EDSTPlan(exploration_epochs=2, refine_epochs=4, num_tickets=3,
                              exploration_lr=0.05, refine_lr=[0.02, 0.002], refine_lr_switch=0.25)
    assert plan.total_epochs == 14 and plan.global_exploration_epochs == [6, 10]
    assert [plan.learning_rate(e) for e in (0, 2, 3, 6, 7, 13, 20)] == [
        0.05, 0.02, 0.002, 0.02, 0.002, 0.002, 0.002]
    assert plan.phase_at(5) == ("refinement", 1, 2, 6)
    assert schedules.EDSTPlan.from_config(plan.get_config()) == plan
    with pytest.raises(TypeError, match="refine_lr must be a pair"):
        schedules.EDSTPlan(1, 1, refine_lr=0.01)
    with pytest.raises(ValueError, match=r"refine_lr\[1\]=0"):
        schedules.EDSTPlan(1, 1, refine_lr=(0.01, 0))
    with pytest.raises(TypeError, match="num_tickets"):
        schedules.EDSTPlan(1, 1, num_tickets=2.0)


def test_edst_plan_jump_learning_rate():
    plan = schedules.EDSTPlan(exploration_epochs=1, refine_epochs=4, num_tickets=3,
                              jump_lr=0.05, jump_lr_epochs=2)
    assert [plan.learning_rate(e) for e in range(13)] == [
        0.1, 0.01, 0.01, 0.001, 0.001, 0.05, 0.05, 0.001, 0.001, 0.05, 0.05, 0.001, 0.001]
    with pytest.raises(ValueError, match="jump_lr_epochs=5"):
        schedules.EDSTPlan(1, 4, jump_lr=0.05, jump_lr_epochs=5)


# ---------------------------------------------------------------- in-graph evaluation, user schedules
class _Halving(schedules.DropSchedule):
    """p_t = p_0 / 2 ** (updates before t): the example of DropSchedule's docstring."""

    def drop_fraction_in_graph(self, step, values):
        done = (step - values["start_step"] - 1) // values["update_every"]
        return values["drop_fraction"] * tf.pow(tf.constant(0.5, tf.float64),
                                                tf.cast(done, tf.float64))


class _Stepped(schedules.DropSchedule):
    """A user schedule with a number of its own: p_0 until ``switch_step``, then ``late``."""

    def __init__(self, update_every=100, drop_fraction=0.3, end_step=None, start_step=0,
                 late=0.1, switch_step=500):
        super().__init__(update_every, drop_fraction, end_step, start_step)
        self.late, self.switch_step = late, switch_step

    def numbers(self):
        return dict(super().numbers(), late=float(self.late), switch_step=int(self.switch_step))

    def drop_fraction_in_graph(self, step, values):
        return tf.where(step < values["switch_step"], values["drop_fraction"], values["late"])

    def get_config(self):
        return dict(super().get_config(), late=self.late, switch_step=self.switch_step)


def _values(schedule):
    return {name: tf.constant(value, tf.int64 if isinstance(value, int) else tf.float64)
            for name, value in schedule.numbers().items()}


def test_user_schedule_is_evaluated_from_its_tensor_method():
    halving = _Halving(update_every=100, drop_fraction=0.4, start_step=100)
    # steps 200, 300, 400, 450: 0, 1, 2, 3 updates before them -> 0.4, 0.2, 0.1, 0.05
    assert [halving(t) for t in (200, 300, 400, 450)] == [
        (True, 0.4), (True, 0.2), (True, 0.1), (False, 0.05)]
    assert halving(100) == (False, pytest.approx(0.8))  # at start_step: no update
    fraction = halving.drop_fraction_at(tf.constant(300, tf.int64))
    assert fraction.dtype == tf.float64 and float(fraction) == 0.2
    assert halving.decay is None and not halving.needs_end_step
    assert _Halving.from_config(halving.get_config()) == halving
    stepped = _Stepped(update_every=10, drop_fraction=0.5, late=0.25, switch_step=40)
    assert [stepped(t)[1] for t in (10, 30, 40, 90)] == [0.5, 0.5, 0.25, 0.25]
    assert stepped.with_end_step(50).end_step == 50 and stepped.with_end_step(50).late == 0.25


def test_numbers_and_graph_signature():
    cosine = schedules.CosineDrop(update_every=10, drop_fraction=0.3, final_drop_fraction=0.01)
    assert cosine.numbers() == {"update_every": 10, "start_step": 0, "end_step": -1,
                                "drop_fraction": 0.3, "final_drop_fraction": 0.01}
    assert schedules.ConstantDrop(update_every=5, drop_fraction=0.5).numbers() == {
        "update_every": 5, "start_step": 0, "end_step": -1, "drop_fraction": 0.5}
    other = schedules.CosineDrop(update_every=7, drop_fraction=0.5, end_step=99)
    assert cosine.graph_signature() == other.graph_signature()  # same variables, same trace
    assert cosine.graph_signature()[0] is schedules.CosineDrop
    assert dict(cosine.graph_signature()[1:]) == {
        "update_every": "int64", "start_step": "int64", "end_step": "int64",
        "drop_fraction": "float64", "final_drop_fraction": "float64"}
    assert schedules.ConstantDrop().graph_signature() != cosine.graph_signature()
    assert dict(_Stepped().graph_signature()[1:])["switch_step"] == "int64"


@pytest.mark.parametrize("schedule", [
    schedules.ConstantDrop(update_every=3, drop_fraction=0.5, start_step=2),
    schedules.CosineDrop(update_every=100, drop_fraction=0.3, end_step=1000,
                         final_drop_fraction=0.01),
    _Halving(update_every=3, drop_fraction=0.8, end_step=20),
])
def test_in_graph_methods_match_python_evaluation(schedule):
    values = _values(schedule)

    @tf.function
    def in_graph(step):
        return (schedule.is_update_step_in_graph(step, values),
                schedule.drop_fraction_in_graph(step, values))

    for step in (1, 3, 5, 6, 9, 19, 21, 300, 999, 1000):
        is_update, fraction = in_graph(tf.constant(step, tf.int64))
        assert fraction.dtype == tf.float64
        assert (bool(is_update), float(fraction)) == schedule(step)


def test_schedule_numbers_must_be_ints_or_floats():
    class _Bad(_Halving):
        def numbers(self):
            return dict(super().numbers(), late="0.1")

    with pytest.raises(TypeError, match=r"_Bad.numbers\(\)\['late'\]='0.1' \(str\)"):
        _Bad().graph_signature()
