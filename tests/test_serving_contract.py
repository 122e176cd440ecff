"""The serving contract of ticket and ensemble SavedModels, tested as TF Serving calls them.

TF Serving's REST API takes ``{"signature_name": "serving_default", "instances": [...]}``, turns
the instances into one tensor of the signature's input dtype (JSON numbers become float32), runs
the signature (C++ ``Session::Run`` on the signature's tensor names, with no client-side shape
check) and answers ``{"predictions": [{output: value, ...} per instance]}``. `_rest_predict`
does the same through ``tf.saved_model.load``; `_session_run` feeds the signature's tensors in
a TF1 session the way the server's C++ code does.
"""

import json
import os
import shutil
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf

import ft_keras as ftk
from ft_keras import tickets

INPUT_SHAPE = (6, 5)
TICKET_OUTPUTS = ["class_ids", "logits", "probabilities"]
ENSEMBLE_OUTPUTS = {
    "logits": ["class_ids", "logits", "mutual_information", "predictive_entropy",
               "probabilities"],
    "probs": ["class_ids", "mutual_information", "predictive_entropy", "probabilities"],
}
SAVED_MODEL_CLI = os.path.join(os.path.dirname(os.sys.executable),
                               "saved_model_cli")


def _member(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input(INPUT_SHAPE),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu", name="fc1"),
        keras.layers.Dense(4, name="logits"),
    ], name="net")
    return ftk.sparsify(model, sparsity=0.8, seed=seed)


