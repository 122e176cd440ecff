"""`Ensemble`: average M tickets (sparse or plain Keras models) as one Keras model.

FreeTickets predicts with the mean of its members. `Ensemble` is a `keras.Model` whose members
are Keras models that output logits; it averages either their logits (``combine="logits"``,
the default, output = logits) or their softmax probabilities (``combine="probs"``, the paper's
evaluation, output = probabilities). It predicts, evaluates and summarises like any Keras model,
loads the tickets that `ft_keras.tickets.write_ticket` wrote (`Ensemble.from_directory`), and
exports a TF Serving SavedModel with the ensemble's predictive distribution and two
uncertainty scores (`Ensemble.export`): members compacted and computed with dense kernels,
kernels that hold zeros stored compactly, members of equal widths evaluated together where that
pays (see `ft_keras.export`).

Example:

>>> ens = Ensemble.from_directory("/tmp/tickets", combine="probs")      # doctest: +SKIP
>>> ens.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False),
...             metrics=["accuracy"])                                   # doctest: +SKIP
>>> ens.evaluate(x_test, y_test)                                        # doctest: +SKIP
>>> ens.export("/tmp/serving/freetickets")       # writes /tmp/serving/freetickets/1/
'/tmp/serving/freetickets/1'
"""

import json
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ft_keras import _checks
from ft_keras import export as export_lib
from ft_keras import tickets as tickets_lib

COMBINE_MODES = ("logits", "probs")


def _check_combine(combine):
    return _checks.check_choice("combine", combine, COMBINE_MODES)


def _check_member_logits(member_logits):
    member_logits = tf.convert_to_tensor(member_logits)
    if not member_logits.dtype.is_floating:
        raise TypeError(
            f"member_logits must be floating point; got dtype {member_logits.dtype.name}."
        )
    rank = member_logits.shape.rank
    if rank is not None and rank < 3:
        raise ValueError(
            f"member_logits must have shape (members, batch, ..., classes), rank >= 3; got "
            f"shape {tuple(member_logits.shape)}."
        )
    return tf.cast(member_logits, tf.float32)


def _entropy(probs, log_probs):
    """Entropy in nats over the last axis; 0 * log 0 counts as 0. Every p log p is <= 0, so
    the entropy is the absolute value of their sum (+0.0, never -0.0, at certainty)."""
    return tf.abs(tf.reduce_sum(tf.math.multiply_no_nan(log_probs, probs), axis=-1))


def combine_members(member_logits, combine):
    """The ensemble output and the per-member output that `Ensemble.call` returns.

    Args:
        member_logits: float tensor ``(M, batch, ..., K)`` of member logits.
        combine: "logits" or "probs".

    Returns:
        ``(combined, members)``: for "logits", the mean logits ``(batch, ..., K)`` and the member
        logits; for "probs", the mean of the member softmax probabilities and the member
        probabilities ``(M, batch, ..., K)``.
    """
    combine = _check_combine(combine)
    member_logits = _check_member_logits(member_logits)
    if combine == "logits":
        return tf.reduce_mean(member_logits, axis=0), member_logits
    member_probs = tf.nn.softmax(member_logits, axis=-1)
    return tf.reduce_mean(member_probs, axis=0), member_probs


