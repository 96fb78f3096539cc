"""The abuse limits, on a task.Clock."""

from twisted.internet.task import Clock

from upvoot.daemon.admission import AbuseGuard, peer_host


def test_failed_keys_block_an_address_for_the_window_only():
    clock = Clock()
    g = AbuseGuard(clock, failure_limit=3, failure_window=60.0, max_calls_per_account=0)
    for _ in range(2):
        g.failed("10.0.0.1")
    assert not g.blocked("10.0.0.1")
    g.failed("10.0.0.1")
    assert g.blocked("10.0.0.1")
    assert not g.blocked("10.0.0.2"), "other addresses are not affected"
    clock.advance(59.0)
    assert g.blocked("10.0.0.1")
    clock.advance(1.5)
    assert not g.blocked("10.0.0.1")


def test_blocking_is_logged_once_per_window():
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = Clock()
        g = AbuseGuard(clock, failure_limit=1, failure_window=10.0, max_calls_per_account=0)
        g.failed("h")
        for _ in range(5):
            assert g.blocked("h")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e.get("event") for e in events].count("auth.rate_limited") == 1


def test_no_limit_when_zero_and_memory_is_bounded():
    clock = Clock()
    g = AbuseGuard(clock, failure_limit=0, failure_window=10.0, max_calls_per_account=0)
    g.failed("h")
    assert not g.blocked("h")
    g = AbuseGuard(clock, failure_limit=5, failure_window=10.0, max_calls_per_account=0)
    g.MAX_TRACKED = 100
    for i in range(1000):
        g.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(g._failures) <= 100


def test_concurrent_calls_per_account():
    g = AbuseGuard(Clock(), 0, 1.0, max_calls_per_account=2)
    assert not g.account_full("a")
    g.account_add("a")
    g.account_add("a")
    assert g.account_full("a") and not g.account_full("b")
    g.account_remove("a")
    assert not g.account_full("a")
    unlimited = AbuseGuard(Clock(), 0, 1.0, max_calls_per_account=0)
    for _ in range(100):
        unlimited.account_add("a")
    assert not unlimited.account_full("a")


def test_peer_host():
    assert peer_host("tcp4:127.0.0.1:5000") == "127.0.0.1"
    assert peer_host("tcp6:[::1]:5000") == "::1"
    assert peer_host("203.0.113.9") == "203.0.113.9"
