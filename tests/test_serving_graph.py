"""ft_keras.serving_graph: the members' program, checked against Keras's own predictions."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ft_keras import serving_graph

RNG = np.random.default_rng(3)


def _member(seed, width=16):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(width, activation="relu"),
                             keras.layers.Dense(4)])


def _run(members, **kwargs):
    module = serving_graph.ServingModule()
    run, plan = serving_graph.build_program(module, members, **kwargs)
    module.finish()
    module.initialize()
    x = RNG.random((6, 5)).astype(np.float32)
    logits, check = run(tf.constant(x))
    return x, [y.numpy() for y in logits], check.numpy(), plan


@pytest.mark.parametrize("group_members", ["none", "all"])
def test_aligned_members_give_their_own_logits(group_members):
    members = [_member(s) for s in range(3)]
    x, logits, check, plan = _run(members, group_members=group_members)
    for member, got in zip(members, logits):
        np.testing.assert_allclose(got, member(x).numpy(), rtol=1e-5, atol=1e-6)
    assert [p.members for p in plan] == [3, 3]
    assert {p.kernels for p in plan} == {"grouped" if group_members == "all" else "dense"}
    assert check.shape == (6,) and np.isfinite(check).all()


def test_members_of_other_widths_run_apart():
    members = [_member(0, 16), _member(1, 8)]
    x, logits, _, plan = _run(members, group_members="all")
    for member, got in zip(members, logits):
        np.testing.assert_allclose(got, member(x).numpy(), rtol=1e-5, atol=1e-6)
    assert [p.members for p in plan] == [1, 1, 1, 1]


def test_bad_choices_are_named():
    with pytest.raises(ValueError, match="group_members"):
        serving_graph.build_program(serving_graph.ServingModule(), [_member(0)],
                                    group_members="some")
