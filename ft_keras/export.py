"""Serving SavedModels for tickets and ensembles: entry points and request checks.

`export_models` writes one or several Keras models (a ticket, or an ensemble's members) as a
SavedModel that TF Serving runs unchanged (stock TensorFlow ops only). Its ``serving_default``
signature takes ``inputs`` (float32, ``(None,) + input_shape``) and returns what the caller's
``head`` makes of the stacked member logits (`ft_keras.tickets` and `ft_keras.Ensemble` document
their outputs). `build_serving` gives the same function in process.

How weights are stored (compactly where kernels hold zeros) and rebuilt at load:
`ft_keras.serving_storage`. How members are evaluated (dense kernels, positions of aligned
members grouped into one op, opt-in sparse kernels): `ft_keras.serving_graph`. Which choice is the
fastest where, measured: docs/benchmarks.md, "Serving".

**Requests.** The serving function refuses, with an InvalidArgumentError:

- a request whose shape is not ``(batch,) + input_shape`` (the message names the signature and
  the expected shape);
- a request that holds NaN or Inf (the message lists the first offending rows);
- with ``input_range=(low, high)`` declared at export, a request holding a value outside
  ``[low, high]`` (the message gives the range and the first offending rows);
- a request whose computation overflows float32 inside the model: a row where a Dense layer's
  pre-activations, the output of another layer with weights, or the logits are not finite
  (e.g. huge inputs whose products overflow, even where a ReLU would then turn the overflow
  into an answer made of biases alone); the message lists the first offending rows.

A request of another dtype is refused by TensorFlow before the graph runs. An empty batch
returns empty outputs.

Example:

>>> head = lambda member_logits: {"logits": member_logits[0]}
>>> export_models([sparse_model], "/tmp/sm/1", head, input_range=(0.0, 1.0))  # doctest: +SKIP
'/tmp/sm/1'
>>> [(r.layer, r.kernels) for r in kernel_plan(members)]            # doctest: +SKIP
[('fc1', 'dense'), ('fc2', 'dense'), ('logits', 'dense')]
"""

import os

import keras
import numpy as np
import tensorflow as tf

from ft_keras import _checks
from ft_keras import _keras_compat
from ft_keras import serving_graph
from ft_keras import sparsify as sparsify_lib
# Part of this module's interface (ticket tests measure their kernels with it).
from ft_keras.serving_storage import pack_kernel  # noqa: F401  pylint: disable=unused-import

SERVING_SIGNATURE = "serving_default"
SERVING_INPUT = "inputs"
SPARSE_KERNELS = serving_graph.SPARSE_KERNELS
GROUP_MODES = serving_graph.GROUP_MODES
# How many offending rows an error message lists.
_ROWS_LISTED = 10


# --------------------------------------------------------------------------------------------
# Argument checks and model shapes.


def model_input_shape(model, argument="model"):
    """The input shape of a single-input model without the batch axis, e.g. ``(28, 28, 1)``.

    Raises:
        ValueError: the model has several inputs, or no known input (an unbuilt or subclassed
            model never called on a `keras.Input`).
    """
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            f"{argument}={model.name!r} has no known input shape; build it from a keras.Input "
            "(Sequential with keras.Input, or a Functional model)."
        )
    if len(inputs) != 1:
        raise ValueError(
            f"{argument}={model.name!r} has {len(inputs)} inputs; only single-input models are "
            "supported."
        )
    return tuple(inputs[0].shape[1:])


def model_output_shape(model, argument="model"):
    """The output shape of a single-output model without the batch axis, e.g. ``(10,)``."""
    outputs = getattr(model, "outputs", None)
    if not outputs:
        raise ValueError(
            f"{argument}={model.name!r} has no known output shape; build it from a keras.Input."
        )
    if len(outputs) != 1:
        raise ValueError(
            f"{argument}={model.name!r} has {len(outputs)} outputs; only single-output models "
            "(one logits tensor) are supported."
        )
    return tuple(outputs[0].shape[1:])


