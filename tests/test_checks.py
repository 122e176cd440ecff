"""The one set of argument checks (ft_keras/_checks.py): types, values, messages."""

import os

import numpy as np
import pytest

from ft_keras import _checks


@pytest.mark.parametrize("value, expected", [(3, 3), (np.int64(4), 4), (np.int8(0), 0)])
def test_check_int_accepts_python_and_numpy_ints(value, expected):
    got = _checks.check_int("count", value, minimum=0)
    assert got == expected and type(got) is int


@pytest.mark.parametrize("value", [1.0, "1", True, np.bool_(True), None, [1]])
def test_check_int_refuses_other_types_with_type_error(value):
    with pytest.raises(TypeError, match=r"count must be an int >= 0; got .*\("):
        _checks.check_int("count", value, minimum=0)


def test_check_int_range_message_names_argument_value_and_range():
    with pytest.raises(ValueError, match=r"^count=7 is not allowed; it must be an int in \[0, 5\]"):
        _checks.check_int("count", 7, minimum=0, maximum=5)
    assert _checks.check_positive_int("n", None, allow_none=True) is None
    with pytest.raises(ValueError, match="n=0 is not allowed"):
        _checks.check_positive_int("n", 0)


def test_check_real_intervals():
    assert _checks.check_real("p", np.float32(0.5), low=0.0, high=1.0) == 0.5
    assert _checks.check_real("p", 1, low=0.0, high=1.0) == 1.0
    with pytest.raises(ValueError, match=r"p=1\.0 is not allowed.*\[0\.0, 1\.0\)"):
        _checks.check_real("p", 1.0, low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"p=0 is not allowed.*\(0\.0, 1\.0\]"):
        _checks.check_fraction("p", 0)
    with pytest.raises(ValueError, match="p=nan"):
        _checks.check_fraction("p", float("nan"))
    with pytest.raises(ValueError, match="p=inf"):
        _checks.check_real("p", float("inf"))
    with pytest.raises(TypeError, match="p must be a finite number"):
        _checks.check_real("p", True)
    assert _checks.check_fraction("p", 0, low_open=False) == 0.0


def test_check_choice_is_case_insensitive_everywhere():
    assert _checks.check_choice("grow", "Gradient", ("gradient", "random")) == "gradient"
    with pytest.raises(ValueError, match=r"grow='largest' is not supported; allowed values are "
                                         r"\('gradient', 'random'\)"):
        _checks.check_choice("grow", "largest", ("gradient", "random"))
    with pytest.raises(TypeError, match="grow must be one of"):
        _checks.check_choice("grow", 1, ("gradient", "random"))


def test_check_bool_str_path_names(tmp_path):
    assert _checks.check_bool("flag", np.bool_(False)) is False
    with pytest.raises(TypeError, match="flag must be True or False"):
        _checks.check_bool("flag", 1)
    with pytest.raises(ValueError, match="name=''"):
        _checks.check_str("name", "")
    assert _checks.check_path("path", tmp_path) == str(tmp_path)
    with pytest.raises(TypeError, match="path must be a path"):
        _checks.check_path("path", b"/tmp")
    with pytest.raises(ValueError, match="does not exist"):
        _checks.check_existing_dir("data_dir", os.path.join(str(tmp_path), "nope"))
    assert _checks.check_names("keep", "fc1") == ("fc1",)
    assert _checks.check_names("keep", None) == ()
    with pytest.raises(TypeError, match="keep must hold str names"):
        _checks.check_names("keep", ["fc1", 2])


def test_check_model():
    import keras  # pylint: disable=import-outside-toplevel

    with pytest.raises(TypeError, match="model must be a keras.Model; got int"):
        _checks.check_model("model", 3)
    with pytest.raises(ValueError, match="is not built"):
        _checks.check_model("model", keras.Sequential([keras.layers.Dense(2)]))


def test_check_metadata_copies_json_dicts_and_refuses_the_rest():
    given = {"dataset": "mnist", "lr": np.float32(0.5), "sizes": np.arange(2), "pair": (1, 2)}
    got = _checks.check_metadata("metadata", given, reserved=("index",))
    assert got == given and got is not given
    assert _checks.check_metadata("metadata", None) == {}
    with pytest.raises(TypeError, match=r"metadata must be a dict or None; got \['a'\] \(list\)"):
        _checks.check_metadata("metadata", ["a"])
    with pytest.raises(TypeError, match=r"metadata keys must be str; got \[1\]"):
        _checks.check_metadata("metadata", {1: "a"})
    with pytest.raises(ValueError, match=r"metadata sets \['index'\], which ft_keras sets itself"):
        _checks.check_metadata("metadata", {"index": 3, "a": 1}, reserved=("index", "seed"))
    with pytest.raises(TypeError, match="metadata must be JSON-serialisable: object is not"):
        _checks.check_metadata("metadata", {"a": object()})
