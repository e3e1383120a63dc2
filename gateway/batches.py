"""Batch orchestration: create, validate, hand to the executor, journal outcomes, finalize, cancel,
expire, and resume after a restart.

One runner task per live batch drives it through the lifecycle (`gateway.lifecycle`). Cancel and
expiry never finalize themselves: they mark the batch's `end_reason`, ask the executor to stop it, and
the runner (once `Executor.wait` returns) writes the files. The journal (`gateway.journal`) is the truth
for progress: live `request_counts` are rebuilt from it on resume and only journaled requests are not
re-run.

Every batch reaches a terminal state. A full disk (ENOSPC, SQLite's "disk is full") stops a runner
only for a while: it drives the batch again from what is durable, as a restart would, with backoff,
until space returns (meanwhile the executor holds outcomes it cannot journal). Any other exception in
a runner, or an input file gone from disk, fails the batch with an error saying so, and writes what
the journal holds to its output and error files.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, Callable

from gateway import lifecycle as lc
from gateway.db import Database
from gateway.errors import disk_full
from gateway.filestore import FileStore
from gateway.finalize import Counts, journaled_requests, write_result_files
from gateway.ids import new_batch_id
from gateway.journal import Journal, journal_path, load
from gateway.live import LiveBatch
from gateway.lines import input_requests
from gateway.metrics import GatewayMetrics
from gateway.tokens import TokenCounter
from gateway.validation import ValidationResult, validate_file
from runtime.config import Config
from runtime.executor_api import Executor, Outcome, WorkItem

log = logging.getLogger("samullm.batches")
RETRY_S = (1.0, 30.0)  # first and longest wait before a runner stopped by a full disk tries again


class InputMissing(Exception):
    """The batch's stored input file is gone from disk (deleted outside the API, a lost volume)."""


class QueueFull(Exception):
    """A create that would take its owner past `[limits].max_queued_requests_per_key`."""

    def __init__(self, limit: int, queued: int, new: int) -> None:
        super().__init__(f"{queued} queued + {new} new > {limit}")
        self.limit, self.queued, self.new = limit, queued, new


