"""What a gateway learns while it serves, kept under its state dir across restarts.

- Output lengths (`LengthModel`): each finished request's tokens, censored when it hit its cap;
  and its prompt as the engine counted it, which corrects validation's estimates.
- Engine starts per (model, TP): each measured start, stored as the start alone (the planner
  multiplies it by the contention factor again) and in a spare process, blended with the earlier.
- An engine's stop, blended likewise: starts wait for their stage's stops.
- Served requests per engine shape and the online calibration fitted to them (`scheduler.online`):
  refitted before every plan, in a thread (a fit replays its shape's window of served requests).

All three are saved at each pass (`save`), best effort and only when something new was learned:
a full disk must not stop a pass, and most passes learn nothing new (no rewrite, no fsync).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Hashable, Mapping, Sequence

from runtime.config import Config
from runtime.endpoints import EMBEDDINGS
from runtime.executor.planning import refit_calibration
from runtime.executor.pool_state import Req
from runtime.executor_api import Outcome
from runtime.persist import (blend, load_calibration, load_length_model, load_start_times,
                             load_stop_time, save_calibration, save_length_model,
                             save_start_times, save_stop_time, start_times_file, stop_time_file)
from runtime.usage import hit_length_cap, usage_of
from scheduler.served import Pending, ShapeKey
from scheduler.types import DevicePool, ModelSpec

log = logging.getLogger(__name__)


class Learned:
    """The learned state of one gateway (see the module docstring)."""

    def __init__(self, cfg: Config, state_dir: Path) -> None:
        self.cfg = cfg
        self.state_dir = state_dir
        self.lengths = load_length_model(state_dir)
        self.start_file = start_times_file(cfg.cluster.backend)
        self.start_times = load_start_times(state_dir, self.start_file)
        self.stop_file = stop_time_file(cfg.cluster.backend)
        # an engine's stop as measured (smoothed); None: none yet (`planning.plan_problem`)
        self.stop_s = load_stop_time(state_dir, self.stop_file)
        self.served, self.fits = load_calibration(state_dir, cfg.scheduler.calibration_window)
        self._saved = self._state()

    def observe(self, req: Req, outcome: Outcome) -> None:
        """Feed a finished request's output length to the length model (censored when capped),
        and its prompt as the engine counted it against validation's estimate."""
        usage = usage_of(outcome.response_body)
        if usage.prompt:  # upstream outputs in its prompt were counted, not estimated
            self.lengths.observe_prompt(req.model, req.item.url, req.item.prompt_tokens,
                                        usage.prompt - req.known_tokens)
        if req.item.url == EMBEDDINGS:
            return
        tokens = usage.output
        if tokens is None:
            return
        capped = hit_length_cap(outcome.response_body)
        per_choice = max(1, round(tokens / len(capped)))
        for cap in capped:
            self.lengths.observe(req.model, req.item.url, per_choice, cap)

    def engine_started(self, key: tuple[str, int, int], alone_s: float) -> None:
        """An engine of `key` (model, TP, cores per rank) started in `alone_s` alone, in a spare
        process."""
        self.start_times[key] = blend(self.start_times.get(key), alone_s)

    def engine_stopped(self, seconds: float) -> None:
        """An engine took `seconds` to stop (SIGTERM to reaped)."""
        self.stop_s = blend(self.stop_s, seconds)

    async def calibrate(self, pool: DevicePool, specs: Mapping[str, ModelSpec],
                        pending: Mapping[tuple[ShapeKey, Hashable], Sequence[Pending]]) -> None:
        """Refit the latency corrections to the requests served since the last pass; `pending`:
        the requests in flight per (shape, engine run), which shared the last answers' steps."""
        if not self.cfg.scheduler.online_calibration:
            return
        self.fits = await asyncio.to_thread(refit_calibration, self.cfg, pool, specs,
                                            self.state_dir, self.served.snapshot(pending),
                                            self.fits)

    def _state(self) -> tuple:
        return (self.lengths.to_dict(), dict(self.start_times), self.served.version,
                dict(self.fits), self.stop_s)

    async def save(self) -> None:
        """Lengths, start and stop times and calibration, when something new was learned (best
        effort: kept in memory and saved again at the next pass when the disk refuses)."""
        state = self._state()
        if state == self._saved:
            return
        try:
            await asyncio.to_thread(save_length_model, self.state_dir, self.lengths)
            await asyncio.to_thread(save_start_times, self.state_dir, state[1], self.start_file)
            if state[4] is not None and state[4] != self._saved[4]:
                await asyncio.to_thread(save_stop_time, self.state_dir, state[4], self.stop_file)
            if state[2:4] != self._saved[2:4]:
                await asyncio.to_thread(save_calibration, self.state_dir,
                                        self.served.snapshot(), state[3])
        except OSError as exc:
            log.warning("could not save learned lengths/start and stop times/calibration (%s); "
                        "kept in memory", exc)
            return
        self._saved = state
