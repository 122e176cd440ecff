"""DST Ensemble recipe: M independent sparse runs, best-validation ticket each."""

import json
import os

import keras
import numpy as np
import pytest

import ft_keras as ftk


def _build():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu", name="fc1"),
            keras.layers.Dense(10, name="out"),
        ]
    )


def _compile(model):
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)


class History(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.runs = []

    def on_train_begin(self, logs=None):
        self.runs.append({"val_accuracy": [], "weights": []})

    def on_epoch_end(self, epoch, logs=None):
        self.runs[-1]["val_accuracy"].append(logs["val_accuracy"])
        self.runs[-1]["weights"].append([np.array(w) for w in self.model.get_weights()])


def test_dst_ensemble_members(fashion_mnist_small, tmp_path):
    (x, y), (xv, yv) = fashion_mnist_small
    history = History()
    paths = ftk.train_dst_ensemble(
        _build, 3, (x[:1024], y[:1024]), validation_data=(xv, yv), epochs=3,
        ticket_dir=str(tmp_path / "dst"), sparsity=0.8, compile_fn=_compile, seed=10,
        dst_kwargs=dict(update_every=4, grow="random"),
        fit_kwargs=dict(batch_size=64, verbose=0), callbacks=[history],
    )
    assert [os.path.basename(p) for p in paths] == ["ticket_0", "ticket_1", "ticket_2"]
    models = []
    for member, path in enumerate(paths):
        model, meta = ftk.read_ticket(path)
        models.append(model)
        run = history.runs[member]
        best = int(np.argmax(run["val_accuracy"]))
        assert meta["method"] == "dst_ensemble"
        assert meta["seed"] == 10 + member and meta["member"] == member
        assert meta["epoch"] == best
        assert meta["monitor_value"] == pytest.approx(run["val_accuracy"][best])
        for saved, recorded in zip(model.get_weights(), run["weights"][best]):
            np.testing.assert_array_equal(saved, recorded)
        shapes = {"fc1": (784, 32), "out": (32, 10)}
        counts = ftk.densities.active_counts(
            shapes, ftk.layer_densities(shapes, 0.8, "erk"))
        report = ftk.sparsity_report(model)
        assert {r.name: r.active for r in report.layers} == counts  # exact, after training
    masks = [ftk.masked_layers(m)[0].kernel_mask.numpy() for m in models]
    kernels = [ftk.masked_layers(m)[0].masked_kernel.numpy() for m in models]
    assert (masks[0] != masks[1]).any() and (masks[1] != masks[2]).any()
    assert not np.allclose(kernels[0], kernels[1])
    meta = json.load(open(os.path.join(paths[0], "metadata.json")))
    assert meta["num_members"] == 3


def test_bad_arguments(fashion_mnist_small, tmp_path):
    (x, y), (xv, yv) = fashion_mnist_small
    common = dict(epochs=1, ticket_dir=str(tmp_path / "t"))
    with pytest.raises(ValueError, match="num_members"):
        ftk.train_dst_ensemble(_build, 0, (x, y), validation_data=(xv, yv), **common)
    with pytest.raises(ValueError, match="validation_data"):
        ftk.train_dst_ensemble(_build, 2, (x, y), validation_data=None, **common)
    with pytest.raises(TypeError, match="build_fn"):
        ftk.train_dst_ensemble("lenet", 2, (x, y), validation_data=(xv, yv), **common)


if __name__ == "__main__":  # bazel test / python tests/test_recipes.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
