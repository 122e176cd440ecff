"""ft_keras.harness.compiling: the recipes' learning-rate schedules and compile_fn."""

import keras
import numpy as np
import pytest

import ft_keras as ftk
from ft_keras.harness import compiling


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
    rate = compiling.learning_rate_schedule("step", 0.1, decay_steps=100)
    # boundaries 50 and 75 (PiecewiseConstantDecay switches after the boundary step)
    got = [float(rate(step)) for step in (0, 50, 51, 75, 76, 1000)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_cosine_and_constant_schedules():
    assert compiling.learning_rate_schedule("constant", 0.05) == 0.05
    cosine = compiling.learning_rate_schedule("cosine", 0.2, decay_steps=10)
    np.testing.assert_allclose([float(cosine(s)) for s in (0, 5, 10)], [0.2, 0.1, 0.0],
                               atol=1e-7)
    with pytest.raises(TypeError, match="decay_steps"):
        compiling.learning_rate_schedule("cosine", 0.2)


def test_compile_fn_gives_every_model_its_own_optimizer():
    compile_fn = compiling.make_compile_fn("sgd", 0.03, momentum=0.5, steps_per_execution=4)
    models = [compile_fn(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
              for _ in range(2)]
    first, second = (m.optimizer for m in models)
    assert first is not second and isinstance(first, keras.optimizers.SGD)
    assert first.momentum == 0.5 and float(first.learning_rate) == pytest.approx(0.03)
    assert models[0].steps_per_execution == 4


def test_recipes_still_name_the_compile_helpers():
    assert ftk.recipes.make_compile_fn is compiling.make_compile_fn
    assert ftk.recipes.OPTIMIZERS == ("sgd", "adam")
