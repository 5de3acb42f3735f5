"""A pytest plugin for tests/test_tiers.py: after collection, one line per test naming its tiers, so one
collection of the suite tells every tier (instead of one collection per `-m` expression)."""

from __future__ import annotations

import pytest

from tests.conftest import TIERS


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        print(f"TIERS {item.nodeid} {','.join(tiers)}")
