"""The call's limits in time: the call's length (``max_duration`` and the
wrap-up warning before it) and the caller's silence (the prompt, then the
end).

Each timer delivers a fact to the machine (``time_up``, ``wrap_up_due``,
``silence_prompt_due``, ``silence_timeout``) through the call's ``post``;
the machine decides what it means in the state the call is in.
"""

from __future__ import annotations

from typing import Any, Callable

from upvoot.call.inputs import CallInputs


class CallLimits:
    """``max_duration`` and the wrap-up warning before it, from ``start``
    until ``cancel``."""

    def __init__(self, clock: Any, config: Any, post: Callable[..., None]) -> None:
        self._clock = clock
        self._config = config
        self._post = post
        self._timers: list = []

    def start(self) -> None:
        cfg = self._config
        self._timers.append(self._clock.callLater(cfg.max_duration, self._post, CallInputs.time_up))
        if cfg.wrap_up_warning and cfg.wrap_up_before:
            self._timers.append(self._clock.callLater(cfg.max_duration - cfg.wrap_up_before, self._post,
                                                      CallInputs.wrap_up_due))

    def cancel(self) -> None:
        for t in self._timers:
            if t.active():
                t.cancel()
        self._timers.clear()


class SilenceClock:
    """Since when the caller has been silent, as far as the limits count:
    from the moment the agent's last audio finished *playing* (not when its
    last byte was sent). The silence prompt does not restart the clock, it
    only marks that it was said."""

    def __init__(self, now: float) -> None:
        self.since = now
        self.prompted = False

    def agent_finished(self, now: float, was_prompt: bool) -> None:
        if was_prompt:
            self.prompted = True
        else:
            self.since = now
            self.prompted = False


class Listening:
    """State data of ``listening``: the silence timers, counted on the
    ``SilenceClock``; ``cancel`` when the state is left."""

    def __init__(self, clock: Any, config: Any, silence: SilenceClock, post: Callable[..., None]) -> None:
        now = clock.seconds()
        self._timers = []
        if config.silence_prompt and config.silence_prompt_after and not silence.prompted:
            self._timers.append(clock.callLater(max(0.0, silence.since + config.silence_prompt_after - now),
                                                post, CallInputs.silence_prompt_due))
        self._timers.append(clock.callLater(max(0.0, silence.since + config.silence_timeout - now),
                                            post, CallInputs.silence_timeout))

    def cancel(self) -> None:
        for t in self._timers:
            if t.active():
                t.cancel()