class BatchService:
    def __init__(self, cfg: Config, db: Database, store: FileStore, executor: Executor,
                 metrics: GatewayMetrics, clock: Callable[[], float] = time.time,
                 on_live: Callable[[int], None] | None = None) -> None:
        self.cfg, self.db, self.store, self.executor = cfg, db, store, executor
        self.metrics, self.clock = metrics, clock
        # told the number of live batches (validating included) whenever it changes
        self.on_live = on_live or (lambda n: None)
        self.tokens = TokenCounter(cfg)
        self.live: dict[str, LiveBatch] = {}
        self.closing = False
        self.journals_dir = cfg.state_dir / "journals"

    def now(self) -> int:
        return int(self.clock())

    # --- API operations ----------------------------------------------------------------------------
    def create(self, owner: str, input_file_id: str, endpoint: str, window: str,
               metadata: dict[str, str] | None, strategy: str | None,
               lines: int | None = None) -> dict[str, Any]:
        """`lines`, the input's requests (given under a queue limit): QueueFull if the owner's queue
        lacks room. No await between check and insert: concurrent creates are checked in turn."""
        now = self.now()
        row = {"id": new_batch_id(), "owner": owner, "endpoint": endpoint,
               "input_file_id": input_file_id, "completion_window": window,
               "status": lc.VALIDATING, "created_at": now,
               "expires_at": now + lc.window_seconds(window), "metadata": metadata,
               "strategy": strategy, "request_counts": {"total": 0, "completed": 0, "failed": 0},
               "model_request_counts": {}, "input_lines": lines}
        limit = self.cfg.limits.max_queued_requests_per_key
        with self.db.tx():
            if limit and lines is not None:
                queued = self.queued_requests(owner)
                if queued + lines > limit:
                    raise QueueFull(limit, queued, lines)
            self.db.insert_batch(row)
        self._start_runner(row["id"])
        return self.db.get_batch(row["id"])

    def queued_requests(self, owner: str) -> int:
        """Unfinished requests of the owner's live batches (live counts, else stored ones); a batch
        not validated yet counts its input's lines (0 if created without a limit configured)."""
        queued = 0
        for row in self.db.owner_batches_in(owner, lc.LIVE):
            live = self.live.get(row["id"])
            rc = live.counts.request_counts() if live is not None and live.counts is not None \
                else row["request_counts"]
            queued += rc["total"] - rc["completed"] - rc["failed"] if rc["total"] \
                else row["input_lines"] or 0
        return queued

    def cancel(self, batch_id: str, owner: str) -> dict[str, Any] | None:
        """Start cancelling; returns the batch, or None when its status does not allow it."""
        row = self.db.get_batch(batch_id, owner)
        if row["status"] in (lc.CANCELLING, lc.CANCELLED):
            return row
        live = self.live.get(batch_id)
        if live is None or live.end_reason is not None:  # finished, or expiring right now
            return None
        if not self.db.transition(batch_id, lc.ALLOWED_FROM[lc.CANCELLING], lc.CANCELLING,
                                  cancelling_at=self.now()):
            return None
        self._stop(live, lc.CANCELLED)
        return self.db.get_batch(batch_id)

    def expire_due(self) -> list[str]:
        """Ask every running batch past its `expires_at` to stop; the runner writes `expired`."""
        now, hit = self.now(), []
        for row in self.db.batches_in((lc.VALIDATING, lc.IN_PROGRESS)):
            live = self.live.get(row["id"])
            if row["expires_at"] is not None and row["expires_at"] <= now and live is not None \
                    and live.end_reason is None:
                self._stop(live, lc.EXPIRED)
                hit.append(row["id"])
        return hit

    def view(self, row: dict[str, Any]) -> dict[str, Any]:
        """The OpenAI `Batch` object, counts live while running, plus `model_request_counts` and
        `estimated_completion_at` (the latest plan's, `gateway.events`; null once it ended)."""
        live = self.live.get(row["id"])
        counts, per_model, usage = row["request_counts"], row["model_request_counts"], row["usage"]
        if live is not None and live.counts is not None and row["status"] not in lc.TERMINAL:
            counts, per_model = live.counts.request_counts(), live.counts.per_model
            usage = live.counts.usage()
        out = {"id": row["id"], "object": "batch", "endpoint": row["endpoint"],
               "model": row["model"], "errors": row["errors"], "input_file_id": row["input_file_id"],
               "completion_window": row["completion_window"], "status": row["status"],
               "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
               "created_at": row["created_at"], "expires_at": row["expires_at"]}
        out.update({k: row[k] for k in lc.STAMP.values()})
        eta = None if row["status"] in lc.TERMINAL else row["estimated_completion_at"]
        return out | {"request_counts": counts, "metadata": row["metadata"], "usage": usage,
                      "model_request_counts": per_model, "estimated_completion_at": eta}

    def queue_depth(self) -> int:
        """Requests handed to the executor and not finished yet, over all batches."""
        return sum(lv.counts.total - lv.counts.completed - lv.counts.failed
                   for lv in self.live.values() if lv.submitted and lv.counts is not None)

    # --- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume every live batch: re-validate, re-submit what the journal lacks, re-finalize."""
        for row in self.db.batches_in(lc.LIVE):
            log.info("resuming batch %s (%s)", row["id"], row["status"])
            self._start_runner(row["id"])

    async def close(self) -> None:
        """Stop runners, then close the executor (aborting in-flight requests; outcomes that still
        arrive are journaled), then flush and close the journals. Runners stop first so that a
        `wait` returning because of the shutdown never finalizes a half-run batch: every batch keeps
        its status and the next start resumes it."""
        self.closing = True
        tasks = [lv.runner for lv in self.live.values() if lv.runner is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.executor.close()
        for lv in list(self.live.values()):
            if lv.journal is not None:
                await lv.journal.close()
        self.live.clear()

    def _start_runner(self, batch_id: str) -> None:
        live = self.live.setdefault(batch_id, LiveBatch(batch_id))
        live.runner = asyncio.create_task(self._run(live), name=f"batch-{batch_id}")
        self.on_live(len(self.live))

    def _stop(self, live: LiveBatch, reason: str) -> None:
        live.end_reason = reason
        if live.submitted:
            live.stop_task = asyncio.create_task(self.executor.cancel(live.batch_id))

    async def _run(self, live: LiveBatch) -> None:
        wait = RETRY_S[0]
        while True:
            try:
                await self._drive(live)
                break
            except asyncio.CancelledError:
                raise  # shutdown: the batch keeps its status and resumes on the next start
            except Exception as exc:
                if self.closing:
                    return
                if disk_full(exc):
                    log.error("batch %s: out of disk space (%s); trying again in %.0f s",
                              live.batch_id, exc, wait)
                    await self._reset(live)
                    await asyncio.sleep(wait)
                    wait = min(RETRY_S[1], wait * 2)
                    continue
                if isinstance(exc, InputMissing):
                    log.error("batch %s: %s", live.batch_id, exc)
                    code, message = "input_file_missing", str(exc)
                else:
                    log.exception("batch %s: runner failed", live.batch_id)
                    code = "internal_error"
                    message = f"The batch failed on the server: {type(exc).__name__}: {exc}"
                await self._fail(live, code, message)
                break
        if self.closing:
            return
        if live.journal is not None:
            await live.journal.close()
        self.live.pop(live.batch_id, None)
        self.on_live(len(self.live))

    async def _reset(self, live: LiveBatch) -> None:
        """Forget what a failed drive held in memory; the next drive starts from what is durable."""
        if live.journal is not None:
            await live.journal.close()
        live.journal, live.done, live.submitted, live.stop_task = None, set(), False, None
        live.items = live.resumed = None

    async def _fail(self, live: LiveBatch, code: str, message: str) -> None:
        """Stop the batch's requests, then end it `failed` with `message`, writing what its journal
        holds; if even that fails, end it failed without files (never a batch stuck live)."""
        bid = live.batch_id
        errors = {"object": "list",
                  "data": [{"code": code, "message": message, "param": None, "line": None}]}
        try:
            if live.submitted:
                await self.executor.cancel(bid)
            if live.journal is not None:
                await live.journal.close()
            await self._finalize(live, lc.FAILED, errors=errors)
        except Exception:
            log.exception("batch %s: could not write its files; failing it without them", bid)
            self.db.transition(bid, lc.ALLOWED_FROM[lc.FAILED], lc.FAILED, failed_at=self.now(),
                               errors=errors)

    async def _drive(self, live: LiveBatch) -> None:
        bid = live.batch_id
        row = self.db.get_batch(bid)
        if not self.store.path(row["input_file_id"]).is_file():
            raise InputMissing(f"The input file {row['input_file_id']} is missing from the "
                               "server's storage; the batch cannot run. Results journaled before "
                               "it went missing are in the output and error files.")
        if row["status"] == lc.FINALIZING:
            await self._finalize(live, lc.COMPLETED)
            return
        if row["status"] == lc.CANCELLING:
            live.end_reason = lc.CANCELLED
        if row["status"] != lc.VALIDATING:  # resuming: show journaled progress while re-validating
            counts = Counts.of_totals({m: c["total"] for m, c in row["model_request_counts"].items()})
            live.resumed = await asyncio.to_thread(load, journal_path(self.cfg.state_dir, bid))
            for o in live.resumed:
                if o.model in counts.per_model:  # a preview; _execute counts by custom_id
                    counts.add(o)
            live.counts = counts
        result = await asyncio.to_thread(
            validate_file, self.store.path(row["input_file_id"]), row["endpoint"], self.cfg,
            self.tokens)
        if row["status"] == lc.VALIDATING and not await self._accept(live, result):
            return
        live.items = result.items
        await self._execute(live, row, result)
        if self.closing:  # the executor stopped because we are shutting down: resume later
            return
        if live.stop_task is not None:
            await live.stop_task
        if live.journal is not None:
            await live.journal.close()  # every outcome durable before the files are built
        if live.end_reason is not None:
            await self._finalize(live, live.end_reason)
        elif self.db.transition(bid, lc.ALLOWED_FROM[lc.FINALIZING], lc.FINALIZING,
                                finalizing_at=self.now()):
            await self._finalize(live, lc.COMPLETED)

    async def _accept(self, live: LiveBatch, result: ValidationResult) -> bool:
        """validating -> in_progress or failed. False when the batch does not go on running."""
        bid, now = live.batch_id, self.now()
        if live.end_reason is not None and not result.ok:  # cancelled/expired while validating
            self.db.transition(bid, lc.ALLOWED_FROM[live.end_reason], live.end_reason,
                               **{lc.STAMP[live.end_reason]: now})
            return False
        if not result.ok:
            self.db.transition(bid, lc.ALLOWED_FROM[lc.FAILED], lc.FAILED, failed_at=now,
                               errors={"object": "list", "data": result.errors})
            return False
        totals = Counter(it.model for it in result.items)
        counts = Counts.of_totals(dict(totals))
        models = result.models
        fields = {"model": models[0] if len(models) == 1 else None,
                  "request_counts": counts.request_counts(),
                  "model_request_counts": counts.per_model}
        if not self.db.transition(bid, lc.ALLOWED_FROM[lc.IN_PROGRESS], lc.IN_PROGRESS,
                                  in_progress_at=now, **fields):
            self.db.update_batch(bid, **fields)  # cancelled meanwhile: still record the totals
        return True

    async def _execute(self, live: LiveBatch, row: dict[str, Any], result: ValidationResult) -> None:
        bid = live.batch_id
        path = journal_path(self.cfg.state_dir, bid)
        done = live.resumed if live.resumed is not None else await asyncio.to_thread(load, path)
        live.resumed = None
        live.counts = Counts.of_totals(dict(Counter(it.model for it in result.items)))
        ids = {it.custom_id for it in result.items}
        strangers = 0
        for o in done:
            if o.custom_id not in ids:  # never counted: `completed` must not exceed `total`
                strangers += 1
                continue
            live.counts.add(o)
            live.done.add(o.custom_id)
        if strangers:
            log.warning("batch %s: %d journal record(s) name a custom_id the batch does not have; "
                        "ignored", bid, strangers)
        live.journal = Journal(path)
        if row["expires_at"] is not None and row["expires_at"] <= self.now() \
                and live.end_reason is None:
            live.end_reason = lc.EXPIRED
        pending = [it for it in result.items if it.custom_id not in live.done]
        if live.end_reason is not None or not pending:
            return
        # upstream results of pending dependents come from the journal (never run twice)
        needed = {cid for it in pending for cid in it.depends_on if cid in live.done}
        known = {o.custom_id: o for o in done if o.custom_id in needed}
        live.submitted = True
        self.executor.submit(bid, pending, self._sink(live), row["strategy"], known=known,
                             deadline_at=row["expires_at"])
        await self.executor.wait(bid)

    def _sink(self, live: LiveBatch) -> Callable[[Outcome], Any]:
        async def sink(o: Outcome) -> None:
            if o.custom_id in live.done:  # a retry reported twice: the first outcome stands
                return
            live.done.add(o.custom_id)
            assert live.journal is not None and live.counts is not None
            try:
                await live.journal.append(o)
            except BaseException:
                live.done.discard(o.custom_id)
                raise
            live.counts.add(o)
            self.metrics.observe_outcome(o)
        return sink

    async def _finalize(self, live: LiveBatch, to: str,
                        errors: dict[str, Any] | None = None) -> None:
        bid = live.batch_id
        row = self.db.get_batch(bid)
        input_path = self.store.path(row["input_file_id"])
        outcomes = await asyncio.to_thread(load, journal_path(self.cfg.state_dir, bid))

        if live.items is not None:  # validated in this drive: no need to read the input again
            requests: Any = ((it.line, it.custom_id, it.model) for it in live.items)
        elif input_path.is_file():  # resumed while finalizing
            requests = input_requests(input_path)
        else:
            requests = journaled_requests(outcomes)
        files = await asyncio.to_thread(write_result_files, self.store, bid, requests, outcomes,
                                        lc.UNFINISHED_CODE[to])
        counts = files.counts
        now = self.now()
        extra = {"errors": errors} if errors is not None else {}
        with self.db.tx():
            for fid, size, kind in ((files.output_file_id, files.output_bytes, "output"),
                                    (files.error_file_id, files.error_bytes, "error")):
                if fid is not None:
                    self.db.insert_file({"id": fid, "owner": row["owner"], "bytes": size,
                                         "created_at": now, "filename": f"{bid}_{kind}.jsonl",
                                         "purpose": "batch_output", "batch_id": bid})
            moved = self.db.transition(
                bid, lc.ALLOWED_FROM[to], to, **{lc.STAMP[to]: now},
                output_file_id=files.output_file_id, error_file_id=files.error_file_id,
                request_counts=counts.request_counts(), model_request_counts=counts.per_model,
                usage=counts.usage(), **extra)
        if moved:
            self.metrics.observe_final(to, counts)
        log.info("batch %s %s: %d output lines, %d error lines", bid, to if moved else "unchanged",
                 files.output_lines, files.error_lines)