def check_finite_weights(model, argument="model"):
    """Raises ValueError if a weight of ``model`` holds NaN or Inf, naming layer and variable.

    A ticket or an export is never written from such a model (a diverged run): it would serve
    NaN, or confident nonsense.
    """
    _checks.check_model(argument, model)
    _check_finite(model, sparsify_lib.walk_layers(model), argument)
    return model


def _walk_and_check_finite(models, argument):
    """`check_finite_weights` of each checked model of ``models``, named ``argument[i]``.

    Returns:
        The list of each model's `ft_keras.sparsify.walk_layers`, which `_export_models` and
        `_build_serving` take instead of walking the models again.
    """
    walked = []
    for i, model in enumerate(models):
        layers = list(sparsify_lib.walk_layers(model))
        _check_finite(model, layers, f"{argument}[{i}]")
        walked.append(layers)
    return walked


def _check_finite(model, layers, argument):
    """`check_finite_weights` of a checked model whose `walk_layers` are ``layers``."""
    for layer in layers:
        for variable in layer.weights:
            value = np.asarray(keras.ops.convert_to_numpy(variable))
            if value.dtype.kind != "f":
                continue
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            if bad:
                raise ValueError(
                    f"{argument}={model.name!r}: layer {layer.name!r}, variable "
                    f"{variable.path!r} holds {bad} non-finite value(s) (NaN or Inf) out of "
                    f"{value.size}; refusing to write it (did training diverge?)."
                )


def check_serving_options(sparse_kernels, group_members, input_range):
    """The checked ``sparse_kernels``, ``group_members`` and ``input_range`` of an export."""
    return (_checks.check_choice("sparse_kernels", sparse_kernels, SPARSE_KERNELS),
            _checks.check_choice("group_members", group_members, GROUP_MODES),
            check_input_range(input_range))


def check_input_range(input_range, argument="input_range"):
    """None, or ``(low, high)``: two finite numbers with low < high; returns floats or None."""
    if input_range is None:
        return None
    if not isinstance(input_range, (tuple, list)) or len(input_range) != 2:
        raise TypeError(f"{argument} must be None or a pair (low, high) of finite numbers; got "
                        f"{input_range!r} ({type(input_range).__name__}).")
    low = _checks.check_real(f"{argument}[0]", input_range[0])
    high = _checks.check_real(f"{argument}[1]", input_range[1])
    if not low < high:
        raise ValueError(f"{argument}={tuple(input_range)!r} is not allowed; it must be "
                         "(low, high) with low < high.")
    return low, high


# --------------------------------------------------------------------------------------------
# The serving function.


def _rows_assert(ok_rows, message, name):
    """Graph code: an Assert that all of ``ok_rows`` (bool, one per example) hold, whose
    message lists the first offending rows."""
    # int32 (with the string) makes a plain Assert op, not a conditional around it.
    bad_rows = tf.cast(tf.where(tf.logical_not(ok_rows))[:_ROWS_LISTED, 0], tf.int32)
    return tf.debugging.Assert(
        tf.reduce_all(ok_rows),
        [f"{SERVING_SIGNATURE}: {message} Offending rows (first {_ROWS_LISTED}):", bad_rows],
        name=name,
    )


