"""Ensemble: combining members, Keras integration, ticket directories and TF Serving export."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import ft_keras as ftk
from ft_keras import export as export_lib
from ft_keras import tickets
from ft_keras.ensemble import Ensemble
from ft_keras.ensemble import ensemble_outputs

NUM_MEMBERS = 3


def _mlp(seed, classes=10, input_shape=(28, 28, 1)):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(32, activation="relu", name="fc1"),
            keras.layers.Dense(classes, name="logits"),
        ],
        name="mlp",  # every member has the same name, as tickets of one run do
    )


@pytest.fixture(scope="module")
def images():
    x, y = ftk.data.load_numpy("fashion_mnist", "test[:256]")
    return x.astype("float32") / 255.0, y.astype("int64")


@pytest.fixture(scope="module")
def members():
    """Three different sparse MLPs (different weights and masks)."""
    return [ftk.sparsify(_mlp(seed), sparsity=0.8, seed=seed) for seed in range(NUM_MEMBERS)]


@pytest.fixture(scope="module")
def member_logits(members, images):
    x, _ = images
    return np.stack([m.predict(x, verbose=0) for m in members])  # (M, N, K)


@pytest.fixture(scope="module")
def ticket_dir(tmp_path_factory, members):
    path = str(tmp_path_factory.mktemp("tickets"))
    for index in (2, 0, 1):  # write order does not matter; index order does
        tickets.write_ticket(members[index], path, index, {"method": "dst_ensemble", "seed": index})
    return path


# ---------------------------------------------------------------------------------------------
# numpy references


def _softmax(logits):
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z.astype(np.float64))
    return e / e.sum(axis=-1, keepdims=True)


def _entropy(p):
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def _reference(logits, combine):
    probs = _softmax(logits)
    mixture = probs.mean(axis=0)
    ens = _softmax(logits.mean(axis=0)) if combine == "logits" else mixture
    return {
        "probabilities": ens,
        "class_ids": ens.argmax(axis=-1),
        "predictive_entropy": _entropy(ens),
        "mutual_information": _entropy(mixture) - _entropy(probs).mean(axis=0),
    }


# ---------------------------------------------------------------------------------------------
# ensemble_outputs


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_ensemble_outputs_match_numpy(combine):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4, 6, 5)).astype(np.float32)
    out = ensemble_outputs(tf.constant(logits), combine)
    want = _reference(logits, combine)
    expected_keys = {"probabilities", "class_ids", "predictive_entropy", "mutual_information"}
    if combine == "logits":
        expected_keys.add("logits")
        np.testing.assert_allclose(out["logits"].numpy(), logits.mean(axis=0), atol=1e-6)
    assert set(out) == expected_keys
    np.testing.assert_allclose(out["probabilities"].numpy(), want["probabilities"], atol=1e-6)
    assert out["class_ids"].dtype == tf.int64
    np.testing.assert_array_equal(out["class_ids"].numpy(), want["class_ids"])
    np.testing.assert_allclose(
        out["predictive_entropy"].numpy(), want["predictive_entropy"], atol=1e-5
    )
    np.testing.assert_allclose(
        out["mutual_information"].numpy(), want["mutual_information"], atol=1e-5
    )
    assert np.all(out["mutual_information"].numpy() >= 0.0)
    assert out["predictive_entropy"].shape == (6,)


def test_ensemble_outputs_hand_example():
    # Two confident members that disagree: the mixture is uniform, entropy log 2.
    logits = tf.constant([[[50.0, 0.0]], [[0.0, 50.0]]])
    out = ensemble_outputs(logits, "probs")
    np.testing.assert_allclose(out["probabilities"].numpy(), [[0.5, 0.5]], atol=1e-6)
    np.testing.assert_allclose(out["predictive_entropy"].numpy(), [np.log(2.0)], atol=1e-6)
    np.testing.assert_allclose(out["mutual_information"].numpy(), [np.log(2.0)], atol=1e-6)
    out = ensemble_outputs(logits, "logits")
    np.testing.assert_allclose(out["logits"].numpy(), [[25.0, 25.0]])
    np.testing.assert_allclose(out["mutual_information"].numpy(), [np.log(2.0)], atol=1e-6)


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_ensemble_outputs_identical_members_have_no_mutual_information(combine):
    logits = np.random.default_rng(1).normal(scale=4.0, size=(1, 8, 10)).astype(np.float32)
    out = ensemble_outputs(np.repeat(logits, 5, axis=0), combine)
    np.testing.assert_allclose(out["mutual_information"].numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(
        out["predictive_entropy"].numpy(), _entropy(_softmax(logits[0])), atol=1e-5
    )


def test_ensemble_outputs_errors():
    with pytest.raises(ValueError, match=r"combine='mean'.*'logits', 'probs'"):
        ensemble_outputs(tf.zeros((2, 3, 4)), "mean")
    with pytest.raises(ValueError, match=r"rank >= 3.*\(3, 4\)"):
        ensemble_outputs(tf.zeros((3, 4)), "logits")
    with pytest.raises(TypeError, match="floating"):
        ensemble_outputs(tf.zeros((2, 3, 4), tf.int32), "logits")


# ---------------------------------------------------------------------------------------------
# Ensemble as a Keras model


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_call_and_predict_match_numpy(members, member_logits, images, combine):
    x, _ = images
    ens = Ensemble(members, combine=combine)
    want = member_logits.mean(axis=0) if combine == "logits" else _softmax(member_logits).mean(0)
    got = ens.predict(x, batch_size=100, verbose=0)
    assert got.shape == (256, 10)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(ens(x[:17]).numpy(), want[:17], atol=1e-5)
    assert ens.members == members
    assert ens.num_members == NUM_MEMBERS
    assert ens.member_input_shape == (28, 28, 1)
    assert ens.member_output_shape == (10,)
    assert ens.metadata == [{}, {}, {}]


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_return_members(members, member_logits, images, combine):
    x, _ = images
    ens = Ensemble(members, combine=combine, return_members=True)
    stacked_want = member_logits if combine == "logits" else _softmax(member_logits)
    combined, stacked = ens(x[:20])
    assert combined.shape == (20, 10)
    assert stacked.shape == (NUM_MEMBERS, 20, 10)
    np.testing.assert_allclose(stacked.numpy(), stacked_want[:, :20], atol=1e-5)
    np.testing.assert_allclose(combined.numpy(), stacked_want[:, :20].mean(axis=0), atol=1e-5)
    # predict runs in batches and concatenates them; members still come back as (M, N, K).
    combined, stacked = ens.predict(x, batch_size=100, verbose=0)
    assert combined.shape == (256, 10)
    assert stacked.shape == (NUM_MEMBERS, 256, 10)
    np.testing.assert_allclose(stacked, stacked_want, atol=1e-5)
    np.testing.assert_allclose(combined, stacked_want.mean(axis=0), atol=1e-5)


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_evaluate(members, images, combine):
    x, y = images
    ens = Ensemble(members, combine=combine)
    ens.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=(combine == "logits")),
        metrics=["accuracy"],
    )
    loss, accuracy = ens.evaluate(x, y, batch_size=64, verbose=0)
    probs = _reference(np.stack([m.predict(x, verbose=0) for m in members]), combine)
    probs = probs["probabilities"]
    assert loss == pytest.approx(-np.mean(np.log(probs[np.arange(len(y)), y])), rel=1e-4)
    assert accuracy == pytest.approx(np.mean(probs.argmax(axis=-1) == y), abs=1e-6)


def test_summary_lists_members(members):
    lines = []
    Ensemble(members).summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert text.count("mlp (Sequential)") == NUM_MEMBERS


def test_member_checks(members):
    with pytest.raises(ValueError, match="empty"):
        Ensemble([])
    with pytest.raises(TypeError, match=r"members must be a non-empty list"):
        Ensemble(members[0])
    with pytest.raises(TypeError, match=r"members\[1\] must be a keras.Model.*str"):
        Ensemble([members[0], "model"])
    with pytest.raises(ValueError, match=r"combine='average'.*'logits', 'probs'"):
        Ensemble(members, combine="average")
    with pytest.raises(TypeError, match="return_members"):
        Ensemble(members, return_members="yes")
    other_classes = _mlp(7, classes=5)
    with pytest.raises(ValueError, match=r"same input shape.*\(None, 10\).*\(None, 5\)"):
        Ensemble([members[0], other_classes])
    other_input = _mlp(7, input_shape=(784,))
    with pytest.raises(ValueError, match=r"\(None, 28, 28, 1\).*\(None, 784\)"):
        Ensemble([members[0], other_input])
    with pytest.raises(ValueError, match="metadata"):
        Ensemble(members, metadata=[{}])


def test_mixed_sparse_and_dense_members(members, images):
    x, _ = images
    dense = _mlp(11)
    ens = Ensemble([members[0], dense])
    want = (members[0].predict(x, verbose=0) + dense.predict(x, verbose=0)) / 2
    np.testing.assert_allclose(ens.predict(x, verbose=0), want, atol=1e-5)


def test_keras_file_round_trip(members, images, tmp_path):
    x, _ = images
    ens = Ensemble(members, combine="probs", metadata=[{"index": i} for i in range(3)])
    path = str(tmp_path / "ensemble.keras")
    ens.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, Ensemble)
    assert restored.combine == "probs"
    assert restored.metadata == [{"index": 0}, {"index": 1}, {"index": 2}]
    assert [type(layer).__name__ for layer in ftk.masked_layers(restored.members[2])] == [
        "MaskedDense"
    ] * 2
    np.testing.assert_array_equal(
        restored.predict(x, verbose=0), ens.predict(x, verbose=0)
    )


# ---------------------------------------------------------------------------------------------
# Ticket directories


def test_from_directory(ticket_dir, members, images):
    x, _ = images
    for combine in ("logits", "probs"):
        ens = Ensemble.from_directory(ticket_dir, combine=combine)
        assert ens.num_members == NUM_MEMBERS
        assert [meta["index"] for meta in ens.metadata] == [0, 1, 2]
        assert [meta["seed"] for meta in ens.metadata] == [0, 1, 2]
        assert all(meta["method"] == "dst_ensemble" for meta in ens.metadata)
        for loaded, original in zip(ens.members, members):  # members in ticket order
            np.testing.assert_array_equal(
                loaded.predict(x[:32], verbose=0), original.predict(x[:32], verbose=0)
            )
        np.testing.assert_allclose(
            ens.predict(x, verbose=0),
            Ensemble(members, combine=combine).predict(x, verbose=0),
            atol=1e-6,
        )


def test_from_directory_errors(tmp_path, ticket_dir):
    with pytest.raises(ValueError, match="missing_dir"):
        Ensemble.from_directory(str(tmp_path / "missing_dir"))
    with pytest.raises(ValueError, match="no complete ticket"):
        Ensemble.from_directory(str(tmp_path))
    with pytest.raises(ValueError, match="combine='x'"):
        Ensemble.from_directory(ticket_dir, combine="x")
    broken = tmp_path / "broken"
    shutil.copytree(ticket_dir, str(broken))
    (broken / "ticket_1" / "metadata.json").write_text("{")
    with pytest.raises(ValueError, match=r"ticket_1/metadata\.json"):
        Ensemble.from_directory(str(broken))


@pytest.mark.parametrize("damage", ["missing_metadata", "corrupt_model", "empty_folder"])
def test_from_directory_refuses_a_damaged_ticket(ticket_dir, members, images, tmp_path, damage):
    """Issue: a damaged ticket used to give a warning and an ensemble with fewer members."""
    copy = tmp_path / "tickets"
    shutil.copytree(ticket_dir, str(copy))
    victim = copy / "ticket_1"
    if damage == "missing_metadata":
        os.remove(victim / "metadata.json")
        reason = r"ticket_1.*missing metadata\.json"
    elif damage == "corrupt_model":
        data = (victim / "model.keras").read_bytes()
        (victim / "model.keras").write_bytes(data[: len(data) // 3])
        reason = r"ticket_1.*model\.keras' is corrupt"
    else:
        shutil.rmtree(victim)
        victim.mkdir()
        reason = r"ticket_1.*missing metadata\.json and model\.keras"
    with pytest.raises(ValueError, match=reason + r".*allow_partial=True"):
        Ensemble.from_directory(str(copy))
    ens = Ensemble.from_directory(str(copy), combine="probs", allow_partial=True)
    assert [meta["index"] for meta in ens.metadata] == [0, 2]
    x, _ = images
    np.testing.assert_allclose(
        ens.predict(x[:16], verbose=0),
        Ensemble([members[0], members[2]], combine="probs").predict(x[:16], verbose=0),
        atol=1e-6,
    )
    with pytest.raises(TypeError, match="allow_partial"):
        Ensemble.from_directory(str(copy), allow_partial="yes")


@pytest.mark.parametrize("damage", ["gap", "num_tickets", "interrupted_overwrite"])
def test_from_directory_refuses_missing_members(ticket_dir, tmp_path, damage):
    """Issue 20: a ticket lost in an interrupted overwrite (or any gap) gave an ensemble with
    fewer members, without a word."""
    copy = tmp_path / "tickets"
    shutil.copytree(ticket_dir, str(copy))
    if damage == "gap":
        shutil.rmtree(copy / "ticket_1")
        reason, present = r"lacks \['ticket_1'\]", [0, 2]
    elif damage == "num_tickets":
        for i in range(3):
            meta_path = copy / f"ticket_{i}" / "metadata.json"
            meta = json.loads(meta_path.read_text())
            meta_path.write_text(json.dumps(dict(meta, num_tickets=4)))
        reason, present = r"lacks \['ticket_3'\] .*num_tickets=\[4\]", [0, 1, 2]
    else:
        os.rename(copy / "ticket_1", copy / ".trash-ticket_1-999999999-deadbeef")
        reason, present = (r"ticket_1: missing: an interrupted write left its complete copy in "
                           r"\.trash-ticket_1-999999999-deadbeef.*recover_interrupted_writes"), [0, 2]
    with pytest.raises(ValueError, match=reason + r".*allow_partial=True"):
        Ensemble.from_directory(str(copy))
    ens = Ensemble.from_directory(str(copy), allow_partial=True)
    assert [meta["index"] for meta in ens.metadata] == present
    if damage == "interrupted_overwrite":
        restored, removed = tickets.recover_interrupted_writes(str(copy), "ticket_1")
        assert (restored, removed) == (".trash-ticket_1-999999999-deadbeef", [])
        assert Ensemble.from_directory(str(copy)).num_members == 3


@pytest.mark.parametrize("damage", ["metadata_of_another_ticket", "model_keras_swapped",
                                    "saved_model_deleted", "dense_model_under_sparse_metadata"])
def test_from_directory_refuses_mismatched_parts(ticket_dir, tmp_path, damage):
    """Issue 20: loading never cross-checked a ticket's parts."""
    copy = tmp_path / "tickets"
    shutil.copytree(ticket_dir, str(copy))
    victim = copy / "ticket_0"
    if damage == "metadata_of_another_ticket":
        shutil.copy(copy / "ticket_1" / "metadata.json", victim / "metadata.json")
        reason = r"its metadata\.json is ticket 1's, not ticket 0's"
    elif damage == "model_keras_swapped":
        shutil.copy(copy / "ticket_1" / "model.keras", victim / "model.keras")
        reason = r"model\.keras differs from the one written with the ticket"
    elif damage == "saved_model_deleted":
        shutil.rmtree(victim / "saved_model")
        reason = r"saved_model is missing"
    else:
        _mlp(0).save(str(victim / "model.keras"))
        reason = r"model\.keras differs from the one written with the ticket"
    with pytest.raises(ValueError, match=r"ticket_0: " + reason):
        Ensemble.from_directory(str(copy))
    with pytest.raises(ValueError, match=r"ticket_0' fails its check: " + reason):
        tickets.read_ticket(str(victim))
    complete, incomplete = tickets.scan_tickets(str(copy))
    assert [os.path.basename(p) for p in complete] == ["ticket_1", "ticket_2"]
    assert [os.path.basename(p) for p, _ in incomplete] == ["ticket_0"]


