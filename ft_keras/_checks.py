"""The one set of argument checks of ft_keras (private).

Every public function and class checks its arguments with these helpers, so that the same
mistake gets the same answer everywhere:

* ``TypeError`` when the *type* is wrong (a float where an int is needed, a bool where a number
  is needed, a list where a path is needed), ``ValueError`` when the type is right but the
  *value* is not allowed (a negative count, a fraction above 1, an unknown mode name).
* Every message names the argument, shows the value and says what is allowed, e.g.
  ``update_every=0 is not allowed; it must be an int >= 1.``
* Integers: Python and numpy integers are accepted (``np.int64(3)``); bools are refused.
* Choices (``grow="Gradient"``) are case-insensitive everywhere and returned lower-cased.
* Signatures: ``check_<kind>(argument, value, ...)``, the argument's name first.

Only the standard library, numpy and (for `check_model`) Keras: no ft_keras module is imported
here, so every module may import this one.
"""

import json
import numbers
import os

import numpy as np


def _describe(value):
    return f"{value!r} ({type(value).__name__})"


def _is_bool(value):
    return isinstance(value, (bool, np.bool_))


def is_int(value):
    """True for Python and numpy integers, False for bools."""
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def is_real(value):
    """True for Python and numpy real numbers (ints included), False for bools."""
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _range_text(minimum, maximum):
    if minimum is not None and maximum is not None:
        return f"in [{minimum}, {maximum}]"
    if minimum is not None:
        return f">= {minimum}"
    if maximum is not None:
        return f"<= {maximum}"
    return ""


def check_int(argument, value, minimum=None, maximum=None, allow_none=False):
    """An int (numpy ints accepted) in ``[minimum, maximum]``; returns a Python int (or None)."""
    if value is None and allow_none:
        return None
    allowed = " ".join(filter(None, ["an int", _range_text(minimum, maximum)]))
    if allow_none:
        allowed += " or None"
    if not is_int(value):
        raise TypeError(f"{argument} must be {allowed}; got {_describe(value)}.")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{argument}={value!r} is not allowed; it must be {allowed}.")
    return int(value)


def check_positive_int(argument, value, allow_none=False):
    """An int >= 1 (or None with ``allow_none``)."""
    return check_int(argument, value, minimum=1, allow_none=allow_none)


def check_seed(argument, value):
    """A seed: any int (numpy ints accepted, bools refused)."""
    return check_int(argument, value)


def check_real(argument, value, low=None, high=None, low_open=False, high_open=False,
               allow_none=False):
    """A finite real number in the interval given by ``low`` / ``high`` (open or closed ends).

    Returns a Python float (or None with ``allow_none``).
    """
    if value is None and allow_none:
        return None
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    if low is not None or high is not None:
        interval = (f"{left}{'-inf' if low is None else low}, "
                    f"{'inf' if high is None else high}{right}")
        allowed = f"a finite number in {interval}"
    else:
        allowed = "a finite number"
    if allow_none:
        allowed += " or None"
    if not is_real(value):
        raise TypeError(f"{argument} must be {allowed}; got {_describe(value)}.")
    number = float(value)
    ok = np.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        raise ValueError(f"{argument}={value!r} is not allowed; it must be {allowed}.")
    return number


def check_fraction(argument, value, low_open=True, allow_none=False):
    """A number in (0, 1] (``low_open``) or [0, 1]; returns a float."""
    return check_real(argument, value, low=0.0, high=1.0, low_open=low_open,
                      allow_none=allow_none)


def check_choice(argument, value, allowed):
    """One of ``allowed`` (a tuple of lower-case names), case-insensitive; returns it lower-cased."""
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be one of {tuple(allowed)} (a str); got "
                        f"{_describe(value)}.")
    lowered = value.lower()
    if lowered not in allowed:
        raise ValueError(f"{argument}={value!r} is not supported; allowed values are "
                         f"{tuple(allowed)} (any case).")
    return lowered


def check_bool(argument, value):
    """True or False (numpy bools accepted); returns a Python bool."""
    if not _is_bool(value):
        raise TypeError(f"{argument} must be True or False; got {_describe(value)}.")
    return bool(value)


