"""Tickets on disk: write, list and read sparse subnetworks, atomically.

A *ticket* is one sparse network saved during (or after) dynamic sparse training. A ticket
directory holds one folder per ticket::

    ticket_dir/
      ticket_0/
        model.keras              the sparse model (masked layers, masks and weights)
        saved_model/1/           a TF Serving SavedModel (compacted, stored compactly)
        metadata.json            index, method, phase, epoch, step, monitor, densities, versions...
      ticket_1/
      ...

``model.keras`` reloads with ``keras.models.load_model`` (masks and weights bit-exact).
``saved_model/<version>/`` is a TF Serving SavedModel written by `ft_keras.export`: the masked
model compacted (`ft_keras.compact`) and computed with dense kernels, kernels that hold zeros
stored compactly (nonzero values and their positions), and one signature, ``serving_default``: input ``inputs``
(float32, ``(None,) + input_shape``), outputs ``logits``, ``probabilities`` (softmax) and
``class_ids`` (int64 argmax). The folder ``saved_model/`` is a TF Serving model base path on its
own. A model with NaN or Inf weights is never written (ValueError naming layer and variable).

Writes are atomic: everything goes to a hidden sibling folder ``.tmp-ticket_<i>-<pid>-<random>/``,
renamed ``.ready-...`` once complete and then to ``ticket_<i>`` (an old ticket is moved to
``.trash-...`` first and deleted last), so a crash leaves either a complete ticket or nothing
that `list_tickets` (or `ft_keras.Ensemble.from_directory`) accepts, and
`recover_interrupted_writes` rolls an interrupted overwrite forward or back.

Tickets verify themselves: ``metadata.json`` records the ticket's index, its output kind
(``"logits"``; a softmax-output model is refused) and sha256 digests of ``model.keras`` and of
the ``saved_model/`` tree; `read_ticket`, `scan_tickets` and `Ensemble.from_directory` refuse a
ticket whose parts do not match (swapped, replaced, changed or missing).

Example:

>>> sparse = ftk.sparsify(model, sparsity=0.8, seed=0)
>>> sparse.fit(x, y, callbacks=[ftk.DynamicSparsity()])       # doctest: +SKIP
>>> prepare_ticket_dir("/tmp/tickets", overwrite=True)         # doctest: +SKIP
>>> path = write_ticket(sparse, "/tmp/tickets", 0, {"method": "dst_ensemble", "seed": 0})
>>> model, metadata = read_ticket(path)                         # doctest: +SKIP
>>> list_tickets("/tmp/tickets")                                # doctest: +SKIP
['/tmp/tickets/ticket_0']
"""

import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import zipfile

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ft_keras import _checks
from ft_keras import atomic_files
from ft_keras import export as export_lib
# Crash-safe writes and the folder lock (ft_keras.atomic_files), part of this module's API.
from ft_keras.atomic_files import LOCK_FILE
from ft_keras.atomic_files import atomic_folder
from ft_keras.atomic_files import interrupted_writes  # noqa: F401
from ft_keras.atomic_files import lock_ticket_dir  # noqa: F401
from ft_keras.atomic_files import recover_interrupted_writes  # noqa: F401
from ft_keras.atomic_files import unlock_ticket_dir  # noqa: F401
from ft_keras.atomic_files import write_file_atomically  # noqa: F401
from ft_keras.export import SERVING_INPUT
from ft_keras.export import SERVING_SIGNATURE
# Import the functions: the package attribute ``ft_keras.sparsify`` is the function, not the module.
from ft_keras.sparsify import _sparsity_report
from ft_keras.sparsify import walk_layers
from ft_keras.version import __version__

FORMAT_VERSION = 2
MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
SAVED_MODEL_DIR = "saved_model"
SAVED_MODEL_PB = "saved_model.pb"

