"""One EDST training process for the fault-injection tests (tests/test_fault_injection.py).

    python tests/edst_worker.py OUT_DIR ORDER KILL_AT [PLAN]

Trains a small sparse MLP on synthetic data with ``ft_keras.FreeTickets`` and
``keras.callbacks.BackupAndRestore`` (``ORDER``: "backup_first" or "tickets_first"), writes its
tickets to ``OUT_DIR/tickets`` and exports the ensemble to ``OUT_DIR/export``. ``PLAN`` is
"standard" (3 tickets: 1 exploration epoch, 2 refinement epochs each; 7 epochs) or "tiny"
(2 tickets: 1 exploration epoch, 1 refinement epoch each; 3 epochs). ``KILL_AT`` makes the
process kill itself with SIGKILL (as ``kill -9`` would) at one point:

* ``none``: run to the end;
* ``ticket_write``: while ticket 1 is being written, once its files are in the temporary folder
  and before the folder is renamed into place;
* ``between_phases``: at the start of the first epoch of refinement phase 3 (ticket 1 written,
  the epoch before saved by BackupAndRestore);
* ``export``: while the ensemble export is being written, before its folder is renamed;
* ``next``: at the first *boundary* not listed in the file named by the environment variable
  ``FT_KERAS_KILL_LOG`` (the label is appended to the file first). Boundaries: every rename,
  replace or removal of a file or folder under ``OUT_DIR/tickets`` or ``OUT_DIR/backup``
  (before it), every ``BackupAndRestore`` save (before it), and the points between the
  callbacks at ``on_epoch_begin``, ``on_test_end`` and ``on_epoch_end``. A label names the
  boundary, the epoch and the occurrence, so running ``next`` again and again (each process
  resuming the last one's state) kills once at every boundary of the run, in order.

A finished run (all tickets written, its run record removed; e.g. killed during the export)
skips training, as running a finished command again would.
Deterministic (fixed seeds, no shuffling, op determinism), so a resumed run can be compared
bit for bit with an uninterrupted one.
"""

import os
import re
import shutil
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ft_keras as ftk  # noqa: E402

PLANS = {  # num_tickets, exploration_epochs, refine_epochs
    "standard": (3, 1, 2),
    "tiny": (2, 1, 1),
}


def _kill():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_before_rename(folder_prefix):
    """Wraps tickets.atomic_folder: the write completes into the temporary folder, then the
    process dies before the rename (for destinations whose name starts with the prefix)."""
    original = ftk.tickets.atomic_folder

    def atomic_folder(destination, write, *args, **kwargs):
        if os.path.basename(os.path.normpath(destination)).startswith(folder_prefix):
            def write_then_die(tmp):
                write(tmp)
                _kill()
            return original(destination, write_then_die, *args, **kwargs)
        return original(destination, write, *args, **kwargs)

    ftk.tickets.atomic_folder = atomic_folder


class _KillAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            _kill()


class _Boundaries:
    """Acts at every boundary (see the module docstring): ``action`` is "next" (kill at the
    first label not in the log file, after adding it), "at:<label>" (kill at that label) or
    "snapshots" (copy the run's folders, when their content changed since the last copy, to
    ``OUT_DIR/snapshots/<n>__<label>``: the state a kill at that boundary leaves on disk)."""

    def __init__(self, action, out_dir, watched):
        self.action = action
        self.out_dir = out_dir
        self.watched = [os.path.abspath(p) + os.sep for p in watched]
        self.epoch = None
        self.seen = {}
        self.done = set()
        self.last_state = None
        if action == "next":
            self.log_path = os.environ["FT_KERAS_KILL_LOG"]
            with open(self.log_path, "a+", encoding="utf-8") as handle:
                handle.seek(0)
                self.done = set(handle.read().split())

    def reach(self, what):
        base = f"{what}@{self.epoch}"
        count = self.seen[base] = self.seen.get(base, 0) + 1
        label = f"{base}#{count}"
        if self.action == "snapshots":
            self._snapshot(label)
        elif self.action == f"at:{label}":
            _kill()
        elif self.action == "next" and label not in self.done:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(label + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            _kill()

    def _state(self):
        """Every file under the watched folders (lock file aside): relative path -> bytes."""
        state = {}
        for root in self.watched:
            for folder, _, files in os.walk(root):
                for name in files:
                    path = os.path.join(folder, name)
                    if name != ftk.tickets.LOCK_FILE:
                        with open(path, "rb") as handle:
                            state[os.path.relpath(path, self.out_dir)] = handle.read()
        return state

    def _snapshot(self, label):
        state = self._state()
        if state == self.last_state:
            return
        self.last_state = state
        folder = os.path.join(self.out_dir, "snapshots", f"{len(self.seen_snapshots):03d}__"
                              + re.sub(r"[^A-Za-z0-9_.@#:-]", "_", label).replace(":", "="))
        self.seen_snapshots.append(label)
        os.makedirs(folder)
        for relative, data in state.items():
            target = os.path.join(folder, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(data)

    seen_snapshots = []

    def _short(self, path):
        path = os.path.abspath(str(path))
        for root in self.watched:
            if path.startswith(root):
                name = path[len(root):]
                name = re.sub(r"-\d+-[0-9a-f]{8}", "", name)  # writer pid and random part
                return os.path.basename(root[:-1]) + "/" + re.sub(r"\.tmp-\d+$", ".tmp", name)
        return None

    def wrap_filesystem(self):
        for module, name in ((os, "replace"), (os, "rename"), (os, "remove"),
                             (shutil, "rmtree")):
            original = getattr(module, name)

            def wrapped(*args, _original=original, _name=name, **kwargs):
                short = self._short(args[0])
                if short is not None:
                    self.reach(f"{_name}:{short}")
                return _original(*args, **kwargs)

            setattr(module, name, wrapped)
        save = keras.callbacks.BackupAndRestore._save_model  # pylint: disable=protected-access

        def save_model(callback):
            self.reach("backup_save")
            return save(callback)

        keras.callbacks.BackupAndRestore._save_model = save_model  # pylint: disable=W0212

    def callback(self, position):
        boundaries = self

        class Between(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                if position == 0:
                    boundaries.epoch = epoch
                boundaries.reach(f"on_epoch_begin:{position}")

            def on_test_end(self, logs=None):
                boundaries.reach(f"on_test_end:{position}")

            def on_epoch_end(self, epoch, logs=None):
                boundaries.reach(f"on_epoch_end:{position}")

        return Between()


def _data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)).astype("float32")
    labels = rng.integers(0, 4, 512)
    x = centers[labels] + rng.normal(scale=1.5, size=(512, 16)).astype("float32")
    return (x[:384], labels[:384]), (x[384:], labels[384:])


def _model():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(4)])
    model = ftk.sparsify(base, 0.8, seed=0)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    return model


