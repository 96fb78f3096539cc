"""Checks every test gets: pytest-twisted fails neither a test that logs an
unhandled error nor one that leaves a timer on the reactor."""

import pytest

from tests.pg import any_database, pg_admin, pg_database, pg_url  # noqa: F401 (fixtures: a real PostgreSQL)
from upvoot._env import set_offline_environment

set_offline_environment()


_last_module = [None]


@pytest.fixture(autouse=True)
def no_logged_errors_or_leftover_timers(request):
    """pytest-twisted fails neither on a logged unhandled error nor on a
    timer left behind: check both.

    The collection after each test finds what the test left in reference
    cycles (an unhandled failure's Deferred logs "Unhandled error in
    Deferred" when collected). What survived the previous test's collection
    is frozen (``gc.freeze``) and not scanned again: in the full suite's heap
    (Whisper, onnxruntime, psycopg, Selenium) a full collection takes a
    tenth of a second or more, minutes over the suite. The first test of
    each module unfreezes it all, so its collection is full and finds what
    an earlier test or a module fixture's teardown left behind."""
    import gc

    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher

    if request.module is not _last_module[0]:
        _last_module[0] = request.module
        gc.unfreeze()

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
        gc.freeze()  # the survivors: the next test's collection scans only what comes after
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
