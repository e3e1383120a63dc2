"""What the gateway holds in memory of a batch that has a runner (`gateway.batches`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gateway.finalize import Counts
from gateway.journal import Journal
from runtime.executor_api import Outcome, WorkItem


@dataclass
class LiveBatch:
    """In-memory state of a batch that has a runner."""

    batch_id: str
    counts: Counts | None = None
    done: set[str] = field(default_factory=set)
    journal: Journal | None = None
    end_reason: str | None = None  # `lifecycle` CANCELLED or EXPIRED once asked to stop early
    submitted: bool = False
    stop_task: asyncio.Task[None] | None = None
    runner: asyncio.Task[None] | None = None
    # the validated requests (finalizing from them reads the input file no second time)
    items: list[WorkItem] | None = None
    # the journal as loaded when the batch resumed (read once, not again to submit)
    resumed: list[Outcome] | None = None
