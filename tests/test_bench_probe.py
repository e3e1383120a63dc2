"""The machine probe of the benches: timed before a scene and sampled all through it."""

from __future__ import annotations

import time

from bench.probe import ProbeSampler, loop_s, machine_probe_s


def test_the_sampler_times_the_probe_loop_in_a_child_while_the_scene_runs() -> None:
    with ProbeSampler(every_s=0.05) as during:
        time.sleep(1.5)  # the child imports, then a sample every 0.05 s plus the loop
    assert len(during.samples) >= 2 and all(0 < s < 5 for s in during.samples)
    got = during.summary()
    assert got["probe_samples"] == len(during.samples)
    assert min(during.samples) <= got["probe_during_s"] <= got["probe_during_max_s"]
    assert got["probe_during_max_s"] == max(during.samples)
    assert during._proc.poll() is not None  # the child is gone


def test_a_scene_shorter_than_one_interval_has_no_samples() -> None:
    with ProbeSampler(every_s=60.0) as during:
        pass
    assert during.samples == [] and during.summary() == {"probe_samples": 0}


def test_the_probe_before_a_scene_is_the_least_of_its_loops() -> None:
    assert 0 < machine_probe_s(repeats=2) < 5 and 0 < loop_s(1000) < loop_s()