def ensemble_outputs(member_logits, combine="logits"):
    """The ensemble's predictive distribution and uncertainty scores from member logits.

    Pure TensorFlow (usable inside a `tf.function` and a SavedModel). With
    ``p_m = softmax(member_logits[m])`` and M members:

    - ``probabilities``: the ensemble distribution; ``softmax(mean_m logits_m)`` for
      ``combine="logits"``, ``mean_m p_m`` for ``combine="probs"``.
    - ``logits`` (``combine="logits"`` only): ``mean_m logits_m``.
    - ``class_ids``: int64 argmax of ``probabilities``.
    - ``predictive_entropy``: entropy of ``probabilities`` in nats.
    - ``mutual_information``: ``H(mean_m p_m) - mean_m H(p_m)`` in nats (BALD's mutual
      information: how much the members disagree; 0 when they agree), clipped at 0 against
      rounding. It is always computed from the mixture ``mean_m p_m``: for ``combine="probs"``
      that is ``predictive_entropy - mean_m H(p_m)``; for ``combine="logits"`` the entropy of
      the averaged-logits distribution can fall below the members' mean entropy, so that
      difference would not measure disagreement.

    Example:

    >>> logits = tf.constant([[[2.0, 0.0]], [[0.0, 2.0]]])   # 2 members, 1 example, 2 classes
    >>> out = ensemble_outputs(logits, "probs")
    >>> out["probabilities"].numpy()
    array([[0.5, 0.5]], dtype=float32)

    Args:
        member_logits: float tensor ``(M, batch, ..., K)``.
        combine: "logits" or "probs".

    Returns:
        A dict of tensors: ``logits`` (only for "logits"), ``probabilities`` ``(batch, ..., K)``,
        ``class_ids``, ``predictive_entropy`` and ``mutual_information`` ``(batch, ...)``.

    Raises:
        ValueError: unknown ``combine``, or ``member_logits`` of rank < 3.
        TypeError: non-floating ``member_logits``.
    """
    combine = _check_combine(combine)
    member_logits = _check_member_logits(member_logits)
    num_members = tf.cast(tf.shape(member_logits)[0], tf.float32)
    member_log_probs = tf.nn.log_softmax(member_logits, axis=-1)
    member_probs = tf.exp(member_log_probs)
    # log of the mixture mean_m p_m, computed stably in log space.
    mixture_log_probs = tf.reduce_logsumexp(member_log_probs, axis=0) - tf.math.log(num_members)
    mixture_probs = tf.reduce_mean(member_probs, axis=0)
    outputs = {}
    if combine == "logits":
        mean_logits = tf.reduce_mean(member_logits, axis=0)
        log_probs = tf.nn.log_softmax(mean_logits, axis=-1)
        probs = tf.nn.softmax(mean_logits, axis=-1)
        outputs["logits"] = mean_logits
    else:
        log_probs = mixture_log_probs
        probs = mixture_probs
    mean_member_entropy = tf.reduce_mean(_entropy(member_probs, member_log_probs), axis=0)
    mutual_information = _entropy(mixture_probs, mixture_log_probs) - mean_member_entropy
    outputs["probabilities"] = probs
    outputs["class_ids"] = tf.argmax(probs, axis=-1, output_type=tf.int64)
    outputs["predictive_entropy"] = _entropy(probs, log_probs)
    outputs["mutual_information"] = tf.maximum(mutual_information, 0.0)
    return outputs


def _check_members(members):
    if isinstance(members, keras.Model) or not isinstance(members, (list, tuple)):
        raise TypeError(
            f"members must be a non-empty list of keras.Model; got {type(members).__name__}."
        )
    if not members:
        raise ValueError("members=[] is empty; an Ensemble needs at least one keras.Model.")
    for i, member in enumerate(members):
        _checks.check_model(f"members[{i}]", member)
        if tickets_lib.output_kind(member) != "logits":
            raise ValueError(
                f"members[{i}] {member.name!r} ends in a softmax (layer "
                f"{member.layers[-1].name!r}): members must output logits, since the ensemble "
                "applies the softmax itself (combine='probs' would apply it twice). Drop the "
                "final softmax."
            )
    input_shapes = [
        export_lib.model_input_shape(m, f"members[{i}]") for i, m in enumerate(members)
    ]
    output_shapes = [
        export_lib.model_output_shape(m, f"members[{i}]") for i, m in enumerate(members)
    ]
    if len(set(input_shapes)) > 1 or len(set(output_shapes)) > 1:
        listing = ", ".join(
            f"members[{k}] {m.name!r}: {(None,) + i} -> {(None,) + o}"
            for k, (m, i, o) in enumerate(zip(members, input_shapes, output_shapes))
        )
        raise ValueError(
            "members must all have the same input shape and the same output shape; got "
            + listing
            + "."
        )
    if not output_shapes[0]:
        raise ValueError(
            f"members output shape {(None,) + output_shapes[0]} has no class axis; members must "
            "output logits of shape (batch, ..., classes)."
        )
    return list(members), input_shapes[0], output_shapes[0]


