"""FreeTickets (EDST Ensemble) and best-epoch ticket selection, as Keras callbacks.

`FreeTickets` runs an EDST plan inside one ``model.fit`` and writes the best epoch of each
refinement phase as a ticket; `TicketCheckpoint` writes the best epoch of a whole fit as one
ticket (a DST Ensemble member). Both select by a ``monitor`` of the epoch logs whose direction
("min" / "max") is decided the way Keras's own callbacks decide it (the metric's declared
direction; "loss" is minimised) and is checked, with the presence of validation data, when
``fit`` starts. See docs/method.md for the method.

Crash safety. A selection window's best-so-far state is mirrored to
``<ticket_dir>/.progress-<i>.json`` / ``.npz`` (atomically) after every epoch, so a run resumed
with ``keras.callbacks.BackupAndRestore`` continues the selection exactly, whatever the order of
the callbacks: a phase whose ticket was not written before the crash (e.g. killed while writing
it, or ``BackupAndRestore`` saved the epoch before FreeTickets saw it) gets its ticket at the
start of the resumed fit, from the persisted state (the restored model is evaluated on the
fit's validation data when the crash fell between the two callbacks). Leftovers of interrupted
writes are removed at that point. Ticket writes themselves are atomic (``ft_keras.tickets``).
A state with non-finite weights is never selected.
"""

import json
import os
import shutil

import keras
import numpy as np
from absl import logging

from ft_keras import _checks
from ft_keras import _keras_compat
from ft_keras import schedules
from ft_keras import tickets
from ft_keras import training

MODES = ("auto", "min", "max")
# Ticket metadata keys that FreeTickets sets itself.
_OWN_METADATA = ("method", "phase", "epoch", "step", "monitor", "monitor_value", "seed",
                 "explore_fraction", "num_tickets", "optimizer_state")


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


def check_validation_data(callback, monitor):
    """At ``on_train_begin``: a ``val_`` monitor needs validation data in the running ``fit``.

    Raises ValueError when the running ``fit`` call has no validation data (when the call
    cannot be inspected, the first epoch's logs tell instead).
    """
    if not monitor.startswith("val_"):
        return
    found, validation_data = _keras_compat.fit_validation_data()
    if found and validation_data is None:
        raise ValueError(
            f"{type(callback).__name__}: monitor={monitor!r} needs validation data, but fit() "
            "got none: pass validation_data=... (or validation_split=...) to fit(), or monitor "
            "a training metric."
        )


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


class _BestSnapshot:
    """Keeps the best-so-far model state of one selection window (a phase, or a whole fit).

    The state is held in memory and mirrored to ``<ticket_dir>/.progress-<index>.*`` (written
    atomically): the weights after each improvement, the record of the last epoch seen after
    every epoch. So a run resumed inside the window, or after it ended, still selects over the
    whole window.
    """

    def __init__(self, ticket_dir, index, monitor, mode):
        self.ticket_dir = ticket_dir
        self.index = index
        self.monitor = monitor
        self.mode = mode
        self.value = None
        self.weights = None
        self.info = {}
        self.last_epoch = None

    @property
    def _paths(self):
        base = os.path.join(self.ticket_dir, f".progress-{self.index}")
        return base + ".json", base + ".npz"

    def better(self, value):
        if self.value is None:
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def offer(self, model, value, info, persist):
        """Takes the model's state if ``value`` beats the best so far; returns True if taken.

        States with non-finite weights, and non-finite values, are never taken.
        """
        self.last_epoch = info.get("epoch")
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
            self._persist(weights_too=taken)
        return taken

    def _persist(self, weights_too):
        json_path, npz_path = self._paths
        os.makedirs(self.ticket_dir, exist_ok=True)
        record = {"info": self.info, "value": self.value, "last_epoch": self.last_epoch,
                  "monitor": self.monitor, "mode": self.mode}
        writes = [(json_path, lambda f: f.write(json.dumps(record).encode()))]
        if weights_too:
            writes.insert(0, (npz_path, lambda f: np.savez(f, *self.weights)))
        for path, write in writes:
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def restore(self, num_weights):
        """Loads a persisted best-so-far state, if one exists for this window."""
        json_path, npz_path = self._paths
        if not os.path.exists(json_path):
            return False
        with open(json_path) as f:
            record = json.load(f)
        self.last_epoch = record.get("last_epoch")
        if self.mode is None:
            self.mode = record.get("mode")
        if record.get("value") is None or not os.path.exists(npz_path):
            return True
        with np.load(npz_path) as data:
            weights = [data[f"arr_{i}"] for i in range(len(data.files))]
        if len(weights) != num_weights:
            logging.warning("ignoring %s: it holds %d arrays, the model %d", npz_path,
                            len(weights), num_weights)
            return False
        self.info, self.weights, self.value = record["info"], weights, float(record["value"])
        return True

    def clear(self):
        for path in self._paths:
            if os.path.exists(path):
                os.remove(path)

    def write_ticket(self, model, method, extra, overwrite):
        """Writes the best state as ``ticket_<index>`` (atomically) and forgets the progress."""
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


