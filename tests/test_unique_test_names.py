"""Test modules are imported by basename (tests/ has no packages): two files of one name in two
folders stop pytest's collection of both. Caught here, by name, before that happens."""

from __future__ import annotations

import collections
import os

ROOT = os.path.dirname(os.path.abspath(__file__))


def test_every_test_helper_and_module_name_is_unique():
    names = collections.Counter(f for _, _, files in os.walk(ROOT) for f in files
                                if f.endswith(".py") and f != "conftest.py")
    assert [name for name, count in names.items() if count > 1] == []