_TICKET_RE = re.compile(r"^ticket_(0|[1-9][0-9]*)$")
_VERSION_RE = re.compile(r"^(0|[1-9][0-9]*)$")
#: The record of the FreeTickets run that writes a ticket folder (`ft_keras.free_tickets`) and
#: its progress files: control files, not tickets (like `LOCK_FILE`).
RUN_FILE = ".ft_keras-run.json"
PROGRESS_PREFIX = ".progress-"

# Keys that write_ticket computes itself; a caller's metadata may not set them.
COMPUTED_KEYS = (
    "format_version",
    "index",
    "layers",
    "density",
    "num_params",
    "num_active_params",
    "versions",
    "created",
    "output",
    "files",
)
# Keys every ticket has; None unless the caller gives a value.
CALLER_KEYS = (
    "method",
    "phase",
    "epoch",
    "step",
    "monitor",
    "monitor_value",
    "seed",
    "forward_flops",
)


# --------------------------------------------------------------------------------------------
# Writing.


def _ticket_head(member_logits):
    """The outputs of a ticket's ``serving_default`` from its logits (stacked, M = 1)."""
    logits = member_logits[0]
    return {
        "logits": logits,
        "probabilities": tf.nn.softmax(logits, axis=-1),
        "class_ids": tf.argmax(logits, axis=-1, output_type=tf.int64),
    }


def _write_saved_model(model, layers, path, sparse_kernels, input_range):
    """The ticket's SavedModel of a checked ``model`` (weights found finite) whose
    `ft_keras.sparsify.walk_layers` are ``layers``."""
    export_lib._export_models(  # pylint: disable=protected-access
        [model], [layers], path, _ticket_head, sparse_kernels, "convolutions", input_range)


