"""FreeTickets (EDST Ensemble) and best-epoch ticket selection, as Keras callbacks.

`FreeTickets` runs an EDST plan inside one ``model.fit`` and writes the best epoch of each
refinement phase as a ticket; `TicketCheckpoint` writes the best epoch of a whole fit as one
ticket (a DST Ensemble member). Both select by a ``monitor`` of the epoch logs whose direction
("min" / "max") is decided the way Keras's own callbacks decide it (the metric's declared
direction; "loss" is minimised) and is checked, with the presence of validation data, when
``fit`` starts. See docs/method.md for the method.

Crash safety (run the same fit again with ``keras.callbacks.BackupAndRestore``, in either
order, ``save_freq="epoch"``). Each epoch is recorded at the end of its validation (its last
step for a training-metric monitor), before any callback's ``on_epoch_end`` where
``BackupAndRestore`` saves it: the weights' digest in the run record
``<ticket_dir>/.ft_keras-run.json``, the phase's best-so-far state in one atomically replaced
``<ticket_dir>/.progress-<i>.npz`` (weights and record together), and at a phase's last epoch
its ticket, after which the progress file is removed. So every epoch that ``BackupAndRestore``
counts as done is on disk here first, and a resumed fit reproduces the uninterrupted run's
tickets: an epoch already recorded is not offered again, a ticket already written ends its
phase, a phase that ended without its ticket gets it from its progress file. A fit that starts
at a later epoch must prove it continues the run that wrote the folder (its weights equal the
recorded digest of the previous epoch); one writer holds the folder at a time (a lock). A state
with non-finite weights is never selected.
"""

import datetime
import hashlib
import io
import json
import os
import secrets
import socket
import zipfile

import keras
import numpy as np
from absl import logging

from ft_keras import _checks
from ft_keras import _keras_compat
from ft_keras import atomic_files
from ft_keras import schedules
from ft_keras import tickets
from ft_keras import training

MODES = ("auto", "min", "max")
# Ticket metadata keys that FreeTickets sets itself.
_OWN_METADATA = ("method", "phase", "epoch", "step", "monitor", "monitor_value", "seed",
                 "explore_fraction", "num_tickets", "optimizer_state", "run_id")


def _is_chief(model):
    return training._is_chief(model)  # pylint: disable=protected-access


def resolve_mode(model, monitor, mode):
    """The direction ("min" / "max") of ``monitor`` for ``model``, as Keras callbacks decide it.

    "auto" uses `ft_keras.keras_metrics.metric_direction`: the compiled metric's declared
    direction (ft_keras's NLL, Brier and ECE metrics declare "down"; Keras's own metrics declare
    theirs) and "min" for the loss.

    Raises:
        ValueError: ``mode="auto"`` and the direction of ``monitor`` cannot be known.
    """
    mode = _checks.check_choice("mode", mode, MODES)
    if mode != "auto":
        return mode
    direction = _keras_compat.metric_direction(model, monitor)
    if direction is None:
        raise ValueError(
            f"monitor={monitor!r}: cannot tell whether it should be maximised or minimised "
            "(it is not the loss and no compiled metric of that name declares a direction). "
            "Pass mode='max' or mode='min'."
        )
    return direction


class _EpochClose:
    """Calls ``self._close_epoch(epoch, logs)`` once per epoch of a fit, at the first moment the
    epoch's ``monitor`` value and final weights are known: at ``on_test_end`` of the epoch's
    validation for a ``val_`` monitor, at the epoch's last ``on_train_batch_end`` for another
    monitor (at ``on_epoch_end`` when the number of steps is unknown). Both come before every
    callback's ``on_epoch_end``, where ``keras.callbacks.BackupAndRestore`` saves the epoch, so
    what the callback persists for an epoch is on disk before the epoch counts as done,
    whatever the order of the callbacks.

    The subclass calls `_begin_epoch` from ``on_epoch_begin``, `_batch_ended` from
    ``on_train_batch_end`` and `_end_epoch` from ``on_epoch_end``.
    """

    _epoch = None
    _closed = True
    _validation_checked = False

    def _reset_epoch_close(self):
        self._epoch, self._closed, self._validation_checked = None, True, False

    def on_test_begin(self, logs=None):
        """The first validation of the fit: its data is checked once (`_checks.
        check_validation_batches`) before anything is selected on it."""
        if self._validation_checked or self._epoch is None:
            return
        self._validation_checked = True
        batches = _keras_compat.fit_validation_data(self.model)
        if batches is None:
            return
        shape = getattr(self.model, "output_shape", None)
        classes = shape[-1] if isinstance(shape, tuple) and shape and shape[-1] else None
        rows = _checks.check_validation_batches(batches, classes,
                                                "fit()'s validation data")
        if rows == 0:
            raise ValueError(
                f"{type(self).__name__}: fit()'s validation data is empty (0 rows): "
                f"monitor={self.monitor!r} cannot be computed. Pass validation data with at "
                "least one row."
            )

    def _begin_epoch(self, epoch):
        self._epoch, self._closed = epoch, False

    def _batch_ended(self, batch, logs):
        steps = (self.params or {}).get("steps")
        if (self.monitor.startswith("val_") or self._closed or self._epoch is None
                or not steps or batch + 1 < steps):
            return
        self._closed = True
        self._close_epoch(self._epoch, dict(logs or {}))

    def on_test_end(self, logs=None):
        if not self.monitor.startswith("val_") or self._closed or self._epoch is None:
            return
        logs = {f"val_{name}": value for name, value in (logs or {}).items()}
        if self.monitor not in logs:
            raise ValueError(
                f"{type(self).__name__}: the validation of epoch {self._epoch} logged "
                f"{sorted(logs)}, without monitor={self.monitor!r}: is the validation data "
                "empty? Pass validation data with at least one batch."
            )
        self._closed = True
        self._close_epoch(self._epoch, logs)

    def _end_epoch(self, epoch, logs):
        if not self._closed:  # e.g. a wrapper that forwards only the epoch calls
            if self.monitor.startswith("val_") and self.monitor not in (logs or {}):
                raise ValueError(
                    f"{type(self).__name__}: monitor={self.monitor!r} needs validation data, but "
                    f"fit() got none (no validation ran in epoch {epoch}): pass "
                    "validation_data=... (or validation_split=...) to fit() and keep "
                    "validation_freq=1, or monitor a training metric."
                )
            self._closed = True
            self._close_epoch(epoch, dict(logs or {}))
        self._epoch = None