def _check_metadata(metadata, num_members):
    if metadata is None:
        return [{} for _ in range(num_members)]
    if not isinstance(metadata, (list, tuple)):
        raise TypeError(
            f"metadata must be None or a list of {num_members} dicts (one per member); got "
            f"{metadata!r} ({type(metadata).__name__})."
        )
    if len(metadata) != num_members:
        raise ValueError(
            f"metadata must be None or a list of {num_members} dicts (one per member); got "
            f"{len(metadata)} of them."
        )
    for i, item in enumerate(metadata):
        if not isinstance(item, dict):
            raise TypeError(f"metadata[{i}] must be a dict; got {type(item).__name__}.")
    return [dict(item) for item in metadata]


def _missing_members(complete, incomplete, metadata):
    """The ticket names missing from ``ticket_dir`` (a description, "" when none): gaps in the
    indices 0..max, and indices up to the ``num_tickets`` the tickets' metadata records."""
    present = {int(os.path.basename(path).split("_")[1]) for path in complete}
    present |= {int(os.path.basename(path).split("_")[1]) for path, _ in incomplete}
    planned = {meta.get("num_tickets") for meta in metadata} - {None}
    expected = max(present, default=-1) + 1
    if len(planned) == 1 and isinstance(min(planned), int):
        expected = max(expected, min(planned))
    missing = [f"ticket_{i}" for i in range(expected) if i not in present]
    if not missing:
        return ""
    return (f"{missing} (implied by the indices present and num_tickets="
            f"{sorted(planned) or None} in their metadata)")