def _save_keras_model(model, path, include_optimizer):
    """``model.save(path)``, leaving out the optimizer (via a weight-exact clone) if asked."""
    to_save = model
    if not include_optimizer and getattr(model, "optimizer", None) is not None:
        try:
            # Rebuild from the architecture alone (keras.models.clone_model would recompile).
            config = keras.saving.serialize_keras_object(model)
            config.pop("compile_config", None)
            to_save = keras.saving.deserialize_keras_object(config)
            to_save.set_weights(model.get_weights())
        except Exception as error:  # pylint: disable=broad-except
            logging.warning(
                "Could not clone %r to save it without its optimizer (%s); saving it as is.",
                model.name,
                error,
            )
            to_save = model
    to_save.save(path)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "numpy"):  # tf / keras tensors and variables
        return _json_default(np.asarray(value.numpy()))
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def library_versions():
    """``{"ft_keras", "tensorflow", "keras", "python"}`` version strings."""
    return {
        "ft_keras": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


def ticket_metadata(model, index, metadata=None):
    """The metadata dict `write_ticket` stores for ``model`` as ticket ``index``.

    Args:
        model: the (sparse) keras.Model.
        index: the ticket index.
        metadata: optional dict of caller keys: ``method``, ``phase``, ``epoch``, ``step``,
            ``monitor``, ``monitor_value``, ``seed``, ``forward_flops`` (each None when absent)
            and any extra JSON-serialisable keys. Computed keys (`COMPUTED_KEYS`) are refused.

    Returns:
        A JSON-serialisable dict.
    """
    _checks.check_model("model", model)
    return _ticket_metadata(model, list(walk_layers(model)), index, metadata)


def _ticket_metadata(model, layers, index, metadata):
    """`ticket_metadata` of a checked, built ``model`` whose `walk_layers` are ``layers``."""
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None; got {type(metadata).__name__}.")
    bad_keys = [key for key in metadata if not isinstance(key, str)]
    if bad_keys:
        raise TypeError(f"metadata keys must be str; got {bad_keys!r}.")
    reserved = sorted(key for key in metadata if key in COMPUTED_KEYS)
    if reserved:
        raise ValueError(
            f"metadata sets {reserved}, which write_ticket computes itself; allowed caller keys "
            f"are {list(CALLER_KEYS)} and any other extra key."
        )
    report = _sparsity_report(model, layers)
    rows = [
        {
            "name": row.name,
            "kind": row.kind,
            "shape": list(row.shape),
            "active": row.active,
            "size": row.size,
            "density": row.density,
            "status": row.status,
        }
        for row in report.layers
    ]
    result = {"format_version": FORMAT_VERSION, "index": index}
    for key in CALLER_KEYS:
        result[key] = metadata.get(key)
    if result["forward_flops"] is None:
        result["forward_flops"] = _forward_flops_or_none(model)
    result.update(
        {
            "layers": rows,
            "density": report.density,
            "num_params": report.num_params,
            "num_active_params": report.num_active_params,
            "versions": library_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
        }
    )
    for key, value in metadata.items():
        if key not in result:
            result[key] = value
    # Normalise (numpy scalars, tensors) and check that everything is JSON-serialisable.
    try:
        return json.loads(json.dumps(result, default=_json_default))
    except (TypeError, ValueError) as error:
        raise TypeError(f"metadata must be JSON-serialisable: {error}.") from None


def _forward_flops_or_none(model):
    """Sparse forward FLOPs per example (2 x multiply-adds) of a checked model, or None where
    they cannot be counted (e.g. a model whose input shape is not fully known)."""
    from ft_keras import flops  # pylint: disable=import-outside-toplevel

    try:
        # pylint: disable-next=protected-access
        return flops.macs_to_flops(flops._forward_macs(model, False))
    except (ValueError, TypeError) as error:
        logging.warning("forward FLOPs of %s not counted: %s", model.name, error)
        return None


def output_kind(model):
    """"probabilities" when ``model`` ends in a softmax (its last layer is a ``Softmax`` layer,
    or has ``activation`` softmax), else "logits"."""
    layer = model.layers[-1] if getattr(model, "layers", None) else None
    if isinstance(layer, keras.layers.Softmax):
        return "probabilities"
    activation = getattr(layer, "activation", None)
    if getattr(activation, "__name__", None) == "softmax":
        return "probabilities"
    return "logits"


def _check_logits_output(model, what):
    if output_kind(model) != "logits":
        raise ValueError(
            f"{what} ends in a softmax (layer {model.layers[-1].name!r}): a ticket must output "
            "logits, because ensembles and the serving signature apply the softmax themselves "
            "(it would be applied twice). Drop the final softmax, e.g. Dense(10) instead of "
            "Dense(10, activation='softmax')."
        )


def _file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_digest(root):
    """A sha256 over every file under ``root``: relative paths and contents, in sorted order."""
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
            digest.update(_file_digest(path).encode())
    return digest.hexdigest()


def ticket_digests(path):
    """``{"model.keras": ..., "saved_model": ...}``: sha256 digests of a ticket folder's model
    file and SavedModel tree (None for a part that is missing)."""
    model_path = os.path.join(path, MODEL_FILE)
    saved = os.path.join(path, SAVED_MODEL_DIR)
    return {
        MODEL_FILE: _file_digest(model_path) if os.path.isfile(model_path) else None,
        SAVED_MODEL_DIR: _tree_digest(saved) if os.path.isdir(saved) else None,
    }


def verify_ticket(path, metadata):
    """What is wrong with ticket folder ``path`` given its parsed ``metadata`` ("" if nothing):
    metadata of another index than the folder's name, and a ``model.keras`` or SavedModel that
    differs from the digests recorded when the ticket was written (a part swapped with another
    ticket's, or changed afterwards), or a missing SavedModel. A ticket without ``model.keras``
    is an inference-only copy and passes when its SavedModel does."""
    problems = []
    match = _TICKET_RE.match(os.path.basename(os.path.normpath(path)))
    if match and metadata.get("index") != int(match.group(1)):
        problems.append(f"its {METADATA_FILE} is ticket {metadata.get('index')!r}'s, not ticket "
                        f"{match.group(1)}'s")
    recorded = metadata.get("files")
    if not isinstance(recorded, dict):
        problems.append(f"its {METADATA_FILE} records no file digests (not written by "
                        "write_ticket?)")
        recorded = {}
    actual = ticket_digests(path)
    for part, want in sorted(recorded.items()):
        got = actual.get(part)
        if got is None and part == MODEL_FILE:
            continue  # an inference-only copy: read from its SavedModel (see read_ticket)
        if got is None:
            problems.append(f"{part} is missing (it was written with the ticket)")
        elif got != want and part == MODEL_FILE and _archive_problem(
                os.path.join(path, MODEL_FILE)):
            problems.append(_archive_problem(os.path.join(path, MODEL_FILE)))
        elif got != want:
            problems.append(f"{part} differs from the one written with the ticket (swapped "
                            "with another ticket's, or changed afterwards)")
    return "; ".join(problems)


def _write_metadata(metadata, path):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=2)
        handle.write("\n")


