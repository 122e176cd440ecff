"""Tests of ft_keras.training_cost: the training MACs of dense, fixed-mask and dynamic sparse runs
against hand counts, and `fit_macs` costing a fit from the sparsity callback it ran with."""

import keras
import numpy as np
import pytest

import ft_keras as ftk
from ft_keras import flops
from ft_keras.harness import training_cost as tc

from tests.conftest import LENET_DENSE as F_D
from tests.conftest import LENET_SPARSE as F_S


def _free_tickets(tmp_path, num_tickets=3, exploration_epochs=1, refine_epochs=2, **kwargs):
    return ftk.FreeTickets(str(tmp_path / "tickets"), num_tickets=num_tickets,
                           exploration_epochs=exploration_epochs, refine_epochs=refine_epochs,
                           **kwargs)


# ---------------------------------------------------------------------------- update steps
def test_update_steps_follow_the_callback():
    # end_step=None is the end of training, exclusive: step 10 of 10 does not update.
    assert tc.dst_update_steps(10, 5) == [5]
    assert tc.dst_update_steps(10, 5, end_step=11) == [5, 10]
    assert tc.dst_update_steps(10, 5, start_step=5) == []
    assert tc.dst_update_steps(10, 3, end_step=7) == [3, 6]
    # EDST 1 + 2 x 3 epochs of 5 steps = 35 steps: regular updates at 10, 20, 30; global
    # explorations at the first steps of refinement phases 2 and 3 (epochs 3 and 5): 16, 26.
    assert tc.edst_update_steps(1, 2, 3, 5, update_every=10) == [10, 16, 20, 26, 30]
    # a global exploration that falls on a regular update step counts once
    assert tc.edst_update_steps(1, 2, 3, 5, update_every=8) == [8, 16, 24, 26, 32]