def test_softmax_output_members_are_refused(tmp_path):
    """Issue 20: a softmax-output model written as a ticket had softmax applied twice by
    combine="probs"."""
    soft = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax",
                                                                   name="probs")], name="soft")
    with pytest.raises(ValueError, match=r"members\[0\] 'soft' ends in a softmax \(layer "
                                         r"'probs'\): members must output logits"):
        Ensemble([soft])
    with pytest.raises(ValueError, match=r"model='soft' ends in a softmax \(layer 'probs'\): a "
                                         r"ticket must output logits"):
        tickets.write_ticket(soft, str(tmp_path), 0)
    assert os.listdir(tmp_path) == []


def test_from_directory_with_saved_models_only(ticket_dir, members, images, tmp_path):
    """Tickets without model.keras load from their SavedModels (inference only)."""
    x, _ = images
    copy = str(tmp_path / "tickets")
    shutil.copytree(ticket_dir, copy)
    for path in tickets.list_tickets(copy):
        os.remove(os.path.join(path, "model.keras"))
    ens = Ensemble.from_directory(copy, combine="probs")
    want = Ensemble(members, combine="probs").predict(x, verbose=0)
    assert np.max(np.abs(ens.predict(x, verbose=0) - want)) <= 1e-5
    exported = ens.export(str(tmp_path / "serving"))
    serve = tf.saved_model.load(exported).signatures["serving_default"]
    got = serve(inputs=tf.constant(x))["probabilities"].numpy()
    assert np.max(np.abs(got - want)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Export for TF Serving


def _serve(path):
    return tf.saved_model.load(path).signatures["serving_default"]


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_export(members, member_logits, images, tmp_path, combine):
    x, _ = images
    ens = Ensemble(members, combine=combine)
    export_dir = str(tmp_path / "freetickets")
    path = ens.export(export_dir)
    assert path == os.path.join(export_dir, "1")
    assert os.listdir(export_dir) == ["1"]  # the temporary folder is gone
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))

    serve = _serve(path)
    _, kwargs = serve.structured_input_signature
    assert list(kwargs) == ["inputs"]
    assert kwargs["inputs"].shape.as_list() == [None, 28, 28, 1]
    assert kwargs["inputs"].dtype == tf.float32
    keys = ["class_ids", "mutual_information", "predictive_entropy", "probabilities"]
    if combine == "logits":
        keys = sorted(keys + ["logits"])
    assert sorted(serve.structured_outputs) == keys

    out = serve(inputs=tf.constant(x))
    predicted = ens.predict(x, verbose=0)
    if combine == "logits":
        assert np.max(np.abs(out["logits"].numpy() - predicted)) <= 1e-5
        predicted = tf.nn.softmax(predicted).numpy()
    assert np.max(np.abs(out["probabilities"].numpy() - predicted)) <= 1e-5
    want = _reference(member_logits, combine)
    np.testing.assert_array_equal(out["class_ids"].numpy(), want["class_ids"])
    np.testing.assert_allclose(
        out["predictive_entropy"].numpy(), want["predictive_entropy"], atol=1e-5
    )
    np.testing.assert_allclose(
        out["mutual_information"].numpy(), want["mutual_information"], atol=1e-5
    )
    assert np.mean(out["mutual_information"].numpy()) > 1e-3  # the members differ

    # Behaviour changed with compact storage: the variables are the stored values (active
    # weights and biases) and one bitmask; no mask variable, no full kernel.
    stored = dict(tf.train.list_variables(os.path.join(path, "variables", "variables")))
    assert not any("mask" in name for name in stored)
    num_values = sum(
        layer.num_active + layer.bias.shape[0]
        for member in members for layer in ftk.masked_layers(member)
    )
    assert [shape for name, shape in stored.items() if name.startswith("stored_values")] == [
        [num_values]
    ]


