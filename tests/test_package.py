"""Every helpers module imports on its own and says what it is for."""

import importlib
import pkgutil

import pytest

import helpers

MODULES = sorted(m.name for m in pkgutil.iter_modules(helpers.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_and_has_a_docstring(name):
    module = importlib.import_module(f"helpers.{name}")
    assert module.__doc__ and module.__doc__.strip(), f"helpers.{name} has no module docstring"


def test_no_module_shadows_the_standard_library():
    import sys

    shadowing = [m for m in MODULES if m in sys.stdlib_module_names]
    assert shadowing == []
