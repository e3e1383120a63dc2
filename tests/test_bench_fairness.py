"""The fairness bench's judgement: whether a small batch found its model's engine serving, each
repeat's verdicts, and the small batches' own work against the big batch's alone run."""

from __future__ import annotations

from bench.fairness_verdict import engine_cores, engine_up, judged, small_work, summary_table


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


def _repeat(big_fair: float, big_alone: float, s0_inside: float, s1_s: float) -> dict:
    """A mix repeat: s0 on `medium` found its engine up (judged inside the gateway), s1 on
    `small` did not (judged by its client's time, plus the model's start allowance)."""
    return {"smalls": [{"name": "s0", "key": "bench-key-team-b", "model": "medium", "at": 1.0},
                       {"name": "s1", "key": "bench-key-team-c", "model": "small", "at": 2.0}],
            "fair": {"big_s": big_fair, "makespan_s": big_fair,
                     "small": {"s0": {"s": 9.0, "inside_s": s0_inside, "model_up": True},
                               "s1": {"s": s1_s, "inside_s": 0.5, "model_up": False}}},
            "fifo": {"big_s": 40.0, "makespan_s": 40.0,
                     "small": {"s0": {"s": 30.0, "inside_s": 29.0, "model_up": True},
                               "s1": {"s": 30.0, "inside_s": 29.0, "model_up": False}}},
            "alone": {"big_s": big_alone, "small": {"s0": 1.0, "s1": 0.5},
                      "inside_s": {"s0": 0.8, "s1": 0.4}, "start_allowance_s": {
                          "medium": 5.0, "small": 4.0},
                      "cores": {"medium": 2, "small": 1}, "big_cores": 2}}


def test_a_repeat_is_judged_per_small_batch_and_against_the_big_and_pool_limits() -> None:
    ok = judged(_repeat(big_fair=41.0, big_alone=40.0, s0_inside=1.6, s1_s=4.9))
    assert ok["small"]["s0"] == {"target_s": 1.6, "met": True}  # 2x 0.8 inside, not 2x 1.0 + 5
    assert ok["small"]["s1"]["target_s"] == 5.0 and ok["small"]["s1"]["met"]  # 2x 0.5 + 4 s
    assert ok["met"] and ok["small_met"] == 2
    late = judged(_repeat(big_fair=42.5, big_alone=40.0, s0_inside=1.7, s1_s=5.1))
    assert late["small_met"] == 0 and not late["met"]
    assert late["big"]["fair"] == 42.5 / 40.0 and late["pool"] == 42.5 / 40.0


def test_the_summary_gives_each_repeat_and_the_medians() -> None:
    reps = [_repeat(41.0, 40.0, 1.6, 4.9), _repeat(42.5, 40.0, 1.7, 5.1),
            _repeat(40.0, 40.0, 1.5, 4.0)]
    rows = summary_table(reps)
    assert rows[2] == ("| 1 | 2 of 2 | 1.02× (1.00×) | 1.025× | 40.0 | +2.5% | yes (≤ 1.075×) "
                       "| yes | – / – / – |")
    assert rows[3].startswith("| 2 | 0 of 2 | 1.06× (1.00×) | 1.062× | 40.0 | +2.5% | yes "
                              "(≤ 1.075×) | no |")
    assert rows[-1] == ("| median | 2 of 2 | 1.02× (1.00×) | 1.025× | 40.0 | +2.5% | 3 of 3 "
                        "| 2 of 3 | – |")
    reps[0]["fair"] |= {"probe_s": 0.053, "probe_during_s": 0.0914}  # a spell after it began
    reps[0]["alone"] |= {"probe_s": 0.052}  # a run from before the samples were taken
    assert summary_table(reps)[2].endswith("| 0.053 (0.091) / – / 0.052 |")


def test_the_small_batches_work_is_their_alone_time_on_their_cores_over_the_big_batchs_run() -> None:
    """s0 alone: 0.8 s inside on medium's two cores, s1 0.4 s on small's one: 2.0 core-seconds
    against the big batch's 40 s on two cores, 2.5 %: a gateway that gives them that work finishes
    the big batch about 2.5 % later unless its alone run left a core idle."""
    rep = _repeat(41.0, 40.0, 1.6, 4.9)
    assert small_work(rep) == (0.8 * 2 + 0.4 * 1) / (2 * 40.0)
    assert judged(rep)["small_work"] == small_work(rep)
    del rep["alone"]["cores"]  # a run from before the cores were recorded
    assert small_work(rep) is None
    events = [{"t": 1, "event": "engine_started", "model": "medium", "devices": [0]},
              {"t": 2, "event": "engine_started", "model": "medium", "devices": [1]},
              {"t": 3, "event": "engine_started", "model": "medium", "devices": [0]},
              {"t": 4, "event": "engine_sleep", "model": "small", "devices": [1]},
              {"t": 5, "event": "engine_started", "model": "small", "devices": [1]}]
    assert engine_cores(events) == {"medium": {0, 1}, "small": {1}}


def test_the_big_batch_is_also_judged_against_alone_plus_the_small_batches_work() -> None:
    """The issue's 5 % cannot hold where the small batches' own work is more than that (it is
    marked blocked on it): beside it, the big batch is judged against alone + that work + 5 %,
    the target proposed there. Here the work is 2.5 % of the alone run: 1.075x."""
    close = judged(_repeat(big_fair=42.5, big_alone=40.0, s0_inside=1.6, s1_s=4.9))
    assert close["big"]["fair"] > 1.05 and not close["met"]  # the target: missed
    assert close["big_with_work"] == {"limit": 1.05 + 0.025, "met": True}
    late = judged(_repeat(big_fair=44.0, big_alone=40.0, s0_inside=1.6, s1_s=4.9))
    assert late["big_with_work"]["met"] is False
    unknown = _repeat(41.0, 40.0, 1.6, 4.9)
    del unknown["alone"]["cores"]
    assert judged(unknown)["big_with_work"] is None
    assert summary_table([unknown])[2].split(" | ")[6] == "–"
