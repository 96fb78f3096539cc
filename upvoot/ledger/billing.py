"""The points formula: what a call of a given duration costs. Nothing else computes points.

A call is billed per started increment: ``ceil(duration / billing_increment)``
increments of ``points_per_increment`` points each; a call of no duration
costs nothing. A duration that is a whole number of increments up to float
rounding (``3 * 0.1`` is ``0.30000000000000004``) costs exactly that number.

Used by the settlement of a finished call (``upvoot.ledger.settlement``), by
the crash settlement of a call a dead process left open, and by nothing else.
"""

from __future__ import annotations

import math

# A quotient this close (relatively) to a whole number of increments is that
# number: float noise in ``k * increment`` (about 1e-16) must not bill an
# increment the call never started, while a millisecond over a boundary
# (at least 1e-8 of a day's increments) still does.
_SNAP = 1e-12


def points_for(duration: float, billing_increment: float, points_per_increment: int) -> int:
    """The points a call of ``duration`` seconds costs (0 when ``duration <= 0``)."""
    if not billing_increment > 0 or not math.isfinite(billing_increment):
        raise ValueError(f"billing_increment must be a positive number of seconds, got {billing_increment!r}")
    if points_per_increment < 0:
        raise ValueError(f"points_per_increment must not be negative, got {points_per_increment!r}")
    if not math.isfinite(duration):
        raise ValueError(f"a call's duration must be a number of seconds, got {duration!r}")
    if duration <= 0:
        return 0
    increments = duration / billing_increment
    nearest = round(increments)
    if nearest >= 1 and math.isclose(increments, nearest, rel_tol=_SNAP, abs_tol=0.0):
        return int(nearest) * points_per_increment
    return max(1, math.ceil(increments)) * points_per_increment  # max: a quotient that underflowed to 0