@pytest.fixture(scope="module")
def members():
    return [_member(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def exports(members, tmp_path_factory):
    """{name: (SavedModel path, output keys, in-process reference function)}."""
    root = tmp_path_factory.mktemp("serving")
    ticket = tickets.write_ticket(members[0], str(root / "tickets"), 0)
    out = {"ticket": (os.path.join(ticket, "saved_model", "1"), TICKET_OUTPUTS, members[0])}
    for combine in ("logits", "probs"):
        ens = ftk.Ensemble(members, combine=combine)
        out[f"ensemble_{combine}"] = (ens.export(str(root / combine)), ENSEMBLE_OUTPUTS[combine],
                                      ens)
    return out


def _rest_predict(path, body):
    """What TF Serving's REST predict API does with a JSON body (row format)."""
    request = json.loads(body)
    signature = tf.saved_model.load(path).signatures[request.get("signature_name",
                                                                 "serving_default")]
    _, inputs = signature.structured_input_signature
    (name, spec), = inputs.items()
    rows = [inst[name] if isinstance(inst, dict) else inst for inst in request["instances"]]
    tensor = tf.constant(np.asarray(rows, dtype=spec.dtype.as_numpy_dtype))
    outputs = signature(**{name: tensor})
    count = int(tensor.shape[0])
    predictions = [{key: value.numpy()[i].tolist() for key, value in outputs.items()}
                   for i in range(count)]
    return json.loads(json.dumps({"predictions": predictions}))


def _session_run(path, array, output):
    """Runs the signature in a TF1 session fed by tensor name, as TF Serving's C++ does (no
    client-side check of the fed shape)."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        signature = meta.signature_def["serving_default"]
        feed = graph.get_tensor_by_name(signature.inputs["inputs"].name)
        fetch = graph.get_tensor_by_name(signature.outputs[output].name)
        if not hasattr(session, "_call_tf_sessionrun"):
            pytest.skip("this TensorFlow has no raw session run to feed unchecked shapes")
        results = session._call_tf_sessionrun(  # pylint: disable=protected-access
            None, {feed._as_tf_output(): array}, [fetch._as_tf_output()], [], None)
        return results[0]


def _images(count, seed=0):
    return np.random.default_rng(seed).random((count,) + INPUT_SHAPE).astype(np.float32)


@pytest.mark.parametrize("name", ["ticket", "ensemble_logits", "ensemble_probs"])
def test_rest_instances_return_the_documented_predictions(exports, name):
    path, keys, reference = exports[name]
    x = _images(3)
    body = json.dumps({"signature_name": "serving_default", "instances": x.tolist()})
    response = _rest_predict(path, body)
    assert len(response["predictions"]) == 3
    assert all(sorted(p) == keys for p in response["predictions"])
    want = reference.predict(x, verbose=0)
    got = np.array([p["probabilities"] for p in response["predictions"]])
    if name != "ensemble_probs":
        got = np.array([p["logits"] for p in response["predictions"]])
    assert np.max(np.abs(got - want)) <= 1e-5
    assert [p["class_ids"] for p in response["predictions"]] == list(np.argmax(want, axis=-1))
    # The object form of an instance ({"inputs": ...}) gives the same answer.
    objects = json.dumps({"instances": [{"inputs": row} for row in x.tolist()]})
    assert _rest_predict(path, objects) == response


@pytest.mark.parametrize("name", ["ticket", "ensemble_probs"])
def test_wrong_shape_is_refused_naming_the_signature(exports, name):
    path = exports[name][0]
    expected = r"serving_default expects inputs: float32 of shape \(None, 6, 5\)"
    # Python's binding of the loaded signature refuses some shapes itself, naming the spec.
    refused = (rf"{expected}|TensorSpec\(shape=\(None, 6, 5\), dtype=tf.float32|"
               r"not compatible with expected shape \[\?,6,5\]")
    signature = tf.saved_model.load(path).signatures["serving_default"]
    for bad in (np.zeros((2, 30), np.float32), np.zeros((2, 6, 5, 1), np.float32),
                np.zeros((2, 5, 6), np.float32), np.zeros((0,), np.float32)):
        with pytest.raises((tf.errors.InvalidArgumentError, TypeError), match=refused):
            signature(inputs=tf.constant(bad))
        # As TF Serving feeds it: the Assert naming the signature, or (a wrong rank that
        # Grappler judged from the signature's static rank) tf.ensure_shape's message.
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=rf"{expected}.*got shape|not compatible with expected shape "
                                 r"\[\?,6,5\]"):
            _session_run(path, bad, "class_ids")
    body = json.dumps({"instances": np.zeros((2, 30)).tolist()})
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"got shape.*\[2 30\]"):
        _rest_predict(path, body)


def test_wrong_dtype_is_refused_naming_the_expected_type(exports):
    path = exports["ensemble_logits"][0]
    signature = tf.saved_model.load(path).signatures["serving_default"]
    _, inputs = signature.structured_input_signature
    assert inputs["inputs"].dtype == tf.float32
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError), match="float"):
        signature(inputs=tf.zeros((2,) + INPUT_SHAPE, tf.int32))
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError), match="float"):
        signature(inputs=tf.constant([["a"] * 5] * 6))
    # JSON strings cannot become float32: the REST layer refuses them before the graph runs.
    with pytest.raises(ValueError, match="could not convert"):
        _rest_predict(path, json.dumps({"instances": [[["x"] * 5] * 6]}))


@pytest.mark.parametrize("name", ["ticket", "ensemble_logits"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_requests_are_refused_naming_the_rows(exports, name, bad_value):
    path = exports[name][0]
    x = _images(5)
    x[1, 2, 3] = bad_value
    x[4, 0, 0] = bad_value
    signature = tf.saved_model.load(path).signatures["serving_default"]
    message = r"holds NaN or Inf.*Offending rows \(first 10\):.*\[1 4\]"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        signature(inputs=tf.constant(x))
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        _session_run(path, x, "probabilities")
    # The finite rows alone are answered.
    out = signature(inputs=tf.constant(x[[0, 2, 3]]))
    assert np.all(np.isfinite(out["probabilities"].numpy()))


def _exports_of(model, root, **kwargs):
    """{name: SavedModel path} of a ticket of ``model`` and of an M = 2 ensemble of it."""
    ticket = tickets.write_ticket(model, str(root / "tickets"), 0, **kwargs)
    ens = ftk.Ensemble([model, _member(7)], combine="logits")
    return {"ticket": os.path.join(ticket, "saved_model", "1"),
            "ensemble": ens.export(str(root / "ensemble"), **kwargs)}


def _bias_only_member():
    """A member whose first layer has only negative weights: a request of 3e38 drives every
    pre-activation to -inf, the ReLU turns them into 0, and Keras answers the last layer's
    biases, whatever the request."""
    model = _member(3)
    fc1 = ftk.masked_layers(model)[0]
    fc1.masked_kernel.assign(-np.abs(fc1.masked_kernel.numpy()) - 0.01)
    return model


def test_overflow_inside_the_model_is_refused_naming_the_rows(tmp_path):
    model = _bias_only_member()
    x = _images(4)
    x[1] = 3e38
    x[3] = -3e38  # positive pre-activations: +inf
    logits_layer = model.get_layer("logits")
    bias_only = model.predict(x[[1]], verbose=0)[0]
    np.testing.assert_array_equal(bias_only, logits_layer.bias.numpy())  # Keras' answer
    message = (r"computing the outputs overflowed float32 inside the model.*Offending rows "
               r"\(first 10\):.*\[1 3\]")
    for name, path in _exports_of(model, tmp_path).items():
        signature = tf.saved_model.load(path).signatures["serving_default"]
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            signature(inputs=tf.constant(x))
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            _session_run(path, x, "probabilities")
        out = signature(inputs=tf.constant(x[[0, 2]]))  # the other rows alone are answered
        assert np.all(np.isfinite(out["probabilities"].numpy())), name


def test_input_range_refuses_rows_outside_it_naming_them(tmp_path):
    model = _member(0)
    x = _images(5)
    x[0, 2, 2] = 1e30
    x[3, 0, 1] = -0.5
    bounded = _exports_of(model, tmp_path / "bounded", input_range=(0.0, 1.0))
    message = (r"inputs holds values outside the input range \[0.0, 1.0\] declared at export."
               r".*Offending rows \(first 10\):.*\[0 3\]")
    for name, path in bounded.items():
        signature = tf.saved_model.load(path).signatures["serving_default"]
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            signature(inputs=tf.constant(x))
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            _session_run(path, x, "class_ids")
        edges = x[[1, 2, 4]]
        edges[0, 0, 0], edges[1, 0, 0] = 0.0, 1.0  # the bounds themselves are inside
        assert signature(inputs=tf.constant(edges))["class_ids"].shape == (3,), name
    # Without a declared range, 1e30 is answered: with full certainty (entropy +0.0).
    free = _exports_of(model, tmp_path / "free")
    signature = tf.saved_model.load(free["ensemble"]).signatures["serving_default"]
    out = signature(inputs=tf.constant(x[[0]]))
    assert out["probabilities"].numpy().max() == 1.0
    entropy = out["predictive_entropy"].numpy()[0]
    assert entropy == 0.0 and not np.signbit(entropy)
    assert not np.signbit(out["mutual_information"].numpy()[0])


@pytest.mark.parametrize("name", ["ticket", "ensemble_logits", "ensemble_probs"])
def test_empty_batch_gives_empty_outputs(exports, name):
    path, keys, _ = exports[name]
    signature = tf.saved_model.load(path).signatures["serving_default"]
    out = signature(inputs=tf.zeros((0,) + INPUT_SHAPE))
    assert sorted(out) == keys
    assert out["probabilities"].shape == (0, 4)
    assert out["class_ids"].shape == (0,)
    assert _session_run(path, np.zeros((0,) + INPUT_SHAPE, np.float32), "class_ids").shape == (0,)
    # An empty "instances" list has no shape to infer: refused with the expected shape named.
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError), match=r"\(None, 6, 5\)"):
        _rest_predict(path, json.dumps({"instances": []}))


@pytest.mark.parametrize("name", ["ticket", "ensemble_logits"])
def test_saved_model_cli_lists_the_signature(exports, name):
    cli = SAVED_MODEL_CLI if os.path.exists(SAVED_MODEL_CLI) else shutil.which("saved_model_cli")
    if cli is None:
        pytest.skip("saved_model_cli is not installed next to this Python (pip install tensorflow)")
    path, keys, _ = exports[name]
    result = subprocess.run([cli, "show", "--dir", path, "--all"], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert "signature_def['serving_default']" in text
    assert "inputs['inputs'] tensor_info:" in text
    assert "dtype: DT_FLOAT" in text and "shape: (-1, 6, 5)" in text
    for key in keys:
        assert f"outputs['{key}'] tensor_info:" in text


if __name__ == "__main__":  # bazel test / python tests/test_serving_contract.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
