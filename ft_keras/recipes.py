"""Training recipes that produce tickets: the DST Ensemble (SPEC.md section 4).

A DST Ensemble is M independent dynamic-sparse-training runs, each with its own seed for the
initial weights *and* the initial masks; the best-validation checkpoint of each run is its ticket.
(The EDST Ensemble needs no recipe: it is one ``fit`` with the `ft_keras.FreeTickets` callback.)

Example:

>>> paths = ftk.train_dst_ensemble(
...     lambda: ftk.models.lenet_300_100(), num_members=3, train_data=train, validation_data=val,
...     epochs=10, ticket_dir="/tmp/dst_tickets", sparsity=0.8)
>>> ensemble = ftk.Ensemble.from_directory("/tmp/dst_tickets")
"""

import numbers

import keras
from absl import logging

from ft_keras import free_tickets
from ft_keras import training
from ft_keras import sparsify as sparsify_lib
from ft_keras import tickets


def default_compile(model):
    """Adam(1e-3), sparse categorical cross-entropy on logits, accuracy."""
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def train_dst_ensemble(
    build_fn,
    num_members,
    train_data,
    *,
    validation_data,
    epochs,
    ticket_dir,
    sparsity=0.8,
    distribution="erk",
    keep_dense=(),
    compile_fn=default_compile,
    seed=0,
    monitor="val_accuracy",
    overwrite=False,
    dst_kwargs=None,
    fit_kwargs=None,
    callbacks=(),
):
    """Trains ``num_members`` independent DST runs and writes their best checkpoints as tickets.

    Member m uses seed ``seed + m`` for its initial weights (``keras.utils.set_random_seed``
    before ``build_fn()``), its initial masks and its random growth; it is trained with
    `DynamicSparsity` and its best-``monitor`` epoch is written to ``ticket_dir/ticket_<m>/``.

    Args:
        build_fn: callable returning a new dense Sequential/Functional model (logits output).
        num_members: M >= 1.
        train_data: what ``fit`` takes as ``x`` (a ``tf.data.Dataset`` of (x, y) batches, or an
            ``(x, y)`` tuple of arrays).
        validation_data: passed to ``fit``; required to select the best checkpoint.
        epochs: epochs per member.
        ticket_dir: output folder; a non-empty folder is refused unless ``overwrite``.
        sparsity, distribution, keep_dense: see `ft_keras.sparsify`.
        compile_fn: called with each sparse model to compile it (default: `default_compile`).
        seed: base seed.
        monitor: epoch log used to pick each member's ticket.
        dst_kwargs: keyword arguments of `DynamicSparsity` (its ``seed`` is set per member).
        fit_kwargs: extra ``fit`` arguments (e.g. ``steps_per_epoch``, ``verbose``).
        callbacks: extra callbacks for every member's fit.

    Returns:
        The ticket folders, in member order.
    """
    if isinstance(num_members, bool) or not isinstance(num_members, numbers.Integral) or (
        num_members < 1
    ):
        raise ValueError(f"num_members={num_members!r} must be an integer >= 1.")
    if not callable(build_fn):
        raise TypeError(f"build_fn must be callable (returning a keras.Model); got {build_fn!r}.")
    if validation_data is None:
        raise ValueError(
            f"validation_data=None: each member's ticket is its best epoch by monitor={monitor!r}, "
            "which needs validation data."
        )
    dst_kwargs = dict(dst_kwargs or {})
    dst_kwargs.pop("seed", None)
    fit_kwargs = dict(fit_kwargs or {})
    tickets.prepare_ticket_dir(ticket_dir, overwrite=overwrite)
    if isinstance(train_data, tuple) and len(train_data) == 2:
        fit_kwargs.setdefault("y", train_data[1])
        train_data = train_data[0]

    paths = []
    for member in range(int(num_members)):
        member_seed = int(seed) + member
        keras.utils.set_random_seed(member_seed)
        dense = build_fn()
        if not isinstance(dense, keras.Model):
            raise TypeError(f"build_fn returned {type(dense).__name__}; expected a keras.Model.")
        model = sparsify_lib.sparsify(
            dense, sparsity, distribution=distribution, keep_dense=keep_dense, seed=member_seed
        )
        compile_fn(model)
        checkpoint = free_tickets.TicketCheckpoint(
            ticket_dir,
            member,
            monitor=monitor,
            method="dst_ensemble",
            metadata={"seed": member_seed, "member": member, "num_members": int(num_members)},
            overwrite=True,
        )
        logging.info("DST Ensemble: training member %d/%d (seed %d)", member + 1, num_members,
                     member_seed)
        model.fit(
            train_data,
            epochs=epochs,
            validation_data=validation_data,
            callbacks=[
                training.DynamicSparsity(seed=member_seed, **dst_kwargs),
                checkpoint,
                *callbacks,
            ],
            **fit_kwargs,
        )
        if checkpoint.path is None:
            raise RuntimeError(f"member {member} wrote no ticket (no {monitor!r} value seen).")
        paths.append(checkpoint.path)
    return paths
