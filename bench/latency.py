"""Timing of served SavedModels, shared by bench/serving.py and bench/channels.py.

A SavedModel is loaded with ``tf.saved_model.load`` and called through its ``serving_default``
signature, as TF Serving calls it (`signature`). Variants are timed in interleaved rounds (the
order rotates every round); a round calls each variant for ``seconds`` (at least 3 calls) and
keeps the p50 of its calls. `interleaved` returns the median over rounds of those p50s and, per
variant, the median over rounds of the paired per-round ratio to a baseline variant, so that a
busy moment of the machine hits both sides of a ratio alike.
"""

import statistics
import time

import numpy as np
import tensorflow as tf

import ft_keras as ftk


def block(outputs):
    """Waits for every tensor of ``outputs`` (reads it back)."""
    for value in tf.nest.flatten(outputs):
        value.numpy()


def round_p50(fn, x, seconds):
    """p50 (ms) of the calls of ``fn(x)`` during about ``seconds`` (at least 3 calls)."""
    times = []
    end = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        start = time.perf_counter()
        block(fn(x))
        times.append(time.perf_counter() - start)
    return float(np.percentile(np.array(times) * 1e3, 50))


def interleaved(fns, x, rounds, seconds, baseline):
    """{name: {"p50_ms", "ratio", "round_p50_ms"}}: medians over interleaved rounds; ``ratio``
    is the median of the per-round ratios to ``baseline`` (a key of ``fns``)."""
    names = list(fns)
    for name in names:  # warm-up: tracing, first-call allocations
        block(fns[name](x))
    per_round = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            per_round[name].append(round_p50(fns[name], x, seconds))
    base = per_round[baseline]
    return {
        name: {
            "p50_ms": statistics.median(values),
            "ratio": statistics.median(v / b for v, b in zip(values, base)),
            "round_p50_ms": values,
        }
        for name, values in per_round.items()
    }


def signature(path):
    """The ``serving_default`` signature of the SavedModel at ``path``, as a function of its one
    input tensor."""
    function = tf.saved_model.load(path).signatures[ftk.export.SERVING_SIGNATURE]
    (name,) = function.structured_input_signature[1]  # Keras names it after its tensor
    return lambda inputs: function(**{name: inputs})