def write_ticket(
    model,
    ticket_dir,
    index,
    metadata=None,
    *,
    version=1,
    overwrite=False,
    include_optimizer=False,
    sparse_kernels="dense",
    input_range=None,
):
    """Writes ``model`` as ``ticket_dir/ticket_<index>/``, atomically.

    The ticket folder holds ``model.keras`` (the sparse model), ``saved_model/<version>/`` (a
    TF Serving SavedModel with the masked kernels stored compactly; see `ft_keras.export`) and
    ``metadata.json``. Everything is written into a hidden temporary folder inside
    ``ticket_dir`` and renamed into place at the end, so readers only ever see complete
    tickets. A model whose weights hold NaN or Inf is refused before anything is written.

    Example:

    >>> path = write_ticket(sparse, "/tmp/tickets", 0,
    ...                     {"method": "edst", "phase": 1, "epoch": 12, "step": 5640,
    ...                      "monitor": "val_accuracy", "monitor_value": 0.87, "seed": 0})
    >>> path                                             # doctest: +SKIP
    '/tmp/tickets/ticket_0'

    Args:
        model: a built, single-input `keras.Model` that outputs logits (sparse or plain).
        ticket_dir: the ticket directory; created if missing.
        index: the ticket number i >= 0.
        metadata: optional dict; see `ticket_metadata` for the keys. Extra keys are stored as
            given (they must be JSON-serialisable).
        version: the SavedModel version folder under ``saved_model/`` (an int >= 0; TF Serving
            serves the highest).
        overwrite: replace an existing ``ticket_<index>``.
        include_optimizer: also save the optimizer's state in ``model.keras`` (default False:
            a ticket is weights and masks; the file is 2-3x smaller without it).
        sparse_kernels: how the SavedModel computes Dense kernels that hold zeros: "dense"
            (default) or the opt-in sparse products "csr" / "coo" (`ft_keras.serving_graph`).
        input_range: None (default), or (low, high): the SavedModel refuses requests holding
            values outside ``[low, high]``.

    Returns:
        The path of the ticket folder, ``ticket_dir/ticket_<index>``.

    Raises:
        TypeError: ``model`` is not a keras.Model, or an argument has the wrong type.
        ValueError: bad ``index`` / ``version`` / ``sparse_kernels``, a model without a single
            known input, weights that are NaN or Inf (the message names layer and variable),
            metadata setting computed keys, or an existing ticket and ``overwrite=False``.
    """
    _checks.check_model("model", model)
    ticket_dir = _checks.check_path("ticket_dir", ticket_dir)
    index = _checks.check_int("index", index, minimum=0)
    version = _checks.check_int("version", version, minimum=0)
    overwrite = _checks.check_bool("overwrite", overwrite)
    include_optimizer = _checks.check_bool("include_optimizer", include_optimizer)
    sparse_kernels = _checks.check_choice("sparse_kernels", sparse_kernels,
                                          export_lib.SPARSE_KERNELS)
    input_range = export_lib.check_input_range(input_range)
    export_lib.model_input_shape(model)
    # Walked once, scanned once: the private functions below take the checked model and layers.
    layers = list(walk_layers(model))
    export_lib._check_finite(model, layers, "model")  # pylint: disable=protected-access
    _check_logits_output(model, f"model={model.name!r}")
    meta = _ticket_metadata(model, layers, index, metadata)
    meta["output"] = "logits"
    if os.path.exists(ticket_dir) and not os.path.isdir(ticket_dir):
        raise ValueError(f"ticket_dir={ticket_dir!r} exists and is not a folder.")
    destination = os.path.join(ticket_dir, f"ticket_{index}")

    def write(tmp):
        _save_keras_model(model, os.path.join(tmp, MODEL_FILE), include_optimizer)
        _write_saved_model(model, layers, os.path.join(tmp, SAVED_MODEL_DIR, str(version)),
                           sparse_kernels, input_range)
        meta["files"] = ticket_digests(tmp)
        _write_metadata(meta, os.path.join(tmp, METADATA_FILE))  # last: marks completeness

    atomic_folder(destination, write, overwrite=overwrite, argument="ticket folder")
    return destination