def check_monitor_name(callback, monitor, logs):
    """At the first ``on_train_batch_end``: ``monitor`` (without ``val_``) is a logged name."""
    names = sorted(logs or {})
    base = monitor[4:] if monitor.startswith("val_") else monitor
    if names and base not in names:
        raise ValueError(
            f"{type(callback).__name__}: monitor={monitor!r} will not be in the epoch logs; the "
            f"model logs {names} (and 'val_' + each name with validation data)."
        )


def _monitored(logs, monitor):
    logs = logs or {}
    if monitor not in logs:
        raise ValueError(
            f"monitor={monitor!r} is not in the epoch logs {sorted(logs)}. Pass validation_data "
            "to fit() (for 'val_*' metrics) or choose a monitor that is logged."
        )
    return float(logs[monitor])


def _all_finite(weights):
    return all(np.all(np.isfinite(w)) for w in weights
               if np.issubdtype(np.asarray(w).dtype, np.floating))


def weights_digest(weights):
    """A sha256 hex digest of a list of arrays (dtype, shape and bytes of each, in order)."""
    digest = hashlib.sha256()
    for array in weights:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _progress_error(path, problem, index):
    return ValueError(
        f"progress file {path!r} of ticket {index} {problem}: the selection of that ticket "
        "cannot be resumed from it. The complete tickets in the folder are not affected; run "
        "the training again into a new ticket_dir to get this ticket."
    )


