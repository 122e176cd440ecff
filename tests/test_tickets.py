"""Tickets on disk: write_ticket / read_ticket / list_tickets / prepare_ticket_dir."""

import collections
import json
import os
import shutil
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import ft_keras as ftk
from ft_keras import _checks
from ft_keras import export
from ft_keras import tickets
from ft_keras.ensemble import Ensemble


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(32, activation="relu", name="fc1"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="mlp",
    )


@pytest.fixture(scope="module")
def images():
    x, y = ftk.data.load_numpy("fashion_mnist", "test[:256]")
    return x.astype("float32") / 255.0, y.astype("int64")


@pytest.fixture(scope="module")
def sparse_model(images):
    """A sparse MLP trained for one short epoch with fixed masks (off-mask weights stay 0)."""
    x, y = images
    model = ftk.sparsify(_mlp(), sparsity=0.8, seed=1)
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[ftk.StaticSparsity()])
    return model


@pytest.fixture(scope="module")
def written(tmp_path_factory, sparse_model):
    """A ticket directory with ticket_0 of ``sparse_model``."""
    ticket_dir = str(tmp_path_factory.mktemp("tickets"))
    extra = {
        "method": "edst",
        "phase": 2,
        "epoch": np.int64(7),
        "step": 140,
        "monitor": "val_accuracy",
        "monitor_value": np.float32(0.75),
        "seed": 3,
        "note": "hello",
        "tags": ("a", "b"),
    }
    path = tickets.write_ticket(sparse_model, ticket_dir, 0, extra)
    return ticket_dir, path


def _masks_and_weights(model):
    return {
        layer.name: [np.array(w) for w in layer.get_weights()]
        for layer in ftk.masked_layers(model)
    }


def test_layout(written):
    ticket_dir, path = written
    assert path == os.path.join(ticket_dir, "ticket_0")
    assert sorted(os.listdir(ticket_dir)) == ["ticket_0"]  # no temporary folder left
    assert sorted(os.listdir(path)) == ["metadata.json", "model.keras", "saved_model"]
    assert os.path.isfile(os.path.join(path, "saved_model", "1", "saved_model.pb"))
    assert tickets.list_tickets(ticket_dir) == [path]


def test_round_trip_is_bit_exact(written, sparse_model, images):
    _, path = written
    model, metadata = tickets.read_ticket(path)
    assert [type(layer).__name__ for layer in ftk.masked_layers(model)] == ["MaskedDense"] * 2
    before = _masks_and_weights(sparse_model)
    after = _masks_and_weights(model)
    assert before.keys() == after.keys()
    for name, weights in before.items():
        for want, got in zip(weights, after[name]):
            assert want.dtype == got.dtype
            np.testing.assert_array_equal(got, want)
    x, _ = images
    np.testing.assert_array_equal(model.predict(x, verbose=0), sparse_model.predict(x, verbose=0))
    assert metadata["index"] == 0


def test_optimizer_left_out_by_default(written, sparse_model, tmp_path):
    _, path = written
    model, _ = tickets.read_ticket(path)
    assert getattr(model, "optimizer", None) is None
    with_opt = tickets.write_ticket(sparse_model, str(tmp_path), 0, include_optimizer=True)
    small = os.path.getsize(os.path.join(path, "model.keras"))
    large = os.path.getsize(os.path.join(with_opt, "model.keras"))
    assert large > small
    restored, _ = tickets.read_ticket(with_opt, compile=True)
    assert restored.optimizer is not None


def test_metadata_fields(written, sparse_model):
    _, path = written
    _, metadata = tickets.read_ticket(path)
    with open(os.path.join(path, "metadata.json"), encoding="utf-8") as handle:
        assert json.load(handle) == metadata
    report = ftk.sparsity_report(sparse_model)
    assert metadata["format_version"] == 2
    assert metadata["index"] == 0
    assert metadata["output"] == "logits"
    assert metadata["files"] == tickets.ticket_digests(path)
    assert sorted(metadata["files"]) == ["model.keras", "saved_model"]
    assert all(len(digest) == 64 for digest in metadata["files"].values())
    assert metadata["method"] == "edst"
    assert metadata["phase"] == 2
    assert metadata["epoch"] == 7
    assert metadata["step"] == 140
    assert metadata["monitor"] == "val_accuracy"
    assert metadata["monitor_value"] == pytest.approx(0.75)
    assert metadata["seed"] == 3
    # counted when the caller gives none: 2 x multiply-adds of the sparse forward pass
    assert metadata["forward_flops"] == 2 * ftk.flops.forward_macs(sparse_model)
    assert metadata["forward_flops"] == 2 * sum(r.active for r in report.layers)  # Dense only
    assert metadata["note"] == "hello"
    assert metadata["tags"] == ["a", "b"]
    assert metadata["density"] == report.density
    assert metadata["num_active_params"] == report.num_active_params
    assert metadata["num_params"] == report.num_params
    assert [row["name"] for row in metadata["layers"]] == ["fc1", "logits"]
    for row, want in zip(metadata["layers"], report.layers):
        assert row["shape"] == list(want.shape)
        assert row["active"] == want.active
        assert row["size"] == want.size
        assert row["density"] == want.density
    assert metadata["versions"] == {
        "ft_keras": ftk.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": metadata["versions"]["python"],
    }
    assert metadata["created"].endswith("+00:00")


