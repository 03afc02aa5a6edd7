"""pytest plugin (registered through the ``pytest11`` entry point): the ``socket_activated`` fixture.

``socket_activated(argv, **kw)`` starts ``argv`` under socket activation with
:func:`activator.testing.start` (same keywords as :func:`activator.testing.activate`)
and returns the :class:`activator.testing.Activated`; every daemon started in a
test is stopped, reaped and cleaned up at its teardown, last started first.
"""
from __future__ import annotations

import pytest


@pytest.fixture
def socket_activated():
    """Factory: ``socket_activated(argv, listen=None, accept=False, env=None, timeout=10.0, fdname=None, notify=False)``."""
    from .testing import start

    started = []

    def factory(argv, **kw):
        activated = start(argv, **kw)
        started.append(activated)
        return activated

    yield factory
    errors = []
    for activated in reversed(started):
        try:
            activated.close()
        except Exception as exc:  # noqa: BLE001 - clean up the others first
            errors.append(exc)
    if errors:
        raise errors[0]