def _request_checks(inputs, input_shape, input_range):
    """Asserts that ``inputs`` is (batch,) + input_shape, finite and in ``input_range``;
    returns it.

    The shape is checked twice: an Assert whose message names the signature (Grappler may fold
    its rank test away, using the signature's static rank) and `tf.ensure_shape`, which it
    keeps ("... is not compatible with expected shape [?, ...]").
    """
    rank = len(input_shape) + 1
    shape = tf.shape(inputs)
    padded = tf.concat([shape, tf.zeros([rank], tf.int32)], axis=0)[:rank]
    known = [i + 1 for i, dim in enumerate(input_shape) if dim is not None]  # None: any size
    shape_ok = tf.logical_and(
        tf.equal(tf.size(shape), rank),
        tf.reduce_all(tf.equal(tf.gather(padded, known),
                               tf.constant([input_shape[i - 1] for i in known], tf.int32))),
    )
    expected = (None,) + tuple(input_shape)
    check_shape = tf.debugging.Assert(
        shape_ok,
        [
            f"{SERVING_SIGNATURE} expects {SERVING_INPUT}: float32 of shape {expected} (a batch "
            "of examples); got shape",
            shape,
        ],
        name="check_request_shape",
    )
    with tf.control_dependencies([check_shape]):
        inputs = tf.ensure_shape(inputs, expected, name="check_request_rank")
        flat = tf.reshape(inputs, [shape[0], -1])
        checks = [_rows_assert(
            tf.reduce_all(tf.math.is_finite(flat), axis=1),
            f"{SERVING_INPUT} holds NaN or Inf; requests must be finite.",
            "check_request_finite")]
        if input_range is not None:
            low, high = input_range
            checks.append(_rows_assert(
                tf.reduce_all(tf.logical_and(flat >= low, flat <= high), axis=1),
                f"{SERVING_INPUT} holds values outside the input range [{low!r}, {high!r}] "
                "declared at export.",
                "check_request_range"))
    with tf.control_dependencies(checks):
        return tf.identity(inputs)


def _inside_check(check):
    """Graph code: asserts that the per-example sums ``check`` of the program are finite."""
    return _rows_assert(
        tf.math.is_finite(check),
        "computing the outputs overflowed float32 inside the model (a pre-activation, a "
        "layer's output or the logits is not finite); the request is out of the range the "
        "model can answer.",
        "check_inside_finite")


def build_serving(models, head, *, sparse_kernels="dense", group_members="convolutions",
                  input_range=None, argument="models"):
    """The tf.Module and the `tf.function` of a serving SavedModel for ``models``.

    Each Sequential / Functional member is served compacted (`ft_keras.compact`; with
    `ft_keras.sparsify.compact_aligned`, so that members of equal widths stay equal): its
    removable units and channels (those of channel-level DST, or units with provably zero
    output) are gone, and the SavedModel computes a narrower dense network.

    Args:
        models: a keras.Model or a non-empty list of built single-input Keras models that
            output logits and share their input shape.
        head: a callable mapping stacked member logits (M, B, ..., K) (float32) to the dict of
            outputs.
        sparse_kernels: "dense" (default), "csr" or "coo" (`ft_keras.serving_graph`).
        group_members: which positions of aligned members run as one op: "convolutions"
            (default), "all" or "none" (`ft_keras.serving_graph`).
        input_range: None, or (low, high): requests with values outside are refused.
        argument: how to name ``models`` in errors.

    Returns:
        ``(module, serve, plan)``: the module to save, the serving `tf.function` (input
        signature ``inputs``), and the `LayerPlan` rows of its Dense positions. In process,
        call `initialize` on the module before calling ``serve``.
    """
    models = _check_models(models, argument)
    sparse_kernels, group_members, input_range = check_serving_options(
        sparse_kernels, group_members, input_range)
    walked = [list(sparsify_lib.walk_layers(model)) for model in models]
    return _build_serving(models, walked, head, sparse_kernels, group_members, input_range)


def _build_serving(models, walked, head, sparse_kernels, group_members, input_range):
    """`build_serving` of checked arguments; ``walked``: each model's `walk_layers`."""
    input_shape = tuple(models[0].inputs[0].shape[1:])
    module = serving_graph.ServingModule()
    # The same model object appearing twice is evaluated once and stored once.
    unique = {}
    for model, layers in zip(models, walked):
        unique.setdefault(id(model), (model, layers))
    order = [list(unique).index(id(m)) for m in models]
    served, opaque = _compacted(*zip(*unique.values()))
    run, plan = serving_graph._build_program(  # pylint: disable=protected-access
        module, served, sparse_kernels, group_members, opaque)
    module.finish()
    spec = tf.TensorSpec((None,) + tuple(input_shape), tf.float32, name=SERVING_INPUT)

    @tf.function(input_signature=[spec], autograph=False)
    def serve(inputs):
        inputs = _request_checks(inputs, input_shape, input_range)
        logits, check = run(inputs)
        with tf.control_dependencies([_inside_check(check)]):
            member_logits = tf.stack([logits[i] for i in order])
        return head(member_logits)

    return module, serve, plan