def test_metadata_refuses_computed_keys_and_bad_values(sparse_model, tmp_path):
    with pytest.raises(ValueError, match=r"density"):
        tickets.write_ticket(sparse_model, str(tmp_path), 0, {"density": 0.5})
    with pytest.raises(TypeError, match="JSON"):
        tickets.write_ticket(sparse_model, str(tmp_path), 0, {"bad": object()})
    with pytest.raises(TypeError, match="metadata"):
        tickets.write_ticket(sparse_model, str(tmp_path), 0, ["not", "a", "dict"])
    assert not os.listdir(tmp_path)  # nothing written


def test_forward_flops_and_caller_method(sparse_model, tmp_path):
    path = tickets.write_ticket(
        sparse_model, str(tmp_path), 4, {"method": "dst_ensemble", "forward_flops": 1234}
    )
    _, metadata = tickets.read_ticket(path)
    assert metadata["index"] == 4
    assert metadata["method"] == "dst_ensemble"
    assert metadata["forward_flops"] == 1234


def test_saved_model_signature_and_logits(written, sparse_model, images):
    _, path = written
    loaded = tf.saved_model.load(os.path.join(path, "saved_model", "1"))
    signature = loaded.signatures["serving_default"]
    args, kwargs = signature.structured_input_signature
    assert args == ()
    assert list(kwargs) == ["inputs"]
    assert kwargs["inputs"].shape.as_list() == [None, 28, 28, 1]
    assert kwargs["inputs"].dtype == tf.float32
    assert sorted(signature.structured_outputs) == ["class_ids", "logits", "probabilities"]
    x, _ = images
    out = signature(inputs=tf.constant(x))
    want = sparse_model.predict(x, verbose=0)
    assert np.max(np.abs(out["logits"].numpy() - want)) <= 1e-5
    np.testing.assert_allclose(
        out["probabilities"].numpy(), tf.nn.softmax(want).numpy(), atol=1e-6
    )
    assert out["class_ids"].dtype == tf.int64
    np.testing.assert_array_equal(out["class_ids"].numpy(), np.argmax(want, axis=-1))