def _is_control_file(name):
    return name in (LOCK_FILE, RUN_FILE)


def _is_ours(name):
    """Whether ``name`` in a ticket folder is ft_keras's: a ticket, a leftover of a ticket write,
    a progress file or the run record (the lock file is left alone)."""
    return bool(_TICKET_RE.match(name)) or name == RUN_FILE or name.startswith(
        tuple(f"{prefix}ticket_" for prefix in atomic_files.WRITE_PREFIXES) + (PROGRESS_PREFIX,))


def describe_ticket_dir(ticket_dir, entries):
    """A short description of what ``entries`` of ``ticket_dir`` are, for error messages."""
    complete, incomplete = scan_tickets(ticket_dir)
    parts = []
    if complete:
        parts.append(f"{len(complete)} complete ticket(s): "
                     f"{[os.path.basename(p) for p in complete]}")
    if incomplete:
        parts.append(f"{len(incomplete)} incomplete ticket folder(s)")
    others = [n for n in entries if not _TICKET_RE.match(n)]
    if others:
        parts.append(f"{len(others)} other entries, e.g. {others[:3]}")
    return "; ".join(parts)


def prepare_ticket_dir(ticket_dir, overwrite=False):
    """Creates ``ticket_dir`` for new tickets, refusing to mix them with old ones.

    Example:

    >>> prepare_ticket_dir("/tmp/tickets", overwrite=True)   # doctest: +SKIP
    '/tmp/tickets'

    Args:
        ticket_dir: the folder; created (with parents) if missing.
        overwrite: if ``ticket_dir`` is not empty, delete its ``ticket_<i>`` folders, leftovers
            of interrupted writes, progress files and run record, and keep everything else; if
            False, refuse. (The lock file of `lock_ticket_dir` does not count.)

    Returns:
        ``ticket_dir``.

    Raises:
        ValueError: ``ticket_dir`` is a file, or a non-empty folder and ``overwrite=False``
            (the message says what it holds).
    """
    ticket_dir = _checks.check_path("ticket_dir", ticket_dir)
    overwrite = _checks.check_bool("overwrite", overwrite)
    if os.path.exists(ticket_dir) and not os.path.isdir(ticket_dir):
        raise ValueError(f"ticket_dir={ticket_dir!r} exists and is not a folder.")
    os.makedirs(ticket_dir, exist_ok=True)
    entries = sorted(name for name in os.listdir(ticket_dir) if name != LOCK_FILE)
    if entries and not overwrite:
        raise ValueError(
            f"ticket_dir={ticket_dir!r} is not empty ({describe_ticket_dir(ticket_dir, entries)})"
            ": new tickets are not mixed with old ones. Write them to another (empty) "
            "ticket_dir; a FreeTickets run that was interrupted resumes when the same fit is "
            "run again with keras.callbacks.BackupAndRestore. (overwrite=True deletes the "
            "ticket_* folders and progress files in it.)"
        )
    for name in entries:
        path = os.path.join(ticket_dir, name)
        if not _is_ours(name) or os.path.islink(path):
            continue
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return ticket_dir


