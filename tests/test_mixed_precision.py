"""Dynamic sparsity and FreeTickets under the ``mixed_float16`` policy (float16 compute on CPU).

Keras wraps the optimizer in a dynamic ``LossScaleOptimizer`` for ``mixed_float16``; masks must
stay binary with exact counts, kernels and optimizer state zero off-mask, and tickets / ensemble
exports must serve float32.
"""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import ft_keras as ftk


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    model = ftk.sparsify(ftk.models.lenet_300_100(), 0.9, distribution="erk", seed=seed)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    return model


def _inner(optimizer):
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _slots(model, layer):
    prefix = layer.masked_kernel.path.replace("/", "_")
    return [v for v in _inner(model.optimizer).variables
            if tuple(v.shape) == tuple(layer.masked_kernel.shape) and prefix in v.path
            and "ftk_grad" not in v.path]


@pytest.mark.parametrize("grow, optimizer_state", [
    ("gradient", "masked"), ("random", "masked"), ("momentum", "masked"),
    ("gradient", "dense")])
def test_mixed_float16_keeps_masks_exact(mixed_float16, fashion_mnist_small, grow,
                                         optimizer_state):
    (x, y), _ = fashion_mnist_small
    model = _model()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    counts = {layer.name: int(layer.kernel_mask.numpy().sum()) for layer in ftk.masked_layers(model)}
    before = {layer.name: layer.kernel_mask.numpy().copy() for layer in ftk.masked_layers(model)}
    callback = ftk.DynamicSparsity(update_every=3, drop_fraction=0.5, grow=grow,
                                   optimizer_state=optimizer_state)
    model.fit(x[:768], y[:768], batch_size=64, epochs=1, verbose=0, callbacks=[callback])
    assert callback.updates
    changed = 0
    for layer in ftk.masked_layers(model):
        assert layer.compute_dtype == "float16" and layer.masked_kernel.dtype == "float32"
        mask = layer.kernel_mask.numpy()
        assert mask.dtype == bool and int(mask.sum()) == counts[layer.name]
        assert not layer.masked_kernel.numpy()[~mask].any()
        for slot in _slots(model, layer):
            assert slot.numpy()[~mask].any() == (optimizer_state == "dense")
        changed += int((mask != before[layer.name]).sum())
    assert changed > 0
    assert np.isfinite(model.evaluate(x[:256], y[:256], verbose=0)[0])


def test_mixed_float16_tickets_and_export_serve_float32(mixed_float16, fashion_mnist_small,
                                                        tmp_path):
    (x, y), (x_test, _) = fashion_mnist_small
    model = _model(seed=1)
    callback = ftk.FreeTickets(tmp_path / "tickets", num_tickets=2, exploration_epochs=1,
                               refine_epochs=1, update_every=4, monitor="val_accuracy")
    model.fit(x[:1024], y[:1024], validation_data=(x[1024:1280], y[1024:1280]), batch_size=64,
              epochs=callback.total_epochs, verbose=0, callbacks=[callback])
    assert len(ftk.list_tickets(tmp_path / "tickets")) == 2
    keras.mixed_precision.set_global_policy("float32")  # a serving process's default
    for path in ftk.list_tickets(tmp_path / "tickets"):
        signature = tf.saved_model.load(f"{path}/saved_model/1").signatures["serving_default"]
        _, inputs = signature.structured_input_signature
        assert inputs["inputs"].dtype == tf.float32
        assert all(spec.dtype in (tf.float32, tf.int64, tf.int32)
                   for spec in signature.structured_outputs.values())
        assert signature.structured_outputs["logits"].dtype == tf.float32
    ensemble = ftk.Ensemble.from_directory(tmp_path / "tickets", combine="probs")
    ensemble.export(tmp_path / "export")
    served = tf.saved_model.load(str(tmp_path / "export" / "1")).signatures["serving_default"]
    out = served(inputs=tf.constant(x_test[:32]))
    assert out["probabilities"].dtype == tf.float32
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"].numpy(),
                               ensemble.predict(x_test[:32], verbose=0), atol=5e-3)
    np.testing.assert_array_equal(out["class_ids"].numpy(),
                                  np.argmax(out["probabilities"].numpy(), axis=1))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
