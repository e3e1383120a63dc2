"""How fast this machine runs a fixed pure-Python loop: before a scene, and all through it.

The benches compare scenes run minutes apart on a shared 2-core machine whose speed drifts: the
loop took 0.051-0.053 s on a steady machine and 0.089-0.107 s in slow spells (6 Dec 2026). A
probe before a scene does not catch a spell that starts after it: in repeat 1 of the fairness mix
of 6 Dec 07:13 the probe before the fair scene read 0.053 s, and by 20 s into it tiny-a's engine
had run 2.06x its profile (1.28x in the next repeat). So `ProbeSampler` also times the loop every
few seconds in a child process while a scene runs (about 1 % of one core: 0.05 s every 5 s), and
the bench reports the median of those samples beside the probe before (`loop_s`: what they
compare with).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LOOP = 1_000_000  # iterations of the probe loop: ~0.05 s on this machine when steady
SAMPLE_EVERY_S = 5.0  # between the samples taken while a scene runs


def loop_s(n: int = LOOP) -> float:
    """CPU seconds the probe loop takes once (its time on an idle machine; on a busy one, the
    time-sharing of its core left out). A busy machine runs it slower per CPU second too: 0.056-
    0.080 s beside three busy processes at nice 5 against 0.053 s idle, and 0.068-0.090 s (wall
    time) in the scenes of the fairness mix of 6 Dec 07:32, whose probe before read 0.051-0.063 s.
    So compare the samples of scenes alike in load (fair, arrival order, alone), not a sample
    with the probe before."""
    t0 = time.process_time()
    acc = 0
    for i in range(n):
        acc += i * i
    return time.process_time() - t0


def machine_probe_s(repeats: int = 3) -> float:
    """The least of `repeats` probe loops, taken before a scene. It catches a machine whose CPU is
    taken, not everything that slows the engines: on 6 Dec 2026 the big batch of `bench.fairness
    --mix` alone took 37.0 s and 45.8 s on one plan with the probe at 0.052-0.053 s both times, so
    compare repeats' medians, not one run (and see `ProbeSampler`)."""
    return min(loop_s() for _ in range(repeats))


def sample_forever(every_s: float) -> None:
    """The sampler child: a probe loop every `every_s`, each time on a line of its own."""
    while True:
        time.sleep(every_s)
        print(f"{loop_s():.5f}", flush=True)


class ProbeSampler:
    """Probe loops every `every_s` in a child process between `__enter__` and `__exit__`
    (`summary`: their median and slowest)."""

    def __init__(self, every_s: float = SAMPLE_EVERY_S) -> None:
        self.every_s = every_s
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "ProbeSampler":
        code = f"from bench.probe import sample_forever; sample_forever({self.every_s!r})"
        self._proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._proc is not None
        self._proc.terminate()  # a loop in progress is cut short, never printed
        out, _ = self._proc.communicate(timeout=10)
        self.samples = [float(x) for x in out.split()]

    def summary(self) -> dict[str, float | int]:
        """`probe_during_s` (median) and `probe_during_max_s` of the samples, and their count."""
        if not self.samples:
            return {"probe_samples": 0}
        return {"probe_during_s": statistics.median(self.samples),
                "probe_during_max_s": max(self.samples),
                "probe_samples": len(self.samples)}
