"""The fairness bench's judgement of whether a small batch found its model's engine serving."""

from __future__ import annotations

from bench.fairness import engine_up


def _e(t: float, event: str, slot: int = 2, model: str = "small") -> dict:
    return {"t": t, "event": event, "slot": slot, "model": model}


def test_an_engine_asleep_is_not_serving_and_a_guest_wake_does_not_count() -> None:
    events = [_e(1, "engine_started"), _e(5, "engine_sleep"), _e(9, "engine_guest"),
              _e(10, "engine_sleep", ), _e(20, "engine_wake"), _e(30, "engine_stop")]
    assert engine_up(events, "small", 3)
    assert not engine_up(events, "small", 6)
    assert not engine_up(events, "small", 9.5)  # woken by the batch itself, as a guest
    assert engine_up(events, "small", 25)  # woken into the plan
    assert not engine_up(events, "small", 31)
    assert not engine_up(events, "tiny-a", 3)