def remove_partial_writes(ticket_dir):
    """Deletes what interrupted writes left in ``ticket_dir``: hidden ``.tmp-*`` / ``.trash-*``
    folders and ``*.tmp-<pid>`` progress files. Returns the removed names."""
    removed = []
    if not os.path.isdir(ticket_dir):
        return removed
    for name in sorted(os.listdir(ticket_dir)):
        path = os.path.join(ticket_dir, name)
        partial_dir = name.startswith((".tmp-", ".trash-")) and os.path.isdir(path)
        partial_file = name.startswith(".progress-") and ".tmp-" in name
        if partial_dir and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
        elif partial_file:
            os.remove(path)
            removed.append(name)
    if removed:
        logging.info("removed leftovers of interrupted writes in %s: %s", ticket_dir, removed)
    return removed


def _evaluate_monitor(model, monitor):
    """The monitored value of the model's current state, from the running fit's validation
    data (None when that cannot be done)."""
    found, validation_data = _keras_compat.fit_validation_data()
    if not found or validation_data is None:
        return None
    if isinstance(validation_data, (tuple, list)):
        logs = model.evaluate(*validation_data[:3], verbose=0, return_dict=True)
    else:
        logs = model.evaluate(validation_data, verbose=0, return_dict=True)
    name = monitor[4:] if monitor.startswith("val_") else monitor
    return logs.get(name)