def test_saved_model_stores_sparse_kernels_compactly(written, sparse_model):
    """Behaviour changed with compact storage: the SavedModel holds, per masked layer, the
    active values and their positions (no kernel_mask variable, no full kernel)."""
    _, path = written
    sm_path = os.path.join(path, "saved_model", "1")
    stored = dict(tf.train.list_variables(os.path.join(sm_path, "variables", "variables")))
    assert not any("mask" in name for name in stored)
    masked = ftk.masked_layers(sparse_model)
    packed = [
        export.pack_kernel(layer.masked_kernel.numpy(), layer.kernel_mask.numpy())
        for layer in masked
    ]
    assert [p.encoding for p in packed] == ["bitmask", "bitmask"]
    num_values = sum(p.values.size for p in packed) + sum(layer.bias.shape[0] for layer in masked)
    values = [shape for name, shape in stored.items() if name.startswith("stored_values")]
    bits = [shape for name, shape in stored.items() if name.startswith("stored_bits")]
    assert values == [[num_values]]
    assert bits == [[(784 * 32 + 32 * 10 + 7) // 8]]  # one bitmask over both kernels
    # Each packed kernel decodes to the masked kernel exactly.
    for layer, p in zip(masked, packed):
        np.testing.assert_array_equal(p.dense(), layer.masked_kernel.numpy())
        np.testing.assert_array_equal(p.dense() != 0, layer.kernel_mask.numpy())


def test_read_from_saved_model_when_model_keras_is_missing(written, sparse_model, images, tmp_path):
    _, path = written
    copy = tmp_path / "ticket_0"
    shutil.copytree(path, str(copy))
    os.remove(copy / "model.keras")
    assert tickets.list_tickets(str(tmp_path)) == [str(copy)]
    model, metadata = tickets.read_ticket(str(copy))
    assert metadata["index"] == 0
    x, _ = images
    got = model.predict(x, verbose=0)
    assert got.shape == (256, 10)
    assert np.max(np.abs(got - sparse_model.predict(x, verbose=0))) <= 1e-5


def test_overwrite(sparse_model, tmp_path, images):
    ticket_dir = str(tmp_path)
    first = tickets.write_ticket(sparse_model, ticket_dir, 0, {"method": "a"})
    with pytest.raises(ValueError, match=r"ticket_0.*overwrite=True"):
        tickets.write_ticket(sparse_model, ticket_dir, 0, {"method": "b"})
    assert tickets.read_ticket(first)[1]["method"] == "a"
    other = ftk.sparsify(_mlp(5), sparsity=0.5, seed=9)
    again = tickets.write_ticket(other, ticket_dir, 0, {"method": "b"}, overwrite=True)
    assert again == first
    model, metadata = tickets.read_ticket(again)
    assert metadata["method"] == "b"
    x, _ = images
    np.testing.assert_array_equal(model.predict(x, verbose=0), other.predict(x, verbose=0))
    assert sorted(os.listdir(ticket_dir)) == ["ticket_0"]  # no trash or temp folder left


@pytest.mark.parametrize("victim", ["_write_saved_model", "_write_metadata"])
def test_crash_mid_write_leaves_no_ticket(sparse_model, tmp_path, monkeypatch, victim):
    ticket_dir = str(tmp_path)

    def crash(*args, **kwargs):
        del args, kwargs
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tickets, victim, crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        tickets.write_ticket(sparse_model, ticket_dir, 0)
    assert os.listdir(ticket_dir) == []  # no ticket_0, temporary folder removed
    assert tickets.list_tickets(ticket_dir, allow_empty=True) == []
    with pytest.raises(ValueError, match="no complete ticket"):
        Ensemble.from_directory(ticket_dir)


def test_crash_during_overwrite_keeps_old_ticket(sparse_model, tmp_path, monkeypatch):
    ticket_dir = str(tmp_path)
    path = tickets.write_ticket(sparse_model, ticket_dir, 1, {"method": "old"})

    def crash(*args, **kwargs):
        del args, kwargs
        raise RuntimeError("killed")

    monkeypatch.setattr(tickets, "_write_metadata", crash)
    with pytest.raises(RuntimeError, match="killed"):
        tickets.write_ticket(sparse_model, ticket_dir, 1, {"method": "new"}, overwrite=True)
    assert sorted(os.listdir(ticket_dir)) == ["ticket_1"]
    assert tickets.read_ticket(path)[1]["method"] == "old"


@pytest.mark.parametrize("moment", ["after_ready_and_trash", "after_trash_before_ready",
                                    "after_ready_before_trash"])
def test_an_interrupted_overwrite_is_rolled_forward_or_back(written, sparse_model, tmp_path,
                                                            moment):
    """Issue 20: killed inside an overwrite (old folder moved aside), the ticket was missing and
    the clean-up deleted the only complete copy. The write order is .tmp- (being written) ->
    .ready- (complete) -> old moved to .trash- -> .ready- renamed into place; a dead writer's
    leftovers are rolled forward (.ready-) or back (.trash-) by the next write or resume."""
    _, old_path = written
    ticket_dir = str(tmp_path / "tickets")
    new_path = tickets.write_ticket(sparse_model, str(tmp_path / "new"), 0, {"method": "new"})
    dead = "999999999"  # no such process
    destination = os.path.join(ticket_dir, "ticket_0")
    shutil.copytree(old_path, destination)
    if moment == "after_trash_before_ready":  # (an older order) the new copy incomplete
        os.makedirs(os.path.join(ticket_dir, f".tmp-ticket_0-{dead}-00000000"))
    else:
        shutil.copytree(new_path, os.path.join(ticket_dir, f".ready-ticket_0-{dead}-11111111"))
    if moment != "after_ready_before_trash":
        os.rename(destination, os.path.join(ticket_dir, f".trash-ticket_0-{dead}-22222222"))
        assert tickets.list_tickets(ticket_dir, allow_empty=True) == []
        (_, reason), = tickets.scan_tickets(ticket_dir)[1]
        assert "an interrupted write left its complete copy in" in reason
    restored, removed = tickets.recover_interrupted_writes(ticket_dir, "ticket_0")
    assert os.listdir(ticket_dir) == ["ticket_0"]
    method = tickets.read_ticket(destination)[1]["method"]
    if moment == "after_ready_and_trash":  # rolled forward: the new ticket
        assert (restored, method) == (f".ready-ticket_0-{dead}-11111111", "new")
        assert removed == [f".trash-ticket_0-{dead}-22222222"]
    elif moment == "after_trash_before_ready":  # rolled back: the old ticket
        assert (restored, method) == (f".trash-ticket_0-{dead}-22222222", "edst")
        assert removed == [f".tmp-ticket_0-{dead}-00000000"]
    else:  # the old ticket was never moved: it stays
        assert (restored, method) == (None, "edst")
        assert removed == [f".ready-ticket_0-{dead}-11111111"]


def test_lock_is_reentrant_in_a_process_and_released(tmp_path):
    ticket_dir = str(tmp_path / "t")
    first = tickets.lock_ticket_dir(ticket_dir, {"writer": "a"})
    assert tickets.lock_ticket_dir(ticket_dir, {"writer": "b"}) == first
    with open(os.path.join(ticket_dir, tickets.LOCK_FILE), encoding="utf-8") as handle:
        holder = json.load(handle)
    assert holder["writer"] == "b" and holder["pid"] == os.getpid()
    tickets.unlock_ticket_dir(ticket_dir)
    tickets.unlock_ticket_dir(ticket_dir)  # not held: nothing to do
    assert tickets.prepare_ticket_dir(ticket_dir) == ticket_dir  # the lock file does not count


def test_hard_crash_leftovers_are_ignored(written, tmp_path):
    """A killed process leaves its hidden temporary folder: readers must skip it."""
    _, path = written
    ticket_dir = str(tmp_path)
    shutil.copytree(path, os.path.join(ticket_dir, ".tmp-ticket_0-abc123"))  # complete, hidden
    os.makedirs(os.path.join(ticket_dir, "ticket_1"))  # a half-copied ticket by hand
    shutil.copy(os.path.join(path, "model.keras"), os.path.join(ticket_dir, "ticket_1"))
    assert tickets.list_tickets(ticket_dir, allow_empty=True) == []
    with pytest.raises(ValueError, match="ticket_1"):
        tickets.list_tickets(ticket_dir)
    # prepare_ticket_dir(overwrite=True) cleans both up.
    open(os.path.join(ticket_dir, "notes.txt"), "w", encoding="utf-8").close()
    tickets.prepare_ticket_dir(ticket_dir, overwrite=True)
    assert os.listdir(ticket_dir) == ["notes.txt"]


def test_list_order_is_numeric(sparse_model, tmp_path):
    ticket_dir = str(tmp_path)
    for index in (10, 2, 0):
        tickets.write_ticket(sparse_model, ticket_dir, index)
    os.makedirs(os.path.join(ticket_dir, "ticket_x"))
    os.makedirs(os.path.join(ticket_dir, "ticket_03"))
    assert [os.path.basename(p) for p in tickets.list_tickets(ticket_dir)] == [
        "ticket_0",
        "ticket_2",
        "ticket_10",
    ]


def test_prepare_ticket_dir(tmp_path, sparse_model):
    ticket_dir = str(tmp_path / "a" / "b")
    assert tickets.prepare_ticket_dir(ticket_dir) == ticket_dir
    assert os.path.isdir(ticket_dir)
    assert tickets.prepare_ticket_dir(ticket_dir) == ticket_dir  # empty: fine
    tickets.write_ticket(sparse_model, ticket_dir, 0)
    with pytest.raises(ValueError, match=r"ticket_dir=.*b'.*overwrite=True"):
        tickets.prepare_ticket_dir(ticket_dir)
    tickets.prepare_ticket_dir(ticket_dir, overwrite=True)
    assert os.listdir(ticket_dir) == []
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        tickets.prepare_ticket_dir(str(a_file))


def test_read_and_list_errors_name_the_file(written, tmp_path):
    _, path = written
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope"):
        tickets.list_tickets(missing)
    with pytest.raises(ValueError, match="nope"):
        tickets.read_ticket(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        tickets.list_tickets(str(empty))
    with pytest.raises(ValueError, match="empty"):
        tickets.read_ticket(str(empty))

    # Missing metadata.json.
    broken = tmp_path / "ticket_0"
    shutil.copytree(path, str(broken))
    os.remove(broken / "metadata.json")
    with pytest.raises(ValueError, match=r"ticket_0/metadata\.json.*missing"):
        tickets.read_ticket(str(broken))
    # Corrupt metadata.json.
    (broken / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"ticket_0/metadata\.json.*corrupt"):
        tickets.read_ticket(str(broken))
    (broken / "metadata.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"metadata\.json.*corrupt"):
        tickets.read_ticket(str(broken))
    (broken / "metadata.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match=r"metadata\.json.*format_version=99"):
        tickets.read_ticket(str(broken))
    shutil.copy(os.path.join(path, "metadata.json"), str(broken / "metadata.json"))
    # Corrupt model.keras.
    (broken / "model.keras").write_bytes(b"this is no zip file")
    with pytest.raises(ValueError, match=r"ticket_0/model\.keras"):
        tickets.read_ticket(str(broken))
    # No model at all.
    os.remove(broken / "model.keras")
    shutil.rmtree(broken / "saved_model")
    with pytest.raises(ValueError, match=r"ticket_0/model\.keras"):
        tickets.read_ticket(str(broken))


@pytest.mark.parametrize("damage", ["truncated", "bit_flip", "empty"])
def test_corrupt_model_keras_is_reported_as_corrupt(written, tmp_path, damage):
    """Issue: a truncated model.keras was reported as "File not found"."""
    _, path = written
    copy = tmp_path / "ticket_0"
    shutil.copytree(path, str(copy))
    model_file = copy / "model.keras"
    data = model_file.read_bytes()
    if damage == "truncated":
        model_file.write_bytes(data[: len(data) // 2])
    elif damage == "bit_flip":
        model_file.write_bytes(data[:2000] + bytes([data[2000] ^ 0xFF]) + data[2001:])
    else:
        model_file.write_bytes(b"")
    with pytest.raises(ValueError, match=r"ticket_0/model\.keras' is corrupt") as info:
        tickets.read_ticket(str(copy))
    assert "not found" not in str(info.value).lower()


def test_scan_tickets_reports_incomplete_folders(written, tmp_path):
    _, path = written
    ticket_dir = tmp_path / "dir"
    ticket_dir.mkdir()
    shutil.copytree(path, str(ticket_dir / "ticket_0"))
    shutil.copytree(path, str(ticket_dir / "ticket_2"))
    os.remove(ticket_dir / "ticket_2" / "metadata.json")
    (ticket_dir / "ticket_5").mkdir()
    shutil.copytree(path, str(ticket_dir / ".tmp-ticket_3-abcd"))  # a write in progress
    complete, incomplete = tickets.scan_tickets(str(ticket_dir))
    assert complete == [str(ticket_dir / "ticket_0")]
    assert incomplete == [
        (str(ticket_dir / "ticket_2"), "missing metadata.json"),
        (str(ticket_dir / "ticket_5"),
         "missing metadata.json and model.keras (and saved_model/<version>/saved_model.pb)"),
    ]
    assert tickets.list_tickets(str(ticket_dir)) == complete
    with pytest.raises(ValueError, match="nope"):
        tickets.scan_tickets(str(tmp_path / "nope"))


def test_argument_errors(sparse_model, tmp_path):
    ticket_dir = str(tmp_path)
    with pytest.raises(TypeError, match="model must be a keras.Model"):
        tickets.write_ticket("model", ticket_dir, 0)
    with pytest.raises(ValueError, match=r"index=-1"):
        tickets.write_ticket(sparse_model, ticket_dir, -1)
    with pytest.raises(TypeError, match=r"index"):
        tickets.write_ticket(sparse_model, ticket_dir, 1.5)
    with pytest.raises(TypeError, match=r"index"):
        tickets.write_ticket(sparse_model, ticket_dir, True)
    with pytest.raises(TypeError, match=r"ticket_dir"):
        tickets.write_ticket(sparse_model, 3, 0)
    with pytest.raises(ValueError, match=r"version=-2"):
        tickets.write_ticket(sparse_model, ticket_dir, 0, version=-2)
    with pytest.raises(TypeError, match=r"overwrite"):
        tickets.write_ticket(sparse_model, ticket_dir, 0, overwrite="yes")
    assert not os.listdir(ticket_dir)


def _count_calls_on(monkeypatch, models, functions):
    """Wraps each ``(name, function, position)`` wherever an ft_keras module refers to it
    (some import it by name), counting the calls whose argument at ``position`` is one of
    ``models``; returns the Counter ``{(name, model index): calls}``."""
    calls = collections.Counter()
    modules = [module for name, module in sys.modules.items()
               if name == "ft_keras" or name.startswith("ft_keras.")]
    for name, function, position in functions:

        def wrapper(*args, _name=name, _function=function, _position=position, **kwargs):
            for i, model in enumerate(models):
                if len(args) > _position and args[_position] is model:
                    calls[(_name, i)] += 1
            return _function(*args, **kwargs)

        for module in modules:
            for attribute, value in list(vars(module).items()):
                if value is function:
                    monkeypatch.setattr(module, attribute, wrapper)
    return calls


_WALK_AND_CHECK = (("walk_layers", sys.modules["ft_keras.sparsify"].walk_layers, 0),
                   ("check_model", _checks.check_model, 1))


def test_an_export_checks_and_walks_its_models_once(sparse_model, tmp_path, monkeypatch):
    """write_ticket checks the model once where it enters and walks its layers once (the
    NaN / Inf scan, the metadata, the FLOPs and the SavedModel reuse them); exporting an
    ensemble walks each member once and checks none again (the Ensemble checked them)."""
    with monkeypatch.context() as patch:
        calls = _count_calls_on(patch, [sparse_model], _WALK_AND_CHECK)
        tickets.write_ticket(sparse_model, str(tmp_path / "tickets"), 0)
    assert calls == {("walk_layers", 0): 1, ("check_model", 0): 1}

    other = ftk.sparsify(_mlp(4), sparsity=0.8, seed=4)
    ensemble = Ensemble([sparse_model, other])
    with monkeypatch.context() as patch:
        calls = _count_calls_on(patch, [sparse_model, other], _WALK_AND_CHECK)
        ensemble.export(str(tmp_path / "serving"))
    assert calls == {("walk_layers", 0): 1, ("walk_layers", 1): 1}


def test_plain_model_and_version(tmp_path, images):
    """A dense (never sparsified) model is a valid ticket too; the version folder is honoured."""
    model = _mlp(2)
    path = tickets.write_ticket(model, str(tmp_path), 0, version=3)
    assert os.listdir(os.path.join(path, "saved_model")) == ["3"]
    restored, metadata = tickets.read_ticket(path)
    assert metadata["density"] == 1.0
    x, _ = images
    np.testing.assert_array_equal(restored.predict(x, verbose=0), model.predict(x, verbose=0))


class _WriteEveryEpoch(keras.callbacks.Callback):
    """What a ticket-collecting callback does: write a ticket at the end of each epoch."""

    def __init__(self, ticket_dir):
        super().__init__()
        self.ticket_dir = ticket_dir

    def on_epoch_end(self, epoch, logs=None):
        tickets.write_ticket(
            self.model,
            self.ticket_dir,
            epoch,
            {"epoch": epoch, "monitor": "loss", "monitor_value": logs["loss"]},
        )


def test_write_during_fit(images, tmp_path):
    """Tickets written mid-``fit``, with DST running, are exact copies of the model."""
    x, y = images
    ticket_dir = tickets.prepare_ticket_dir(str(tmp_path / "tickets"))
    model = ftk.sparsify(_mlp(3), sparsity=0.8, seed=3)
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        verbose=0,
        callbacks=[ftk.DynamicSparsity(update_every=3), _WriteEveryEpoch(ticket_dir)],
    )
    paths = tickets.list_tickets(ticket_dir)
    assert [os.path.basename(p) for p in paths] == ["ticket_0", "ticket_1"]
    last, metadata = tickets.read_ticket(paths[-1])
    assert metadata["epoch"] == 1 and metadata["monitor_value"] > 0
    for layer, original in zip(ftk.masked_layers(last), ftk.masked_layers(model)):
        np.testing.assert_array_equal(layer.kernel_mask.numpy(), original.kernel_mask.numpy())
        np.testing.assert_array_equal(layer.masked_kernel.numpy(), original.masked_kernel.numpy())
    np.testing.assert_array_equal(last.predict(x, verbose=0), model.predict(x, verbose=0))


if __name__ == "__main__":  # bazel test / python tests/test_tickets.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