# --------------------------------------------------------------------------------------------
# Reading.


def saved_model_path(ticket_path):
    """The highest-version SavedModel folder of a ticket, or None if it has none."""
    root = os.path.join(ticket_path, SAVED_MODEL_DIR)
    if not os.path.isdir(root):
        return None
    versions = [
        int(name)
        for name in os.listdir(root)
        if _VERSION_RE.match(name) and os.path.isfile(os.path.join(root, name, SAVED_MODEL_PB))
    ]
    return os.path.join(root, str(max(versions))) if versions else None


def _missing_parts(path):
    """What a ticket folder lacks to be complete ("" when nothing)."""
    missing = []
    if not os.path.isfile(os.path.join(path, METADATA_FILE)):
        missing.append(METADATA_FILE)
    if not os.path.isfile(os.path.join(path, MODEL_FILE)) and saved_model_path(path) is None:
        missing.append(f"{MODEL_FILE} (and {SAVED_MODEL_DIR}/<version>/{SAVED_MODEL_PB})")
    return " and ".join(missing)


def _verify_or_reason(path):
    try:
        return verify_ticket(path, read_metadata(path))
    except ValueError as error:
        return str(error)


def scan_tickets(ticket_dir):
    """The ``ticket_<i>`` folders of ``ticket_dir``: complete ones and incomplete ones.

    A ticket folder is complete when it has its metadata and model and passes `verify_ticket`
    (metadata of its own index; ``model.keras`` and SavedModel equal to the ones written with
    it). Hidden folders (``.tmp-*`` / ``.ready-*`` / ``.trash-*``: writes in progress or
    interrupted) and other names are not tickets, but a ticket that an interrupted overwrite
    left only in a ``.ready-`` or ``.trash-`` folder is listed as incomplete.

    Example:

    >>> scan_tickets("/tmp/tickets")                   # doctest: +SKIP
    (['/tmp/tickets/ticket_0'], [('/tmp/tickets/ticket_1', 'missing metadata.json')])

    Returns:
        ``(complete, incomplete)``: complete folder paths sorted by index, and
        ``(path, reason)`` pairs for the ``ticket_<i>`` folders that are not complete.

    Raises:
        ValueError: ``ticket_dir`` is missing or not a folder.
    """
    ticket_dir = _checks.check_existing_dir("ticket_dir", ticket_dir)
    found = []
    incomplete = []
    for name in os.listdir(ticket_dir):
        match = _TICKET_RE.match(name)
        path = os.path.join(ticket_dir, name)
        if not match or not os.path.isdir(path):
            continue
        missing = _missing_parts(path)
        problem = f"missing {missing}" if missing else _verify_or_reason(path)
        if problem:
            incomplete.append((int(match.group(1)), path, problem))
        else:
            found.append((int(match.group(1)), path))
    present = {index for index, _ in found} | {index for index, _, _ in incomplete}
    for name in os.listdir(ticket_dir):
        for prefix in (atomic_files.READY_PREFIX, atomic_files.TRASH_PREFIX):
            base = name[len(prefix):].split("-")[0] if name.startswith(prefix) else ""
            match = _TICKET_RE.match(base)
            if match and int(match.group(1)) not in present:
                present.add(int(match.group(1)))
                incomplete.append((int(match.group(1)), os.path.join(ticket_dir, base),
                                   f"missing: an interrupted write left its complete copy in "
                                   f"{name}; resuming the run (or ft_keras.tickets."
                                   f"recover_interrupted_writes(ticket_dir, {base!r})) puts it "
                                   "back"))
    return ([path for _, path in sorted(found)],
            [(path, reason) for _, path, reason in sorted(incomplete)])


