"""The modules renamed in 0.2.0 still import, with a DeprecationWarning, and give the new objects."""

import importlib
import sys

import pytest

import ft_keras as ftk


@pytest.mark.parametrize("old, new, name", [
    ("callbacks", "training", "DynamicSparsity"),
    ("callbacks", "free_tickets", "FreeTickets"),
    ("topology", "masks", "update_mask"),
    ("distributions", "densities", "layer_densities"),
])
def test_old_module_names_warn_and_alias_the_new_ones(old, new, name):
    sys.modules.pop(f"ft_keras.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"ft_keras.{old} is deprecated"):
        module = importlib.import_module(f"ft_keras.{old}")
    assert getattr(module, name) is getattr(importlib.import_module(f"ft_keras.{new}"), name)
    vars(ftk).pop(old, None)  # the import system set it; the package's __getattr__ warns too
    with pytest.warns(DeprecationWarning, match=f"ft_keras.{old} is deprecated"):
        assert getattr(ftk, old) is module


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        getattr(ftk, "nope")