def check_str(argument, value, allow_empty=False):
    """A str (non-empty unless ``allow_empty``)."""
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str; got {_describe(value)}.")
    if not value and not allow_empty:
        raise ValueError(f"{argument}={value!r} is not allowed; it must be a non-empty str.")
    return value


def check_path(argument, value, allow_none=False):
    """A non-empty path (str or os.PathLike, not bytes); returns it as a str."""
    if value is None and allow_none:
        return None
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{argument} must be a path (str or os.PathLike); got {_describe(value)}."
        )
    path = os.fspath(value)
    if not path:
        raise ValueError(f"{argument}={value!r} is not allowed; it must be a non-empty path.")
    return path


def check_existing_dir(argument, value, allow_none=False):
    """A path to a folder that exists; returns it as a str."""
    path = check_path(argument, value, allow_none=allow_none)
    if path is not None and not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise ValueError(f"{argument}={value!r} {what}; it must be an existing folder.")
    return path


def check_callable(argument, value, what="a callable"):
    """A callable."""
    if not callable(value):
        raise TypeError(f"{argument} must be {what}; got {_describe(value)}.")
    return value


def check_model(argument, model, built=True):
    """A `keras.Model`, built unless ``built=False``."""
    import keras  # pylint: disable=import-outside-toplevel

    if not isinstance(model, keras.Model):
        raise TypeError(f"{argument} must be a keras.Model; got {type(model).__name__}.")
    if built and not model.built:
        raise ValueError(
            f"{argument}={model.name!r} is not built; build it first (give it a keras.Input or "
            "call it on data)."
        )
    return model


def _json_value(value):
    """JSON form of the numpy / tensor / tuple values that metadata may hold."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "numpy"):  # TF tensors and variables
        return _json_value(np.asarray(value.numpy()))
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def check_metadata(argument, value, reserved=()):
    """A dict of extra values to store as JSON (or None: ``{}``); returns a copy.

    Keys must be str and none of ``reserved`` (keys ft_keras sets itself); values must be
    JSON-serialisable (numpy scalars and arrays, tensors and tuples are accepted).
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{argument} must be a dict or None; got {_describe(value)}.")
    bad = [key for key in value if not isinstance(key, str)]
    if bad:
        raise TypeError(f"{argument} keys must be str; got {bad!r}.")
    taken = sorted(key for key in value if key in reserved)
    if taken:
        raise ValueError(f"{argument} sets {taken}, which ft_keras sets itself; store these "
                         "values under other keys.")
    try:
        json.dumps(value, default=_json_value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{argument} must be JSON-serialisable: {error}.") from None
    return dict(value)


def check_names(argument, value):
    """A str or an iterable of str (layer names); returns a tuple (empty for None)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise TypeError(
            f"{argument} must be a str or an iterable of str; got {_describe(value)}."
        ) from None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{argument} must hold str names; got {_describe(name)} in it.")
    return names


def check_validation_batches(batches, num_classes, what="the validation data"):
    """Scans ``(x, y, ...)`` numpy batches once; raises ValueError, naming ``what``, the batch
    and the value, at the first NaN / Inf in a float ``x`` or integer label ``y`` outside
    ``[0, num_classes)`` (``num_classes`` None: labels unchecked). Returns the number of rows
    seen (0: ``what`` is empty)."""
    rows = 0
    for number, batch in enumerate(batches):
        x = np.asarray(batch[0])
        if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
            bad = x[~np.isfinite(x)].ravel()[0]
            raise ValueError(
                f"{what} holds non-finite inputs ({bad} in batch {number}): a model maps them to "
                "meaningless outputs (ReLU turns NaN into 0) and tickets would be selected on "
                "them. Clean or drop those rows."
            )
        if len(batch) > 1 and batch[1] is not None and num_classes is not None:
            y = np.asarray(batch[1])
            if np.issubdtype(y.dtype, np.integer) and y.size and (
                    y.min() < 0 or y.max() >= num_classes):
                bad = y.min() if y.min() < 0 else y.max()
                raise ValueError(
                    f"{what} holds label {bad} (batch {number}), outside [0, {num_classes}) for "
                    f"a model with {num_classes} outputs. Fix the labels or the model's output "
                    "size."
                )
        rows += len(x)
    return rows