def list_tickets(ticket_dir, *, allow_empty=False):
    """The complete ``ticket_<i>`` folders of ``ticket_dir``, sorted by i (numerically).

    Hidden folders (temporary writes) are ignored; ticket folders lacking ``metadata.json`` or
    a model (``model.keras`` or ``saved_model/<version>/saved_model.pb``) are skipped with a
    warning (`scan_tickets` lists them).

    Example:

    >>> list_tickets("/tmp/tickets")                   # doctest: +SKIP
    ['/tmp/tickets/ticket_0', '/tmp/tickets/ticket_1', '/tmp/tickets/ticket_2']

    Args:
        ticket_dir: the ticket directory.
        allow_empty: return ``[]`` rather than raise when there is no complete ticket.

    Returns:
        A list of folder paths (``ticket_dir`` joined with ``ticket_<i>``).

    Raises:
        ValueError: ``ticket_dir`` is missing or not a folder, or (unless ``allow_empty``) holds
            no complete ticket.
    """
    allow_empty = _checks.check_bool("allow_empty", allow_empty)
    ticket_dir = _checks.check_path("ticket_dir", ticket_dir)
    if not os.path.isdir(ticket_dir):
        raise ValueError(f"ticket_dir={ticket_dir!r} does not exist or is not a folder.")
    found, incomplete = scan_tickets(ticket_dir)
    for path, reason in incomplete:
        logging.warning("Skipping incomplete ticket %s: %s.", path, reason)
    if not found and not allow_empty:
        detail = f"; incomplete: {[path for path, _ in incomplete]}" if incomplete else ""
        raise ValueError(
            f"ticket_dir={ticket_dir!r} holds no complete ticket_<i> folder (each needs "
            f"{METADATA_FILE} and {MODEL_FILE} or {SAVED_MODEL_DIR}/<version>/)" + detail + "."
        )
    return found


def read_metadata(ticket_path):
    """The parsed ``metadata.json`` of a ticket folder.

    Raises:
        ValueError: the file is missing, not valid JSON, not a JSON object, or of an unknown
            ``format_version``; the message names the file.
    """
    path = os.path.join(_checks.check_path("path", ticket_path), METADATA_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"ticket metadata file {path!r} is missing.")
    try:
        with open(path, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"ticket metadata file {path!r} is corrupt: {error}.") from error
    if not isinstance(metadata, dict):
        raise ValueError(
            f"ticket metadata file {path!r} is corrupt: it holds a {type(metadata).__name__}, "
            "not a JSON object."
        )
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"ticket metadata file {path!r} is corrupt: no int format_version.")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"ticket metadata file {path!r} has format_version={version}; this ft_keras "
            f"({__version__}) reads format_version {FORMAT_VERSION}: "
            + ("upgrade ft_keras." if version > FORMAT_VERSION else
               "write the ticket again with this version.")
        )
    return metadata


def load_serving_model(path, name=None):
    """A Keras model that runs a SavedModel's ``serving_default`` and returns its logits.

    Args:
        path: a SavedModel folder (``.../saved_model/<version>``) whose ``serving_default``
            signature takes ``inputs`` and returns ``logits`` (as `write_ticket` writes).
        name: the model's name (default: derived from the path).

    Returns:
        A Functional `keras.Model` (a `keras.layers.TFSMLayer` inside) mapping inputs to logits.
        It predicts, evaluates and can be ensembled, but has no masks: it cannot be trained
        with DST.
    """
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures.get(SERVING_SIGNATURE)
    if signature is None:
        raise ValueError(f"SavedModel {path!r} has no {SERVING_SIGNATURE!r} signature.")
    _, kwargs = signature.structured_input_signature
    if list(kwargs) != [SERVING_INPUT] or "logits" not in signature.structured_outputs:
        raise ValueError(
            f"SavedModel {path!r}: its {SERVING_SIGNATURE!r} signature must take "
            f"{SERVING_INPUT!r} and return 'logits'; it takes {list(kwargs)} and returns "
            f"{sorted(signature.structured_outputs)}."
        )
    shape = tuple(kwargs[SERVING_INPUT].shape[1:])
    inputs = keras.Input(shape, name=SERVING_INPUT)
    layer = keras.layers.TFSMLayer(path, call_endpoint=SERVING_SIGNATURE, trainable=False)
    outputs = layer(inputs)["logits"]
    return keras.Model(inputs, outputs, name=name or "saved_model")


