"""The standing attack suite (issue 9): hostile clients against the real daemon.

Every case runs against a real ``twistd upvoot`` on loopback (one daemon per
module), asserts the outcome it expects (HTTP status, close code, closed
within a bound), that the daemon still greets a legitimate call, and that no
log line holds a key. Helpers and fixtures: ``tests/hostile/conftest.py``.
"""