def _train(ticket_dir, backup_dir, order, plan, boundaries=None, extra=()):
    num_tickets, exploration_epochs, refine_epochs = PLANS[plan]
    (x, y), validation = _data()
    tickets = ftk.FreeTickets(ticket_dir, num_tickets=num_tickets,
                              exploration_epochs=exploration_epochs,
                              refine_epochs=refine_epochs, update_every=6,
                              exploration_lr=0.05, refine_lr=(0.02, 0.005))
    backup = keras.callbacks.BackupAndRestore(backup_dir)
    callbacks = [backup, tickets] if order == "backup_first" else [tickets, backup]
    if boundaries is not None:
        callbacks = [boundaries.callback(0), callbacks[0], boundaries.callback(1),
                     callbacks[1], boundaries.callback(2)]
    epochs = exploration_epochs + num_tickets * refine_epochs
    _model().fit(x, y, batch_size=32 if plan == "standard" else 128, epochs=epochs,
                 validation_data=validation, shuffle=False, verbose=0,
                 callbacks=callbacks + list(extra))


def _finished(ticket_dir, plan):
    """All tickets written and the run's record removed (what FreeTickets does last)."""
    return os.path.isdir(ticket_dir) and not os.path.exists(
        os.path.join(ticket_dir, ftk.tickets.RUN_FILE)) and len(
            ftk.list_tickets(ticket_dir, allow_empty=True)) == PLANS[plan][0]


def _resume_all(out_dir, order, plan):
    """Resumes, one after the other in this process, every state under OUT_DIR/snapshots (a
    copy in OUT_DIR/resumed/<name>): prints "resumed <name>" or "refused <name>: <error>"."""
    root = os.path.join(out_dir, "snapshots")
    for name in sorted(os.listdir(root)):
        target = os.path.join(out_dir, "resumed", name)
        shutil.copytree(os.path.join(root, name), target)
        for sub in ("tickets", "backup"):
            os.makedirs(os.path.join(target, sub), exist_ok=True)
        ticket_dir = os.path.join(target, "tickets")
        if _finished(ticket_dir, plan):  # as `main` does: running the command again is a no-op
            print(f"resumed {name}", flush=True)
            continue
        try:
            _train(ticket_dir, os.path.join(target, "backup"), order, plan)
        except ValueError as error:
            print(f"refused {name}: {error}", flush=True)
        else:
            print(f"resumed {name}", flush=True)
    print("finished", flush=True)


def main(out_dir, order, kill_at, plan="standard"):
    tf.config.experimental.enable_op_determinism()
    ticket_dir = os.path.join(out_dir, "tickets")
    backup_dir = os.path.join(out_dir, "backup")
    done = _finished(ticket_dir, plan)
    boundaries = None
    if kill_at == "ticket_write":
        _kill_before_rename("ticket_1")
    elif kill_at == "export":
        _kill_before_rename("1")
    elif kill_at in ("next", "snapshots") or kill_at.startswith("at:"):
        boundaries = _Boundaries(kill_at, out_dir, [ticket_dir, backup_dir])
        boundaries.wrap_filesystem()
    elif kill_at == "resume_all":
        return _resume_all(out_dir, order, plan)
    if not done:
        extra = [_KillAtEpoch(5)] if kill_at == "between_phases" else []  # phases: [0], [1, 2],
        _train(ticket_dir, backup_dir, order, plan, boundaries, extra)    # [3, 4], [5, 6]
    if kill_at == "snapshots":
        print("snapshots", len(boundaries.seen_snapshots), flush=True)
    ensemble = ftk.Ensemble.from_directory(ticket_dir, combine="probs")
    ensemble.export(os.path.join(out_dir, "export"), version=1, overwrite=True)
    print("finished", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