class _BestSnapshot:
    """Keeps the best-so-far model state of one selection window (a phase, or a whole fit).

    The state is held in memory and mirrored, after every epoch, to one file
    ``<ticket_dir>/.progress-<index>.npz`` holding the best weights *and* the record (best
    value, its epoch, the last epoch seen, the run) together, replaced atomically: a crash
    leaves the previous epoch's state or this epoch's, never a mix. An epoch the record has
    already seen (a resumed run re-running it) is not offered again.
    """

    def __init__(self, ticket_dir, index, monitor, mode, run_id=None):
        self.ticket_dir = ticket_dir
        self.index = index
        self.monitor = monitor
        self.mode = mode
        self.run_id = run_id
        self.value = None
        self.weights = None
        self.info = {}
        self.last_epoch = None
        self.done = False  # the window's ticket is already written

    @property
    def path(self):
        return os.path.join(self.ticket_dir, f"{tickets.PROGRESS_PREFIX}{self.index}.npz")

    def better(self, value):
        if self.value is None:
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def offer(self, model, value, info, persist):
        """Takes the model's state if ``value`` beats the best so far; returns True if taken.

        States with non-finite weights, non-finite values and epochs already seen are never
        taken.
        """
        epoch = info.get("epoch")
        if self.done or (self.last_epoch is not None and epoch is not None
                         and epoch <= self.last_epoch):
            return False
        self.last_epoch = epoch
        taken = False
        if value is not None and np.isfinite(value) and self.better(value):
            weights = [np.array(w) for w in model.get_weights()]
            if _all_finite(weights):
                self.value = float(value)
                self.weights = weights
                self.info = dict(info, monitor=self.monitor, monitor_value=self.value)
                taken = True
            else:
                logging.warning("epoch %s not taken for ticket %d: its weights are not finite",
                                info.get("epoch"), self.index)
        if persist:
            self._persist()
        return taken

    def _persist(self):
        os.makedirs(self.ticket_dir, exist_ok=True)
        record = {"info": self.info, "value": self.value, "last_epoch": self.last_epoch,
                  "monitor": self.monitor, "mode": self.mode, "index": self.index,
                  "run_id": self.run_id}
        arrays = {f"arr_{i}": w for i, w in enumerate(self.weights or [])}
        buffer = io.BytesIO()
        np.savez(buffer, record=np.frombuffer(json.dumps(record).encode(), np.uint8), **arrays)
        atomic_files.write_file_atomically(self.path, buffer.getvalue())

    def restore(self, num_weights):
        """Loads the persisted state of this window; False if there is none.

        Raises:
            ValueError: the file is damaged, belongs to another run or ticket, or holds
                weights of another model (the message names the file).
        """
        path = self.path
        if not os.path.exists(path):
            return False
        try:
            with np.load(path) as data:
                record = json.loads(bytes(data["record"]).decode())
                weights = [data[f"arr_{i}"] for i in range(len(data.files) - 1)]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile,
                UnicodeDecodeError) as error:
            raise _progress_error(path, f"is damaged (truncated or overwritten? "
                                        f"{type(error).__name__}: {error})", self.index) from None
        if not isinstance(record, dict) or record.get("index") != self.index:
            raise _progress_error(path, "is not this ticket's record", self.index)
        if self.run_id is not None and record.get("run_id") != self.run_id:
            raise _progress_error(path, f"belongs to run {record.get('run_id')!r}, not to the "
                                        f"run {self.run_id!r} being resumed", self.index)
        if weights and len(weights) != num_weights:
            raise _progress_error(path, f"holds {len(weights)} arrays, the model "
                                        f"{num_weights}", self.index)
        self.last_epoch = record.get("last_epoch")
        if self.mode is None:
            self.mode = record.get("mode")
        if record.get("value") is not None:
            self.info, self.weights = record["info"], weights
            self.value = float(record["value"])
        return True

    def clear(self):
        if os.path.exists(self.path):
            os.remove(self.path)

    def write_ticket(self, model, method, extra, overwrite):
        """Writes the best state as ``ticket_<index>`` (atomically), then forgets the progress
        (in that order: the progress is removed only once the ticket is on disk)."""
        if self.weights is None:
            raise ValueError(
                f"No finite value of monitor={self.monitor!r} was seen for ticket {self.index}; "
                "nothing to save."
            )
        snapshot = keras.models.clone_model(model)
        snapshot.set_weights(self.weights)
        metadata = dict(self.info, method=method, **extra)
        path = tickets.write_ticket(snapshot, self.ticket_dir, self.index, metadata,
                                    overwrite=overwrite)
        self.clear()
        logging.info("ticket %d written to %s (%s = %.4f)", self.index, path, self.monitor,
                     self.value)
        return path


def recover_partial_writes(ticket_dir):
    """Finishes or undoes the writes a crash interrupted in ``ticket_dir``: a ticket whose
    overwrite was interrupted is renamed back into place (`ft_keras.tickets.
    recover_interrupted_writes`), and the other leftovers (``.tmp-*`` / ``.ready-*`` /
    ``.trash-*`` folders, ``*.tmp-<pid>`` files) are deleted. Returns the removed names."""
    removed = []
    if not os.path.isdir(ticket_dir):
        return removed
    bases = set()
    for name in sorted(os.listdir(ticket_dir)):
        path = os.path.join(ticket_dir, name)
        for prefix in (".tmp-", ".ready-", ".trash-"):
            if name.startswith(prefix) and os.path.isdir(path):
                bases.add(name[len(prefix):].split("-")[0])
        if ".tmp-" in name and not name.startswith(".tmp-") and os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    for base in sorted(bases):
        removed += atomic_files.recover_interrupted_writes(ticket_dir, base)[1]
    return removed


