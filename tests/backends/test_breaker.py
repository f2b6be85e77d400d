"""The circuit breaker's verdicts: every call it let through ends in one, whatever way
the call ends (issue 17 item 9)."""

from __future__ import annotations

import time

import pytest

from embedpipe.backends.breaker import Breaker


def _half_open() -> Breaker:
    breaker = Breaker(failures=1, cooldown_s=0.01)
    breaker.record(ok=False)
    time.sleep(0.02)
    assert breaker.allow() and breaker.state == "half_open"  # this call is the probe
    assert not breaker.allow()  # only one
    return breaker


@pytest.mark.parametrize("verdict, state", [(False, "open"), (True, "closed")])
def test_a_failed_probe_is_judged(verdict: bool, state: str) -> None:
    breaker = _half_open()
    with pytest.raises(ValueError), breaker.attempt(lambda exc: verdict):
        raise ValueError("the endpoint's answer")
    assert breaker.state == state


@pytest.mark.parametrize("exc", [ValueError("not the endpoint's doing"), GeneratorExit(),
                                 KeyboardInterrupt()])
def test_a_probe_that_proved_nothing_lets_the_next_call_probe(exc: BaseException) -> None:
    breaker = _half_open()
    with pytest.raises(type(exc)), breaker.attempt(lambda _: None):
        raise exc
    assert breaker.state == "half_open" and breaker.allow()  # not jammed


def test_a_return_closes_the_breaker() -> None:
    breaker = _half_open()
    with breaker.attempt(lambda _: False):
        pass
    assert breaker.state == "closed" and breaker.snapshot()["consecutive_failures"] == 0
