"""Checks every test gets: pytest-twisted fails neither a test that logs an
unhandled error nor one that leaves a timer on the reactor."""

import pytest

from tests.pg import any_database, pg_admin, pg_database, pg_url  # noqa: F401 (fixtures: a real PostgreSQL)
from upvoot._env import set_offline_environment

set_offline_environment()


@pytest.fixture(autouse=True)
def no_logged_errors_or_leftover_timers():
    """pytest-twisted fails neither on a logged unhandled error nor on a
    timer left behind: check both."""
    import gc

    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher

    errors = []

    def observer(event):
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    before = set(reactor.getDelayedCalls())
    globalLogPublisher.addObserver(observer)
    try:
        yield
        gc.collect()  # "Unhandled error in Deferred" is logged on collection
    finally:
        globalLogPublisher.removeObserver(observer)
    assert errors == []
    assert [c for c in reactor.getDelayedCalls() if c not in before] == []


@pytest.fixture
def logged():
    """Every log event emitted during the test (twisted.logger's global publisher)."""
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