def _compacted(models, walked):
    """``models`` as they are served: `ft_keras.sparsify.compact_aligned` of the Sequential /
    Functional ones (removable units and channels sliced out, masks baked into plain kernels;
    members of equal widths stay equal), the others as they are (a subclassed model, or one
    wrapping a loaded SavedModel, is evaluated by its own layers).

    Returns:
        ``(served, opaque)``: the served models and, for each, whether it wraps a loaded
        SavedModel (`ft_keras.serving_graph.is_opaque`, found from ``walked``).
    """
    # pylint: disable=protected-access
    opaque = [serving_graph._is_opaque(layers) for layers in walked]
    graph = [i for i, model in enumerate(models)
             if _keras_compat.is_graph_model(model) and not opaque[i]]
    served = list(models)
    if graph:
        for i, model in zip(graph, sparsify_lib._compact_aligned([models[i] for i in graph])):
            served[i] = model
    return served, opaque


def initialize(module):
    """Fills the caches of an in-process module (a loaded SavedModel fills its own)."""
    return module.initialize()


def kernel_plan(models, *, sparse_kernels="dense", group_members="convolutions"):
    """The `LayerPlan` of every Dense position that `export_models` would write for ``models``.
    """
    _, _, plan = build_serving(models, lambda logits: {"logits": logits},
                               sparse_kernels=sparse_kernels, group_members=group_members)
    return plan


def _check_models(models, argument="models"):
    if isinstance(models, keras.Model):
        models = [models]
    if not isinstance(models, (list, tuple)) or not models:
        raise TypeError(f"{argument} must be a keras.Model or a non-empty list of them; got "
                        f"{type(models).__name__}.")
    for i, model in enumerate(models):
        _checks.check_model(f"{argument}[{i}]", model)
        model_input_shape(model, f"{argument}[{i}]")
    return list(models)


def write_saved_model(module, serve, path):
    """Saves ``module`` with ``serve`` as the ``serving_default`` signature at ``path``."""
    tf.saved_model.save(
        module, path, signatures={SERVING_SIGNATURE: serve.get_concrete_function()}
    )
    return path


def export_models(models, path, head, *, sparse_kernels="dense", group_members="convolutions",
                  input_range=None):
    """Writes a serving SavedModel of ``models`` at ``path`` (not atomic: see the callers).

    Args:
        models: a keras.Model or a non-empty list of them (single input, logits output, equal
            input shapes); repeats allowed.
        path: the SavedModel folder to write (must not hold a SavedModel already).
        head: callable mapping stacked member logits (M, B, ..., K) to the outputs dict.
        sparse_kernels: "dense" (default), "csr" or "coo".
        group_members: "convolutions" (default), "all" or "none" (`build_serving`).
        input_range: None (default), or (low, high): the export refuses requests holding
            values outside ``[low, high]``.

    Returns:
        ``path``.

    Raises:
        ValueError: a weight is NaN or Inf (naming layer and variable), or a bad argument.
    """
    models = _check_models(models)
    sparse_kernels, group_members, input_range = check_serving_options(
        sparse_kernels, group_members, input_range)
    path = _checks.check_path("path", path)
    walked = _walk_and_check_finite(models, "models")
    return _export_models(models, walked, path, head, sparse_kernels, group_members,
                          input_range)


def _export_models(models, walked, path, head, sparse_kernels, group_members, input_range):
    """`export_models` of checked arguments (models whose weights were found finite);
    ``walked``: each model's `walk_layers` (from `_walk_and_check_finite`)."""
    module, serve, _ = _build_serving(models, walked, head, sparse_kernels, group_members,
                                      input_range)
    return write_saved_model(module, serve, path)


def saved_model_bytes(path):
    """Total bytes of the files under a SavedModel folder."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(folder, name))
    return total