class FreeTickets(training.DynamicSparsity):
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
        ticket_dir: folder for the tickets; a non-empty folder is refused unless ``overwrite``.
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
            are drop_fraction=0.5 annealed (cosine) to 0.005 over the run, and
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
        self.tickets = []  # paths written by this callback, in ticket order
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
        if epochs is not None and epochs < self.total_epochs:
            raise ValueError(
                f"fit(epochs={epochs}) does not cover the FreeTickets plan: exploration_epochs="
                f"{self.exploration_epochs} + num_tickets={self.num_tickets} x refine_epochs="
                f"{self.refine_epochs} = {self.total_epochs} epochs."
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
        check_validation_data(self, self.monitor)
        self._mode = resolve_mode(self.model, self.monitor, self.mode)
        super().on_train_begin(logs)
        self._jump_steps = ()
        self._best = None
        self._started = False
        self._monitor_checked = False

    def on_train_batch_end(self, batch, logs=None):
        if not self._monitor_checked:
            check_monitor_name(self, self.monitor, logs)
            self._monitor_checked = True
        super().on_train_batch_end(batch, logs)

    def on_epoch_begin(self, epoch, logs=None):
        if not self._started:
            self._start(epoch)
        super().on_epoch_begin(epoch, logs)
        if epoch >= self.total_epochs:
            self.model.stop_training = True
            return
        if self.control_learning_rate:
            self._optimizer.learning_rate = self.edst_plan.learning_rate(epoch)
        phase = self.edst_plan.phase_at(epoch)
        if phase.kind == "refinement" and (self._best is None or
                                           self._best.index != phase.index - 1):
            self._best = _BestSnapshot(self.ticket_dir, phase.index - 1, self.monitor,
                                       self._mode)
            if epoch > phase.start_epoch:  # resumed inside the phase
                self._best.restore(len(self.model.get_weights()))
        if epoch in self.edst_plan.global_exploration_epochs:
            logging.info("epoch %d: global exploration (q = %.2f) at step %d", epoch,
                         self.explore_fraction, self._jump_steps[phase.index - 2])

    def _start(self, epoch):
        """First epoch of this fit (fresh or resumed): fix the jump steps and the end step,
        prepare the ticket folder, and finish phases a crash left without their ticket."""
        self._started = True
        steps = int(self.params["steps"])
        origin = int(self._optimizer.iterations.numpy()) - epoch * steps
        self._jump_steps = tuple(
            origin + e * steps + 1 for e in self.edst_plan.global_exploration_epochs
        )
        if self._jump_steps:
            self.set_global_explorations(self._jump_steps[0], self.refine_epochs * steps,
                                         len(self._jump_steps), self.explore_fraction)
        else:
            self.set_global_explorations(1, 1, 0, self.explore_fraction)
        if self.end_step is None:
            self.set_end_step(origin + self.total_epochs * steps)
        if self.channel_sparsity > 0 and self.channel_end_step is None:
            self.set_channel_end_step(max(origin + self.exploration_epochs * steps, 1))
        if not _is_chief(self.model):
            return
        if epoch == 0:
            tickets.prepare_ticket_dir(self.ticket_dir, overwrite=self.overwrite)
            return
        remove_partial_writes(self.ticket_dir)
        for phase in self.plan:
            if phase.kind == "refinement" and phase.end_epoch <= epoch:
                self._finish_phase_after_crash(phase, epoch)

    def _finish_phase_after_crash(self, phase, epoch):
        index = phase.index - 1
        if os.path.isdir(os.path.join(self.ticket_dir, f"ticket_{index}")):
            return
        best = _BestSnapshot(self.ticket_dir, index, self.monitor, self._mode)
        if not best.restore(len(self.model.get_weights())):
            raise ValueError(
                f"FreeTickets: resumed at epoch {epoch}, after refinement phase {phase.index} "
                f"(epochs {phase.start_epoch}-{phase.end_epoch - 1}) ended, but its ticket "
                f"{index} is neither in {self.ticket_dir!r} nor recoverable from its progress "
                "files there: was the folder changed? Start again with overwrite=True."
            )
        last = phase.end_epoch - 1
        if best.last_epoch is not None and best.last_epoch < last and epoch == phase.end_epoch:
            # BackupAndRestore saved the phase's last epoch before FreeTickets saw it: the
            # restored model *is* that epoch's state; evaluate it as fit would have.
            value = _evaluate_monitor(self.model, self.monitor)
            if value is None:
                logging.warning(
                    "FreeTickets: epoch %d was saved by BackupAndRestore before FreeTickets saw "
                    "it and its %s cannot be recomputed here; ticket %d is chosen from epochs "
                    "%d-%d.", last, self.monitor, index, phase.start_epoch, best.last_epoch)
            else:
                step = int(self._optimizer.iterations.numpy())
                best.offer(self.model, value, {"phase": phase.index, "epoch": last,
                                               "step": step}, persist=True)
        logging.warning("FreeTickets: writing ticket %d of refinement phase %d, which the "
                        "interrupted run did not finish writing", index, phase.index)
        self.tickets.append(best.write_ticket(self.model, "edst", self._ticket_extra(),
                                              overwrite=True))

    def _ticket_extra(self):
        return dict(self.metadata, seed=self.seed, explore_fraction=self.explore_fraction,
                    num_tickets=self.num_tickets, optimizer_state=self.optimizer_state)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        phase = self.edst_plan.phase_at(epoch)
        if phase is None or phase.kind != "refinement":
            return
        value = _monitored(logs, self.monitor)
        chief = _is_chief(self.model)
        step = int(self._optimizer.iterations.numpy())
        self._best.offer(self.model, value, {"phase": phase.index, "epoch": epoch, "step": step},
                         persist=chief)
        if epoch == phase.end_epoch - 1 and chief:
            self.tickets.append(
                self._best.write_ticket(self.model, method="edst", extra=self._ticket_extra(),
                                        overwrite=True)
            )


class TicketCheckpoint(keras.callbacks.Callback):
    """Writes the best epoch of a fit (by ``monitor``) as ``ticket_dir/ticket_<index>/``.

    Used for DST Ensemble members (`ft_keras.recipes.train_dst_ensemble`): each independent run
    contributes its best-validation checkpoint as one ticket. Written once, at the end of
    training (atomically), by the chief worker only. ``mode="auto"`` takes the metric's own
    direction ("min" for the loss); the monitor and the validation data are checked when ``fit``
    starts.
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
        check_validation_data(self, self.monitor)
        self._best = _BestSnapshot(self.ticket_dir, self.index, self.monitor,
                                   resolve_mode(self.model, self.monitor, self.mode))
        self._monitor_checked = False

    def on_train_batch_end(self, batch, logs=None):
        if not self._monitor_checked:
            check_monitor_name(self, self.monitor, logs)
            self._monitor_checked = True

    def on_epoch_begin(self, epoch, logs=None):
        if epoch > 0 and self._best.weights is None:
            if _is_chief(self.model):
                remove_partial_writes(self.ticket_dir)
            self._best.restore(len(self.model.get_weights()))

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self._best.offer(self.model, _monitored(logs, self.monitor),
                         {"epoch": epoch, "step": step}, persist=_is_chief(self.model))

    def on_train_end(self, logs=None):
        if _is_chief(self.model) and self._best.weights is not None:
            self.path = self._best.write_ticket(self.model, self.method, self.metadata,
                                                overwrite=self.overwrite)