@keras.saving.register_keras_serializable(package="ft_keras")
class Ensemble(keras.Model):
    """A Keras model that averages the predictions of member models (tickets).

    Every member maps the same inputs to logits of the same shape ``(batch, ..., K)``; members
    may be sparse (masked layers) or plain Keras models. With ``combine="logits"`` the
    ensemble outputs the mean of the member logits, so compile it with a ``from_logits=True``
    loss. With ``combine="probs"`` (the FreeTickets paper's evaluation) it outputs the mean of
    the member softmax probabilities: compile with ``from_logits=False``.

    Example:

    >>> members = [ftk.sparsify(model, sparsity=0.8, seed=s) for s in range(3)]
    >>> ens = Ensemble(members, combine="probs")
    >>> ens.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False),
    ...             metrics=["accuracy"])
    >>> probs = ens.predict(x)                                   # (N, K) probabilities
    >>> ens_m = Ensemble(members, return_members=True)
    >>> mean_logits, member_logits = ens_m(x)                    # (N, K), (3, N, K)

    Args:
        members: a non-empty list of built, single-input, single-output `keras.Model`s with
            equal input and output shapes. The same model may appear more than once.
        combine: "logits" (mean of member logits; output is logits) or "probs" (mean of member
            softmax probabilities; output is probabilities).
        return_members: if True, ``call`` (and ``predict``) return ``(combined, stacked)`` where
            ``stacked`` has shape ``(M, batch, ..., K)``: member logits for "logits", member
            probabilities for "probs". Use False to ``fit`` / ``evaluate``.
        name: the model name.
        metadata: optional list of one dict per member (ticket metadata); see ``metadata``.
        **kwargs: passed to `keras.Model` (e.g. ``trainable``).

    Attributes:
        members: the member models, in order.
        metadata: list of one dict per member: the tickets' metadata for `from_directory`,
            empty dicts otherwise.
        combine, return_members: as given.

    Persistence: `export` writes a TF Serving SavedModel; `ft_keras.tickets` folders keep
    the sparse members. ``ens.save("ens.keras")`` also works (members are saved as nested
    models, weights and masks included); a member that appears several times is saved as
    independent copies.
    """

    def __init__(
        self,
        members,
        combine="logits",
        return_members=False,
        name="ensemble",
        metadata=None,
        **kwargs,
    ):
        members, input_shape, output_shape = _check_members(members)
        combine = _check_combine(combine)
        return_members = _checks.check_bool("return_members", return_members)
        metadata = _check_metadata(metadata, len(members))
        try:
            metadata_json = json.dumps(metadata)
        except (TypeError, ValueError) as error:
            raise TypeError(f"metadata must be JSON-serialisable: {error}.") from None
        super().__init__(name=name, **kwargs)
        self._members = tuple(members)  # a tuple: tracked as layers, not wrapped in a list type
        self.combine = combine
        self.return_members = bool(return_members)
        self._member_input_shape = tuple(input_shape)
        self._member_output_shape = tuple(output_shape)
        self._metadata_json = metadata_json  # a string: immune to Keras' attribute tracking
        self.build((None,) + self._member_input_shape)

    # ---------------------------------------------------------------------------------------
    # Properties.

    @property
    def members(self):
        """The member models, in order (a new list each time)."""
        return list(self._members)

    @property
    def num_members(self):
        """M, the number of members."""
        return len(self._members)

    @property
    def metadata(self):
        """One dict per member (ticket metadata, or empty); a fresh copy each time."""
        return json.loads(self._metadata_json)

    @property
    def member_input_shape(self):
        """The members' input shape without the batch axis, e.g. ``(28, 28, 1)``."""
        return self._member_input_shape

    @property
    def member_output_shape(self):
        """The members' output (logits) shape without the batch axis, e.g. ``(10,)``."""
        return self._member_output_shape

    # ---------------------------------------------------------------------------------------
    # Keras model.

    def build(self, input_shape):
        del input_shape  # members are built already
        self.built = True

    def member_logits(self, inputs, training=None):
        """The stacked member logits ``(M, batch, ..., K)``, float32."""
        return tf.stack(
            [tf.cast(m(inputs, training=training), tf.float32) for m in self._members], axis=0
        )

    def call(self, inputs, training=None):
        combined, members = combine_members(self.member_logits(inputs, training), self.combine)
        if self.return_members:
            return combined, members
        return combined

    def compute_output_shape(self, input_shape):
        batch = tuple(input_shape)[0] if input_shape else None
        combined = (batch,) + self._member_output_shape
        if self.return_members:
            return combined, (self.num_members,) + combined
        return combined

    def predict_step(self, data):
        outputs = super().predict_step(data)
        if self.return_members:
            # Keras concatenates predict batches along axis 0: put the batch axis first here
            # and move the member axis back in `predict`.
            combined, members = outputs
            outputs = (combined, _swap_first_axes(members))
        return outputs

    def predict(self, x, *args, **kwargs):
        """`keras.Model.predict`; with ``return_members`` the members come back as (M, N, ...).

        Returns:
            The combined predictions ``(N, ..., K)`` (logits for "logits", probabilities for
            "probs"), or with ``return_members`` a tuple ``(combined, stacked)`` with
            ``stacked`` of shape ``(M, N, ..., K)``.
        """
        outputs = super().predict(x, *args, **kwargs)
        if self.return_members:
            combined, members = outputs
            outputs = (combined, np.swapaxes(members, 0, 1))
        return outputs

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "combine": self.combine,
            "return_members": self.return_members,
            "members": [keras.saving.serialize_keras_object(m) for m in self._members],
            "metadata": self.metadata,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        members = [
            keras.saving.deserialize_keras_object(m, custom_objects=custom_objects)
            for m in config.pop("members")
        ]
        return cls(members, **config)

    # ---------------------------------------------------------------------------------------
    # Tickets and serving.

    @classmethod
    def from_directory(cls, ticket_dir, combine="logits", return_members=False, name="ensemble",
                       *, allow_partial=False):
        """Builds an ensemble from the tickets in ``ticket_dir`` (see `ft_keras.tickets`).

        Every ``ticket_<i>`` folder must be a complete, readable ticket: one that is not
        (missing files, or a corrupt ``metadata.json`` / ``model.keras`` / SavedModel) makes
        this refuse, naming the ticket and what is wrong, unless ``allow_partial=True``, which
        logs a warning and builds the ensemble from the tickets that are fine. Hidden folders
        (``.tmp-*``: writes in progress or interrupted) are not tickets and are ignored.

        Example:

        >>> ens = Ensemble.from_directory("/tmp/tickets", combine="probs")   # doctest: +SKIP
        >>> [m["index"] for m in ens.metadata]                              # doctest: +SKIP
        [0, 1, 2]

        Args:
            ticket_dir: a folder of ``ticket_<i>/`` folders written by
                `ft_keras.tickets.write_ticket`.
            combine, return_members, name: as in `Ensemble`.
            allow_partial: skip (with a warning) damaged tickets instead of refusing.

        Returns:
            An `Ensemble` whose members are the tickets in index order and whose ``metadata``
            lists their metadata dicts.

        Raises:
            ValueError: ``ticket_dir`` is missing or holds no complete ticket; a ticket is
                incomplete or corrupt (the message names it) and ``allow_partial`` is False;
                the members' shapes differ.
        """
        _check_combine(combine)
        _checks.check_bool("return_members", return_members)
        allow_partial = _checks.check_bool("allow_partial", allow_partial)
        ticket_dir = _checks.check_path("ticket_dir", ticket_dir)
        if not os.path.isdir(ticket_dir):
            raise ValueError(f"ticket_dir={ticket_dir!r} does not exist or is not a folder.")
        complete, incomplete = tickets_lib.scan_tickets(ticket_dir)
        problems = [f"{path}: {reason}" for path, reason in incomplete]
        members = []
        metadata = []
        for path in complete:
            try:
                model, meta = tickets_lib.read_ticket(path)
            except ValueError as error:
                if not allow_partial:
                    raise ValueError(
                        f"ticket {path!r} is damaged: {error} (pass allow_partial=True to "
                        "build the ensemble from the other tickets)."
                    ) from error
                problems.append(f"{path}: {error}")
                continue
            members.append(model)
            metadata.append(meta)
        if incomplete and not allow_partial:
            raise ValueError(
                f"ticket_dir={ticket_dir!r} holds damaged tickets: " + "; ".join(problems)
                + " (pass allow_partial=True to build the ensemble from the complete ones)."
            )
        gaps = _missing_members(complete, incomplete, metadata)
        if gaps and not allow_partial:
            raise ValueError(
                f"ticket_dir={ticket_dir!r} lacks {gaps}: the ensemble would have fewer members "
                "than the run wrote, without a word (pass allow_partial=True to build it from "
                "the tickets that are there)."
            )
        if gaps:
            problems.append(f"{ticket_dir}: lacks {gaps}")
        for problem in problems:
            logging.warning("Ensemble.from_directory skips damaged ticket %s", problem)
        if not members:
            raise ValueError(
                f"ticket_dir={ticket_dir!r} holds no complete ticket_<i> folder"
                + (f" (damaged: {problems})" if problems else "") + "."
            )
        return cls(
            members, combine=combine, return_members=return_members, name=name, metadata=metadata
        )

    def _head(self):
        combine = self.combine
        return lambda member_logits: ensemble_outputs(member_logits, combine)

    def serving_fn(self, sparse_kernels="dense", group_members="convolutions", input_range=None):
        """The `tf.function` that `export` saves as ``serving_default``, ready to call here.

        Args:
            sparse_kernels, group_members, input_range: as in `export`.

        Returns:
            A `tf.function` taking ``inputs`` (float32, ``(None,) + member_input_shape``) and
            returning the dict of `ensemble_outputs` (the request checks of the export
            included). Its attribute ``plan`` lists the kernel choices (`LayerPlan` rows).
        """
        # pylint: disable=protected-access
        sparse_kernels, group_members, input_range = export_lib.check_serving_options(
            sparse_kernels, group_members, input_range)
        walked = export_lib._walk_and_check_finite(self._members, "members")
        module, serve, plan = export_lib._build_serving(
            self._members, walked, self._head(), sparse_kernels, group_members, input_range)
        export_lib.initialize(module)
        serve.module = module
        serve.plan = plan
        return serve

    def export(self, export_dir, version=1, overwrite=False, *,  # pylint: disable=arguments-differ
               sparse_kernels="dense", group_members="convolutions", input_range=None):
        """Writes the ensemble as a TF Serving SavedModel at ``export_dir/<version>/``.

        Unlike `keras.Model.export`, this writes TF Serving's layout (a numbered version folder
        under ``export_dir``), atomically (a hidden temporary folder renamed into place, which
        TF Serving ignores until it appears under its number). The SavedModel holds only
        standard TF ops and variables; its ``serving_default`` signature takes ``inputs``
        (float32, ``(None,) + member_input_shape``) and returns the dict of
        `ensemble_outputs`: ``probabilities``, ``class_ids``, ``predictive_entropy``,
        ``mutual_information`` and, for ``combine="logits"``, ``logits``. A request whose shape
        is not ``(batch,) + member_input_shape``, that holds NaN or Inf, that leaves
        ``input_range``, or whose computation overflows inside a member is refused with an
        error that names the rows (`ft_keras.export`, "Requests"); an empty batch gives empty
        outputs.

        Kernels that hold zeros (masked, or of compacted members) are stored compactly (an
        M-member ensemble at sparsity 0.8 is smaller than one dense model) and rebuilt dense
        at load; the convolutions of members of equal shapes run as one op
        (`ft_keras.serving_graph`).

        Example:

        >>> ens.export("/tmp/serving/freetickets", input_range=(0.0, 1.0))  # doctest: +SKIP
        '/tmp/serving/freetickets/1'
        >>> # tensorflow_model_server --model_name=freetickets \\
        >>> #     --model_base_path=/tmp/serving/freetickets --rest_api_port=8501

        Args:
            export_dir: the model base path (created if missing).
            version: the version number, an int >= 0 (TF Serving serves the highest).
            overwrite: replace an existing non-empty ``export_dir/<version>``.
            sparse_kernels: how Dense kernels that hold zeros are computed: "dense" (default),
                or the opt-in sparse products "csr" / "coo" (see docs/benchmarks.md, "Serving",
                for where they pay).
            group_members: which layers of members that are the same chain of layers run as
                one op for all members: "convolutions" (default; Dense layers run per member),
                "all" (Dense layers too) or "none" (`ft_keras.serving_graph`).
            input_range: None (default: any finite value), or (low, high): requests holding a
                value outside ``[low, high]`` are refused.

        Returns:
            The path of the version folder.

        Raises:
            ValueError: ``export_dir/<version>`` exists and is not empty and ``overwrite`` is
                False; a bad ``version`` / ``sparse_kernels`` / ``group_members`` /
                ``input_range``; a member
                weight that is NaN or Inf (the message names member, layer and variable).
            TypeError: an argument of the wrong type (e.g. ``group_members=True``).
        """
        # pylint: disable=protected-access
        export_dir = _checks.check_path("export_dir", export_dir)
        version = _checks.check_int("version", version, minimum=0)
        overwrite = _checks.check_bool("overwrite", overwrite)
        sparse_kernels, group_members, input_range = export_lib.check_serving_options(
            sparse_kernels, group_members, input_range)
        if os.path.exists(export_dir) and not os.path.isdir(export_dir):
            raise ValueError(f"export_dir={export_dir!r} exists and is not a folder.")
        # The members were checked when the ensemble was made: walked and scanned once here.
        walked = export_lib._walk_and_check_finite(self._members, "members")
        destination = os.path.join(export_dir, str(version))
        head = self._head()
        tickets_lib.atomic_folder(
            destination,
            lambda tmp: export_lib._export_models(
                self._members, walked, tmp, head, sparse_kernels, group_members, input_range),
            overwrite=overwrite,
            argument="version folder",
        )
        return destination


def _swap_first_axes(tensor):
    rank = tensor.shape.rank
    if rank is None:
        rank = tf.rank(tensor)
        perm = tf.concat([[1, 0], tf.range(2, rank)], axis=0)
    else:
        perm = [1, 0] + list(range(2, rank))
    return tf.transpose(tensor, perm)