class _RunRecord:
    """``<ticket_dir>/.ft_keras-run.json``: who writes the folder (a run id made when the run
    starts at epoch 0) and the digest of the model's weights at the end of every epoch, so that
    a fit starting at a later epoch can prove it continues this run."""

    def __init__(self, ticket_dir, data):
        self.ticket_dir = ticket_dir
        self.data = data

    @property
    def run_id(self):
        return self.data["run_id"]

    @staticmethod
    def path(ticket_dir):
        return os.path.join(ticket_dir, tickets.RUN_FILE)

    @classmethod
    def new(cls, ticket_dir, steps, total_epochs):
        return cls(ticket_dir, {
            "run_id": secrets.token_hex(8), "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "steps_per_epoch": steps, "total_epochs": total_epochs, "epochs": {}})

    def describe(self):
        return (f"run {self.run_id} started {self.data.get('started')} by pid "
                f"{self.data.get('pid')} on {self.data.get('host')}")

    def record_epoch(self, epoch, digest):
        self.data["epochs"][str(epoch)] = digest
        self.save()

    def save(self):
        atomic_files.write_file_atomically(self.path(self.ticket_dir),
                                      json.dumps(self.data, indent=1).encode())

    @classmethod
    def _load(cls, ticket_dir, epoch):
        path = cls.path(ticket_dir)
        try:
            with open(path, encoding="utf-8") as handle:
                record = cls(ticket_dir, json.load(handle))
            if not isinstance(record.run_id, str) or not isinstance(record.data["epochs"], dict):
                raise TypeError("no run_id or epochs")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"run record {path!r} is damaged ({type(error).__name__}: {error}): this fit "
                f"(starting at epoch {epoch}) cannot prove it continues the run that wrote "
                f"ticket_dir={ticket_dir!r}. Use another ticket_dir."
            ) from None
        return record

    @classmethod
    def restarted(cls, ticket_dir, steps, digest):
        """The record of the run that a fit starting at epoch 0 with initial weights of
        ``digest`` starts again (killed before its first epoch was saved), else None."""
        if not os.path.exists(cls.path(ticket_dir)):
            return None
        record = cls._load(ticket_dir, 0)
        if record.data["epochs"].get("-1") == digest and (
                record.data.get("steps_per_epoch") == steps):
            return record
        return None

    @classmethod
    def for_resume(cls, ticket_dir, epoch, steps, digest):
        """The record of the run that a fit starting at ``epoch`` (> 0) continues.

        Raises ValueError when the folder holds no run, another run, or a run whose weights at
        the end of epoch ``epoch - 1`` differ from the model's (``digest``)."""
        path = cls.path(ticket_dir)
        entries = sorted(n for n in os.listdir(ticket_dir) if n != atomic_files.LOCK_FILE)
        if not os.path.exists(path):
            if entries:
                raise ValueError(
                    f"fit starts at epoch {epoch}, but ticket_dir={ticket_dir!r} holds "
                    f"{tickets.describe_ticket_dir(ticket_dir, entries)} and no FreeTickets "
                    "run record: this fit cannot prove it continues the run that wrote them, "
                    "and its tickets would be mixed with theirs. Use another ticket_dir."
                )
            raise ValueError(
                f"fit starts at epoch {epoch} (initial_epoch={epoch}) but ticket_dir="
                f"{ticket_dir!r} holds no FreeTickets run to resume: a fresh run starts at "
                "epoch 0 (the exploration epochs come first). Pass initial_epoch=0; an "
                "interrupted run resumes when the same fit is run again with "
                "keras.callbacks.BackupAndRestore."
            )
        record = cls._load(ticket_dir, epoch)
        data, epochs = record.data, record.data["epochs"]
        if data.get("steps_per_epoch") != steps:
            raise ValueError(
                f"ticket_dir={ticket_dir!r} holds {record.describe()} with "
                f"{data.get('steps_per_epoch')} steps per epoch; this fit has {steps}: it is "
                "not that run resumed. Use another ticket_dir, or resume with the same data "
                "and batch size."
            )
        recorded = epochs.get(str(epoch - 1))
        if recorded != digest and epochs.get(str(epoch)) == digest:
            raise ValueError(
                f"fit starts at epoch {epoch} from the weights that {record.describe()} had at "
                f"the end of epoch {epoch}, not {epoch - 1}: the backup was cut in the middle "
                "of BackupAndRestore's save (Keras writes the weights, then the epoch number), "
                f"so epoch {epoch} would be trained twice. Set \"epoch\" to {epoch + 1} in "
                "the backup's training_metadata.json and run again."
            )
        if recorded != digest:
            what = ("ended epoch {} with other weights than this fit starts from".format(
                epoch - 1) if recorded else f"never finished epoch {epoch - 1}")
            raise ValueError(
                f"fit starts at epoch {epoch}, but ticket_dir={ticket_dir!r} holds "
                f"{record.describe()}, which {what}: this fit is not that run resumed (with "
                "BackupAndRestore(save_freq='epoch')), and its tickets would be mixed with "
                "that run's. Use another ticket_dir."
            )
        return record


class FreeTickets(_EpochClose, training.DynamicSparsity):
    """EDST Ensemble (docs/method.md): M tickets from one sparse run.

    The fit follows an EDST plan (`ft_keras.schedules.EDSTPlan`): ``exploration_epochs`` of DST
    at a large constant learning rate, then ``num_tickets`` refinement phases of
    ``refine_epochs`` each (learning rate ``refine_lr[0]``, then ``refine_lr[1]`` from
    ``refine_lr_switch`` of the phase). At the first step of refinement phases 2..M a *global
    exploration* prunes ``explore_fraction`` of every layer's active weights by magnitude and
    grows as many with the ``grow`` criterion. Inside refinement phase i the epoch with the best
    ``monitor`` value becomes ``ticket_dir/ticket_<i-1>/`` (SavedModel + ``.keras`` +
    ``metadata.json``, written atomically, by the chief worker only).

    The learning rate is set at every epoch from the epoch index (restored by BackupAndRestore),
    and the mask jumps are in-graph at steps derived from ``optimizer.iterations``, so a resumed
    run follows the same plan; see the module docstring for what is guaranteed after a crash.
    The optimizer must have a constant (float) learning rate: FreeTickets owns it
    (``control_learning_rate=False`` leaves it alone).

    Args:
        ticket_dir: folder for the tickets; a non-empty folder is refused unless ``overwrite``
            (or it holds this run, interrupted: see the module docstring). Locked while the fit
            runs: a second run on it is refused.
        num_tickets: M >= 1.
        exploration_epochs: t_ex >= 0.
        refine_epochs: t_re >= 1.
        explore_fraction: q in (0, 1], the global exploration's drop fraction (paper: 0.8).
        monitor: the epoch log to select tickets by (``val_accuracy``; needs validation data).
        mode: "auto" (the metric's own direction, "min" for the loss), "min" or "max".
        exploration_lr, refine_lr, refine_lr_switch: the learning-rate plan.
        control_learning_rate: set the optimizer's learning rate from the plan (default True).
        jump_lr, jump_lr_epochs: the learning rate of the first epoch(s) right after each
            global exploration (None: ``refine_lr[0]``); see `ft_keras.schedules.EDSTPlan`.
        metadata: extra JSON-serialisable keys for every ticket's ``metadata.json`` (e.g. the
            data set and the model); the keys FreeTickets and `write_ticket` set are refused.
        overwrite: replace existing tickets in ``ticket_dir``.
        **dst_kwargs: `DynamicSparsity` arguments (update_every, drop_fraction, decay, grow,
            optimizer_state, channel_sparsity, channel_min_keep, ...); FreeTickets' defaults
            are drop_fraction=0.5 annealed (cosine) to 0.005 over the run (unless a
            ``schedule`` object is given), and
            ``channel_end_step`` = the last step of the exploration phase, so that all tickets
            of one run share their removed channels and differ in their unstructured masks.
    """

    def __init__(
        self,
        ticket_dir,
        num_tickets=3,
        exploration_epochs=None,
        refine_epochs=None,
        explore_fraction=0.8,
        monitor="val_accuracy",
        mode="auto",
        exploration_lr=0.1,
        refine_lr=(0.01, 0.001),
        refine_lr_switch=0.5,
        control_learning_rate=True,
        overwrite=False,
        jump_lr=None,
        jump_lr_epochs=1,
        metadata=None,
        **dst_kwargs,
    ):
        if "schedule" not in dst_kwargs:  # a user's schedule object carries its own numbers
            dst_kwargs.setdefault("drop_fraction", 0.5)
            dst_kwargs.setdefault("final_drop_fraction", 0.005)
        super().__init__(**dst_kwargs)
        ticket_dir = _checks.check_path("ticket_dir", ticket_dir)
        if exploration_epochs is None or refine_epochs is None:
            raise ValueError(
                "exploration_epochs and refine_epochs are required (e.g. exploration_epochs=150, "
                f"refine_epochs=100 on CIFAR); got {exploration_epochs!r}, {refine_epochs!r}."
            )
        self.edst_plan = schedules.EDSTPlan(exploration_epochs, refine_epochs, num_tickets,
                                            exploration_lr, refine_lr, refine_lr_switch,
                                            jump_lr, jump_lr_epochs)
        self.plan = self.edst_plan.phases
        self.ticket_dir = ticket_dir
        self.num_tickets = self.edst_plan.num_tickets
        self.exploration_epochs = self.edst_plan.exploration_epochs
        self.refine_epochs = self.edst_plan.refine_epochs
        if (self.channel_sparsity > 0 and self.channel_end_step is None
                and self.exploration_epochs == 0):
            raise ValueError(
                f"channel_sparsity={self.channel_sparsity} removes channels during the "
                "exploration phase, but exploration_epochs=0; give the run an exploration "
                "phase or pass channel_end_step.")
        self.explore_fraction = _checks.check_fraction("explore_fraction", explore_fraction)
        if self.explore_fraction == 1.0 and self.grown_weight_scale == 0 and num_tickets != 1:
            logging.warning(
                "FreeTickets(explore_fraction=1.0): each global exploration drops every active "
                "weight and grown weights start at 0, so tickets 2..M restart from all-zero "
                "masked kernels. Use explore_fraction < 1 or grown_weight_scale > 0.")
        self.monitor = _checks.check_str("monitor", monitor)
        self.mode = _checks.check_choice("mode", mode, MODES)
        self.exploration_lr = self.edst_plan.exploration_lr
        self.refine_lr = self.edst_plan.refine_lr
        self.refine_lr_switch = self.edst_plan.refine_lr_switch
        self.control_learning_rate = _checks.check_bool("control_learning_rate",
                                                        control_learning_rate)
        self.overwrite = _checks.check_bool("overwrite", overwrite)
        self.metadata = _checks.check_metadata(
            "metadata", metadata, reserved=tickets.COMPUTED_KEYS + _OWN_METADATA)
        self.tickets = []  # the run's ticket paths, in ticket order (those of this fit's phases)
        self._jump_steps = ()
        self._best = None
        self._started = False
        self._monitor_checked = False
        self._mode = self.mode if self.mode != "auto" else None

    @property
    def total_epochs(self):
        return self.edst_plan.total_epochs

    def on_train_begin(self, logs=None):
        epochs = (self.params or {}).get("epochs")
        if epochs is not None and epochs != self.total_epochs:
            raise ValueError(
                f"fit(epochs={epochs}) does not match the FreeTickets plan: exploration_epochs="
                f"{self.exploration_epochs} + num_tickets={self.num_tickets} x refine_epochs="
                f"{self.refine_epochs} = {self.total_epochs} epochs"
                + (" (the extra epochs would train past the last ticket)"
                   if epochs > self.total_epochs else "")
                + f". Pass epochs={self.total_epochs}."
            )
        if not (self.params or {}).get("steps"):
            raise ValueError(
                "FreeTickets needs the number of steps per epoch: use a dataset of known length "
                "or pass steps_per_epoch to fit()."
            )
        if self.control_learning_rate and _keras_compat.learning_rate_is_schedule(
                _keras_compat.base_optimizer(self.model.optimizer)):
            raise ValueError(
                "FreeTickets sets the learning rate itself; compile with a float learning "
                "rate (or pass control_learning_rate=False)."
            )
        self._mode = resolve_mode(self.model, self.monitor, self.mode)
        super().on_train_begin(logs)
        self._jump_steps = ()
        self._best = None
        self._started = False
        self._monitor_checked = False
        self._run = None
        self._origin = None
        self._finished = False
        self.tickets = []
        self._reset_epoch_close()
        if _is_chief(self.model):  # last: nothing after it can fail and leave the lock held
            atomic_files.lock_ticket_dir(self.ticket_dir, {"writer": "FreeTickets"})

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if _is_chief(self.model):
            written = all(os.path.isdir(self._ticket_path(i)) for i in range(self.num_tickets))
            if written and os.path.exists(_RunRecord.path(self.ticket_dir)):
                os.remove(_RunRecord.path(self.ticket_dir))  # finished: nothing to resume
            atomic_files.unlock_ticket_dir(self.ticket_dir)

    def on_train_batch_end(self, batch, logs=None):
        if not self._monitor_checked:
            check_monitor_name(self, self.monitor, logs)
            self._monitor_checked = True
        super().on_train_batch_end(batch, logs)
        self._batch_ended(batch, logs)

    def on_epoch_begin(self, epoch, logs=None):
        if not self._started:
            self._start(epoch)
        super().on_epoch_begin(epoch, logs)
        self._begin_epoch(epoch)
        if self.control_learning_rate:
            self._optimizer.learning_rate = self.edst_plan.learning_rate(epoch)
        phase = self.edst_plan.phase_at(epoch)
        if phase.kind == "refinement" and (self._best is None or
                                           self._best.index != phase.index - 1):
            self._best = self._phase_snapshot(phase, epoch)
        if epoch in self.edst_plan.global_exploration_epochs:
            logging.info("epoch %d: global exploration (q = %.2f) at step %d", epoch,
                         self.explore_fraction, self._jump_steps[phase.index - 2])

    def _ticket_path(self, index):
        return os.path.join(self.ticket_dir, f"ticket_{index}")

    def _phase_snapshot(self, phase, epoch):
        """The selection state of refinement ``phase`` at the start of ``epoch``: fresh, or
        what an interrupted process of this run persisted (its progress file, or its ticket
        when that is already written)."""
        index = phase.index - 1
        best = _BestSnapshot(self.ticket_dir, index, self.monitor, self._mode,
                             self._run.run_id if self._run is not None else None)
        if not _is_chief(self.model):
            return best
        if os.path.isdir(self._ticket_path(index)):
            self._check_own_ticket(index)
            best.done = True  # written before the crash; the re-run epochs change nothing
            return best
        if not best.restore(len(self.model.get_weights())) and epoch > phase.start_epoch:
            raise ValueError(
                f"FreeTickets: resumed at epoch {epoch}, inside refinement phase {phase.index} "
                f"(epochs {phase.start_epoch}-{phase.end_epoch - 1}), but the progress file "
                f"{best.path!r} of ticket {index} is missing: the epochs {phase.start_epoch}-"
                f"{epoch - 1} it recorded are lost (was the folder changed?), so the ticket "
                "cannot be selected over the whole phase. The complete tickets in the folder "
                "are not affected; run the training again into a new ticket_dir to get this "
                "ticket."
            )
        return best

    def _check_own_ticket(self, index):
        path = self._ticket_path(index)
        run_id = tickets.read_metadata(path).get("run_id")
        if run_id != self._run.run_id:
            raise ValueError(
                f"FreeTickets: {path!r} was written by run {run_id!r}, not by the run "
                f"{self._run.run_id!r} being resumed: the folder was changed. Use another "
                "ticket_dir."
            )

    def _start(self, epoch):
        """First epoch of this fit (fresh or resumed): fix the jump steps and the end step,
        prepare the ticket folder (fresh) or check that this fit continues the run that wrote
        it (resumed), and finish phases a crash left without their ticket."""
        self._started = True
        steps = int(self.params["steps"])
        origin = int(self._optimizer.iterations.numpy()) - epoch * steps
        self._origin = origin
        self._jump_steps = tuple(
            origin + e * steps + 1 for e in self.edst_plan.global_exploration_epochs
        )
        if self._jump_steps:
            self.set_global_explorations(self._jump_steps[0], self.refine_epochs * steps,
                                         len(self._jump_steps), self.explore_fraction)
        else:
            self.set_global_explorations(1, 1, 0, self.explore_fraction)
        total_steps = self.total_epochs * steps
        if self.end_step is None:
            if self.updates_masks and self.update_every >= total_steps:
                logging.warning(
                    "FreeTickets(update_every=%d): the whole run is %d steps (%d epochs x %d), "
                    "so no mask update runs (only the global explorations change the masks). "
                    "Pass update_every < %d for dynamic sparse training.", self.update_every,
                    total_steps, self.total_epochs, steps, total_steps)
            self.set_end_step(origin + total_steps)
        if self.channel_sparsity > 0 and self.channel_end_step is None:
            self.set_channel_end_step(max(origin + self.exploration_epochs * steps, 1))
        if not _is_chief(self.model):
            return
        if epoch == 0:
            recover_partial_writes(self.ticket_dir)  # this process holds the lock: all are dead
            initial = weights_digest(self.model.get_weights())
            self._run = None if self.overwrite else _RunRecord.restarted(self.ticket_dir, steps,
                                                                         initial)
            if self._run is not None:  # killed before its first epoch was saved: start again
                if all(os.path.isdir(self._ticket_path(i)) for i in range(self.num_tickets)):
                    # killed while finishing, after BackupAndRestore deleted its backup
                    logging.warning("FreeTickets: %s has written all its tickets; this fit "
                                    "stops after its first step", self._run.describe())
                    self._finished = True
                    self.model.stop_training = True
                    self.tickets = [self._ticket_path(i) for i in range(self.num_tickets)]
                    return
                logging.warning("FreeTickets: %s restarts at epoch 0", self._run.describe())
                return
            tickets.prepare_ticket_dir(self.ticket_dir, overwrite=self.overwrite)
            self._run = _RunRecord.new(self.ticket_dir, steps, self.total_epochs)
            self._run.record_epoch(-1, initial)
            return
        recover_partial_writes(self.ticket_dir)
        self._run = _RunRecord.for_resume(self.ticket_dir, epoch, steps,
                                          weights_digest(self.model.get_weights()))
        for phase in self.plan:
            if phase.kind == "refinement" and phase.end_epoch <= epoch:
                self._finish_phase_after_crash(phase, epoch)

    def _finish_phase_after_crash(self, phase, epoch):
        """A phase that ended before this (resumed) fit: its ticket, if a crash came between
        the end of the phase and the ticket being on disk, is written from the progress file
        (which held the whole phase before the epoch counted as done)."""
        index = phase.index - 1
        best = _BestSnapshot(self.ticket_dir, index, self.monitor, self._mode, self._run.run_id)
        if os.path.isdir(self._ticket_path(index)):
            self._check_own_ticket(index)
            best.clear()  # a crash after the ticket, before its progress file was removed
            self.tickets.append(self._ticket_path(index))
            return
        if not best.restore(len(self.model.get_weights())) or (
                best.last_epoch != phase.end_epoch - 1):
            raise ValueError(
                f"FreeTickets: resumed at epoch {epoch}, after refinement phase {phase.index} "
                f"(epochs {phase.start_epoch}-{phase.end_epoch - 1}) ended, but its ticket "
                f"{index} is neither in {self.ticket_dir!r} nor recoverable from its progress "
                f"file {best.path!r} (missing, or it stops at epoch {best.last_epoch}): was the "
                "folder changed? The complete tickets are not affected; run the training again "
                "into a new ticket_dir to get this ticket."
            )
        logging.warning("FreeTickets: writing ticket %d of refinement phase %d, which the "
                        "interrupted run did not finish writing", index, phase.index)
        self.tickets.append(best.write_ticket(self.model, "edst", self._ticket_extra(),
                                              overwrite=False))

    def _ticket_extra(self):
        return dict(self.metadata, seed=self.seed, explore_fraction=self.explore_fraction,
                    num_tickets=self.num_tickets, optimizer_state=self.optimizer_state,
                    run_id=self._run.run_id if self._run is not None else None)

    def _close_epoch(self, epoch, logs):
        """The epoch's monitored value is known: check the epoch ran all its steps, record
        the weights' digest (the run's identity), offer the state to the phase's selection,
        and write the phase's ticket at its last epoch."""
        if self._finished:
            return
        steps = int(self.params["steps"])
        step = int(self._optimizer.iterations.numpy())
        if step - self._origin != (epoch + 1) * steps:
            raise ValueError(
                f"FreeTickets: epoch {epoch} ended at step {step - self._origin} of the run, "
                f"not {(epoch + 1) * steps} (steps_per_epoch={steps}): the data ran out before "
                "the epoch's steps, so the plan's epochs no longer match the data. Repeat the "
                "dataset (dataset.repeat()) or pass the steps_per_epoch it really has."
            )
        chief = _is_chief(self.model)
        if chief:
            self._run.record_epoch(epoch, weights_digest(self.model.get_weights()))
        phase = self.edst_plan.phase_at(epoch)
        if phase.kind != "refinement":
            return
        value = _monitored(logs, self.monitor)
        self._best.offer(self.model, value, {"phase": phase.index, "epoch": epoch, "step": step},
                         persist=chief)
        if epoch == phase.end_epoch - 1 and chief:
            if self._best.done:
                self._best.clear()
                self.tickets.append(self._ticket_path(self._best.index))
            else:
                self.tickets.append(self._best.write_ticket(
                    self.model, method="edst", extra=self._ticket_extra(), overwrite=False))

    def on_epoch_end(self, epoch, logs=None):
        self._end_epoch(epoch, logs)
        super().on_epoch_end(epoch, logs)


class TicketCheckpoint(_EpochClose, keras.callbacks.Callback):
    """Writes the best epoch of a fit (by ``monitor``) as ``ticket_dir/ticket_<index>/``.

    Used for DST Ensemble members (`ft_keras.recipes.train_dst_ensemble`): each independent run
    contributes its best-validation checkpoint as one ticket. Written once, at the end of
    training (atomically), by the chief worker only. ``mode="auto"`` takes the metric's own
    direction ("min" for the loss), checked when ``fit`` starts; the monitor's name is checked
    after the first step, the validation data at the first validation.
    """

    def __init__(self, ticket_dir, index, monitor="val_accuracy", mode="auto",
                 method="dst_ensemble", metadata=None, overwrite=False):
        super().__init__()
        self.ticket_dir = _checks.check_path("ticket_dir", ticket_dir)
        self.index = _checks.check_int("index", index, minimum=0)
        self.monitor = _checks.check_str("monitor", monitor)
        self.mode = _checks.check_choice("mode", mode, MODES)
        self.method = _checks.check_str("method", method)
        self.metadata = _checks.check_metadata(
            "metadata", metadata, reserved=tickets.COMPUTED_KEYS + (
                "method", "epoch", "step", "monitor", "monitor_value"))
        self.overwrite = _checks.check_bool("overwrite", overwrite)
        self.path = None
        self._best = None

    def on_train_begin(self, logs=None):
        if os.path.exists(self.ticket_dir) and not os.path.isdir(self.ticket_dir):
            raise ValueError(f"ticket_dir={self.ticket_dir!r} exists and is not a folder.")
        self._best = _BestSnapshot(self.ticket_dir, self.index, self.monitor,
                                   resolve_mode(self.model, self.monitor, self.mode))
        self._monitor_checked = False
        self._reset_epoch_close()

    def on_train_batch_end(self, batch, logs=None):
        if not self._monitor_checked:
            check_monitor_name(self, self.monitor, logs)
            self._monitor_checked = True
        self._batch_ended(batch, logs)

    def on_epoch_begin(self, epoch, logs=None):
        if epoch > 0 and self._best.weights is None:
            if _is_chief(self.model):
                recover_partial_writes(self.ticket_dir)
            self._best.restore(len(self.model.get_weights()))
        self._begin_epoch(epoch)

    def _close_epoch(self, epoch, logs):
        step = int(self.model.optimizer.iterations.numpy())
        self._best.offer(self.model, _monitored(logs, self.monitor),
                         {"epoch": epoch, "step": step}, persist=_is_chief(self.model))

    def on_epoch_end(self, epoch, logs=None):
        self._end_epoch(epoch, logs)

    def on_train_end(self, logs=None):
        if _is_chief(self.model) and self._best.weights is not None:
            self.path = self._best.write_ticket(self.model, self.method, self.metadata,
                                                overwrite=self.overwrite)