def read_ticket(path, *, compile=False):  # pylint: disable=redefined-builtin
    """Reads a ticket folder written by `write_ticket`.

    The model comes from ``model.keras`` (masked layers, masks and weights bit-exact). A ticket
    without ``model.keras`` is read from its highest SavedModel version instead, as an
    inference-only Keras model returning logits (see `load_serving_model`).

    Example:

    >>> model, metadata = read_ticket("/tmp/tickets/ticket_0")   # doctest: +SKIP
    >>> metadata["density"], metadata["monitor_value"]          # doctest: +SKIP
    (0.2, 0.873)

    Args:
        path: a ``ticket_<i>`` folder.
        compile: passed to ``keras.models.load_model`` (only useful with a ticket written from a
            compiled model with ``include_optimizer=True``).

    Returns:
        ``(model, metadata)``: a `keras.Model` and the metadata dict.

    Raises:
        ValueError: a missing or empty folder, a missing, corrupt (e.g. truncated) or
            unreadable file (the message names it and says what is wrong).
    """
    path = _checks.check_path("path", path)
    compile = _checks.check_bool("compile", compile)
    if not os.path.isdir(path):
        raise ValueError(f"path={path!r}: the ticket folder does not exist or is not a folder.")
    if not os.listdir(path):
        raise ValueError(
            f"ticket folder {path!r} is empty; a ticket holds {METADATA_FILE}, {MODEL_FILE} and "
            f"{SAVED_MODEL_DIR}/<version>/."
        )
    metadata = read_metadata(path)
    model_path = os.path.join(path, MODEL_FILE)
    if os.path.isfile(model_path):
        _check_keras_archive(model_path)
    elif saved_model_path(path) is None:
        raise ValueError(
            f"ticket folder {path!r} has no model: both {model_path!r} and "
            f"{os.path.join(path, SAVED_MODEL_DIR)!r}/<version>/{SAVED_MODEL_PB} are missing."
        )
    problem = verify_ticket(path, metadata)
    if problem:
        raise ValueError(f"ticket folder {path!r} fails its check: {problem}.")
    if os.path.isfile(model_path):
        model = _load_or_raise(
            lambda: keras.models.load_model(model_path, compile=compile),
            f"ticket model file {model_path!r}",
        )
        _check_logits_output(model, f"ticket model file {model_path!r}")
        return model, metadata
    serving_path = saved_model_path(path)
    model = _load_or_raise(
        lambda: load_serving_model(serving_path, name=f"ticket_{metadata.get('index', 'x')}"),
        f"ticket SavedModel {serving_path!r}",
    )
    return model, metadata


def _archive_problem(path):
    try:
        _check_keras_archive(path)
    except ValueError as error:
        return str(error)
    return ""


def _check_keras_archive(path):
    """Raises ValueError if ``path`` is not an intact ``.keras`` (zip) archive."""
    what = f"ticket model file {path!r} is corrupt"
    size = os.path.getsize(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{what}: it is not a .keras (zip) archive ({size} bytes; truncated or overwritten?)."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"{what}: {error}.") from error
    if bad is not None:
        raise ValueError(f"{what}: member {bad!r} of the archive fails its CRC check.")


def _load_or_raise(load, what):
    """Runs ``load()``; any failure becomes a ValueError that names the file (``what``)."""
    try:
        return load()
    except Exception as error:  # pylint: disable=broad-except
        raise ValueError(f"{what} could not be loaded: {type(error).__name__}: {error}") from error
