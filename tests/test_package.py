"""The package's top-level names resolve to the real objects in their modules."""

import importlib

import pytest

import helpers


@pytest.mark.parametrize("name", helpers.__all__)
def test_top_level_name_is_the_module_object(name):
    module = importlib.import_module(f"helpers.{helpers._EXPORTS[name]}")
    assert getattr(helpers, name) is getattr(module, name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        helpers.no_such_thing  # noqa: B018