def test_update_steps_match_dynamic_sparsity_in_fit():
    model = ftk.sparsify(ftk.models.mlp((8,), input_shape=(4,), num_classes=2), 0.5)
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = ftk.DynamicSparsity(update_every=5, decay="constant")
    x = np.random.default_rng(0).normal(size=(10, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    # 3 epochs of 5 steps; the callback records (at most) one update per epoch
    model.fit(x, y, batch_size=2, epochs=3, shuffle=False, verbose=0, callbacks=[callback])
    assert [u["step"] for u in callback.updates] == tc.dst_update_steps(15, 5) == [5, 10]


# ---------------------------------------------------------------------------- formulas
def test_training_formulas_on_lenet(lenet, lenet_sparse):
    batch, steps = 2, 10
    dense = tc.training_macs(lenet, steps, batch, sparse=False)
    assert dense == 3 * F_D * batch * steps == 15_972_000
    assert tc.training_macs(lenet_sparse, steps, batch, sparse=False) == dense  # masks ignored
    assert tc.fit_macs(lenet, None, steps, batch) == dense  # a fit without sparsity callback

    # gradient growth: one update step (5) with end_step=None, two (5, 10) with end_step=11
    rigl = tc.fit_macs(lenet_sparse, ftk.DynamicSparsity(update_every=5), steps, batch)
    assert rigl == 3 * F_S * batch * steps + 1 * (F_D - F_S) * batch
    assert rigl == tc.training_macs(lenet_sparse, steps, batch, grow="gradient",
                                    update_steps=[5])
    rigl2 = tc.fit_macs(lenet_sparse, ftk.DynamicSparsity(update_every=5, end_step=11), steps,
                        batch)
    assert rigl2 == 3 * F_S * batch * steps + 2 * (F_D - F_S) * batch == 2_555_520
    # an update step costs 2 f_s + f_d per example
    assert rigl2 - rigl == (2 * F_S + F_D) * batch - 3 * F_S * batch

    random = tc.fit_macs(lenet_sparse, ftk.DynamicSparsity(update_every=5, grow="random"),
                         steps, batch)
    assert random == 3 * F_S * batch * steps == dense // 10
    momentum = tc.fit_macs(lenet_sparse, ftk.DynamicSparsity(update_every=5, grow="momentum"),
                           steps, batch)
    assert momentum == (2 * F_S + F_D) * batch * steps
    assert random < rigl < momentum < dense
    assert flops.relative_cost(random, dense) == pytest.approx(0.1)
    assert flops.relative_cost(rigl2, dense) == pytest.approx(2_555_520 / 15_972_000)

    # a dense model trained with DST costs dense training whatever the growth
    assert tc.fit_macs(lenet, ftk.DynamicSparsity(update_every=5), steps, batch) == dense


def test_fixed_masks_never_pay_the_dense_gradient(lenet, lenet_sparse):
    fixed = tc.fit_macs(lenet_sparse, ftk.StaticSparsity(), 10, 2)
    assert fixed == tc.training_macs(lenet_sparse, 10, 2) == 3 * F_S * 2 * 10
    assert fixed == tc.fit_macs(lenet_sparse, ftk.DynamicSparsity(update_every=5, grow="random"),
                                10, 2)
    assert tc.training_macs(lenet, 10, 2) == tc.training_macs(lenet, 10, 2, sparse=False)


def test_edst_runs(lenet_sparse, tmp_path):
    # EDST 1 + 3 x 2 epochs of 5 steps: tickets complete at steps 15, 25, 35; update steps
    # 10, 16, 20, 26, 30 (see test_update_steps_follow_the_callback).
    step, extra = 3 * F_S * 4, (F_D - F_S) * 4
    edst = tc.fit_macs(lenet_sparse, _free_tickets(tmp_path, update_every=10), 35, 4,
                       steps_per_epoch=5)
    assert edst == 3 * F_S * 4 * 35 + 5 * (F_D - F_S) * 4
    same_run = tc.fit_macs(lenet_sparse, ftk.DynamicSparsity(update_every=10), 35, 4)
    assert edst - same_run == 2 * extra  # plus the two global explorations
    assert tc.fit_macs(lenet_sparse, _free_tickets(tmp_path, update_every=10, grow="random"),
                       35, 4, steps_per_epoch=5) == 3 * F_S * 4 * 35
    assert tc.fit_macs(lenet_sparse, _free_tickets(tmp_path, 1, 0, update_every=10,
                                                   grow="momentum"),
                       10, 4, steps_per_epoch=5) == (2 * F_S + F_D) * 4 * 10

    # cumulative: the cost spent when each ticket is complete
    cumulative = tc.fit_macs(lenet_sparse, _free_tickets(tmp_path, update_every=10), 35, 4,
                             steps_per_epoch=5, at=[15, 25, 35])
    assert cumulative == [step * 15 + 1 * extra, step * 25 + 3 * extra, step * 35 + 5 * extra]
    assert cumulative[-1] == edst
    # ... the same as an EDST run of i tickets whose updates run to the full run's end
    for i in (1, 2, 3):
        assert cumulative[i - 1] == tc.fit_macs(
            lenet_sparse, _free_tickets(tmp_path, i, update_every=10, end_step=35),
            5 + 10 * i, 4, steps_per_epoch=5)

    # one DST run as long, regular updates only (10, 20, 30): the checkpoint ensemble
    checkpoints = tc.fit_macs(lenet_sparse, ftk.DynamicSparsity(update_every=10), 35, 4,
                              at=[15, 25, 35])
    assert checkpoints == [step * 15 + 1 * extra, step * 25 + 2 * extra, step * 35 + 3 * extra]
    assert cumulative[-1] - checkpoints[-1] == 2 * extra  # EDST's two global explorations


def test_grow_is_case_insensitive(lenet_sparse):
    assert tc.training_macs(lenet_sparse, 10, 2, grow="Gradient", update_steps=[5]) == (
        tc.training_macs(lenet_sparse, 10, 2, grow="gradient", update_steps=[5]))
    assert tc.training_macs(lenet_sparse, 10, 2, grow="RANDOM", update_steps=[5]) == (
        3 * F_S * 2 * 10)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda m: tc.training_macs(m, -1, 2), ValueError, "steps=-1"),
        (lambda m: tc.training_macs(m, 10, 0), ValueError, "batch_size=0"),
        (lambda m: tc.training_macs(m, 10.0, 2), TypeError, "steps"),
        (lambda m: tc.training_macs(m, True, 2), TypeError, "steps"),
        (lambda m: tc.training_macs(m, 1, 2.0), TypeError, "batch_size"),
        (lambda m: tc.training_macs(m, 10, 2, grow="magic"), ValueError, "grow="),
        (lambda m: tc.training_macs(m, 10, 2, grow=3), TypeError, "grow"),
        (lambda m: tc.training_macs(m, 10, 2, sparse=False, grow="random"), ValueError,
         "grow='random' with sparse=False"),
        (lambda m: tc.training_macs(m, 10, 2, sparse="yes"), TypeError, "sparse"),
        (lambda m: tc.training_macs(m, 10, 2, grow="gradient", update_steps=[0]), ValueError,
         r"update_steps\[0\]=0"),
        (lambda m: tc.training_macs(m, 10, 2, at=[5, 11]), ValueError, r"at\[1\]=11"),
        (lambda m: tc.training_macs("lenet", 10, 2), TypeError, "model"),
        (lambda m: tc.training_macs(object(), 10, 2), TypeError, "model"),
        (lambda m: tc.dst_update_steps(-5, 5), ValueError, "steps=-5"),
        (lambda m: tc.dst_update_steps(10, 0), ValueError, "update_every=0"),
        (lambda m: tc.dst_update_steps(10, 5, end_step=0), ValueError, "end_step=0"),
        (lambda m: tc.edst_update_steps(1, 1, 2, 0, 5), ValueError, "steps_per_epoch"),
        (lambda m: tc.edst_update_steps(1, 1, 0, 5, 5), ValueError, "num_tickets"),
        (lambda m: tc.fit_macs(m, keras.callbacks.History(), 10, 2), TypeError,
         "callback must be None or an ft_keras sparsity callback"),
    ],
)
def test_argument_validation(lenet, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(lenet)
