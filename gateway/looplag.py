"""Event-loop lag: how late the loop runs a callback that was due. Every API answer waits for the
loop, so this is the part of a client's latency that the handlers' own time (the access log's
`duration_ms`) does not show: blocking calls on the loop thread, and the OS not running the thread.

`LoopLagMonitor` sleeps `interval_s` at a time and records the overshoot in a Prometheus histogram
(`samullm_event_loop_lag_seconds`), and the thread CPU time spent during each late wake-up, so that a
stall can be told apart: lag with CPU time = work on the loop; lag without = the thread was waiting
for a core. Stalls over `log_over_s` are logged (with both figures)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram

log = logging.getLogger("samullm.looplag")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LoopLagMonitor:
    def __init__(self, registry: CollectorRegistry, interval_s: float = 0.02,
                 log_over_s: float = 0.25) -> None:
        self.interval_s, self.log_over_s = interval_s, log_over_s
        self.lag = Histogram("samullm_event_loop_lag_seconds",
                             "How late the event loop woke a timer that was due", buckets=BUCKETS,
                             registry=registry)
        self.busy = Counter("samullm_event_loop_stall_cpu_seconds",
                            "Loop-thread CPU time during wake-ups later than 10 ms (work on the "
                            "loop; the rest of the lag was waiting for a core)", registry=registry)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            cpu0 = time.thread_time()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - due)
            cpu = time.thread_time() - cpu0
            self.lag.observe(lag)
            if lag > 0.01:
                self.busy.inc(cpu)
            if lag > self.log_over_s:
                log.warning("event loop %.0f ms late (loop thread ran %.0f ms of CPU meanwhile)",
                            lag * 1000, cpu * 1000, extra={"lag_ms": round(lag * 1000, 1),
                                                          "cpu_ms": round(cpu * 1000, 1)})
