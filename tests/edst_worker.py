"""One EDST training process for the fault-injection tests (tests/test_fault_injection.py).

    python tests/edst_worker.py OUT_DIR ORDER KILL_AT

Trains a small sparse MLP on synthetic data with ``ft_keras.FreeTickets`` and
``keras.callbacks.BackupAndRestore`` (``ORDER``: "backup_first" or "tickets_first"), writes its
tickets to ``OUT_DIR/tickets`` and exports the ensemble to ``OUT_DIR/export``. ``KILL_AT`` makes
the process kill itself with SIGKILL (as ``kill -9`` would) at one point:

* ``none``: run to the end;
* ``ticket_write``: while ticket 1 is being written, once its files are in the temporary folder
  and before the folder is renamed into place;
* ``between_phases``: at the start of the first epoch of refinement phase 3 (ticket 1 written,
  the epoch before saved by BackupAndRestore);
* ``export``: while the ensemble export is being written, before its folder is renamed.

A run whose tickets are all written (a finished run killed during the export) skips training.
Deterministic (fixed seeds, no shuffling, op determinism), so a resumed run can be compared
bit for bit with an uninterrupted one.
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ft_keras as ftk  # noqa: E402

NUM_TICKETS = 3


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


def main(out_dir, order, kill_at):
    tf.config.experimental.enable_op_determinism()
    ticket_dir = os.path.join(out_dir, "tickets")
    done = os.path.isdir(ticket_dir) and len(
        ftk.list_tickets(ticket_dir, allow_empty=True)) == NUM_TICKETS
    if kill_at == "ticket_write":
        _kill_before_rename("ticket_1")
    elif kill_at == "export":
        _kill_before_rename("1")
    if not done:
        (x, y), validation = _data()
        tickets = ftk.FreeTickets(ticket_dir, num_tickets=NUM_TICKETS, exploration_epochs=1,
                                  refine_epochs=2, update_every=6, exploration_lr=0.05,
                                  refine_lr=(0.02, 0.005))
        backup = keras.callbacks.BackupAndRestore(os.path.join(out_dir, "backup"))
        callbacks = [backup, tickets] if order == "backup_first" else [tickets, backup]
        if kill_at == "between_phases":
            callbacks.append(_KillAtEpoch(5))  # phases: [0], [1, 2], [3, 4], [5, 6]
        _model().fit(x, y, batch_size=32, epochs=7, validation_data=validation, shuffle=False,
                     verbose=0, callbacks=callbacks)
    ensemble = ftk.Ensemble.from_directory(ticket_dir, combine="probs")
    ensemble.export(os.path.join(out_dir, "export"), version=1, overwrite=True)
    print("finished", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