def test_export_identical_members_have_zero_mutual_information(members, images, tmp_path):
    x, _ = images
    clone = ftk.strip(members[0])  # a plain copy of members[0] with the same predictions
    ens = Ensemble([members[0], members[0], clone], combine="probs")
    out = _serve(ens.export(str(tmp_path / "same")))(inputs=tf.constant(x))
    np.testing.assert_allclose(out["mutual_information"].numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(
        out["probabilities"].numpy(), _softmax(members[0].predict(x, verbose=0)), atol=1e-5
    )


def test_export_versions_and_refusal(members, images, tmp_path):
    x, _ = images
    export_dir = str(tmp_path / "model")
    first = Ensemble(members[:2])
    second = Ensemble(members)
    first.export(export_dir)
    with pytest.raises(ValueError, match=r"model/1.*overwrite=True"):
        second.export(export_dir)
    second.export(export_dir, version=2)
    assert sorted(os.listdir(export_dir)) == ["1", "2"]
    want = second.predict(x[:8], verbose=0)
    second.export(export_dir, version=1, overwrite=True)
    assert sorted(os.listdir(export_dir)) == ["1", "2"]  # no trash left behind
    got = _serve(os.path.join(export_dir, "1"))(inputs=tf.constant(x[:8]))["logits"].numpy()
    assert np.max(np.abs(got - want)) <= 1e-5
    # An empty version folder (e.g. made by hand) is not refused.
    os.makedirs(os.path.join(export_dir, "3"))
    first.export(export_dir, version=3)
    with pytest.raises(ValueError, match=r"version=-1"):
        first.export(export_dir, version=-1)
    with pytest.raises(TypeError, match=r"export_dir"):
        first.export(None)


def test_export_crash_leaves_no_version(members, tmp_path, monkeypatch):
    export_dir = str(tmp_path / "model")

    def crash(*args, **kwargs):
        del args, kwargs
        raise RuntimeError("out of disk")

    monkeypatch.setattr(export_lib, "_export_models", crash)
    with pytest.raises(RuntimeError, match="out of disk"):
        Ensemble(members).export(export_dir)
    assert os.listdir(export_dir) == []


if __name__ == "__main__":  # bazel test / python tests/test_ensemble.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
