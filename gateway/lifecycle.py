"""The batch lifecycle: statuses (OpenAI's strings) and the transitions allowed between them."""

from __future__ import annotations

VALIDATING, FAILED, IN_PROGRESS, FINALIZING = "validating", "failed", "in_progress", "finalizing"
COMPLETED, EXPIRED, CANCELLING, CANCELLED = "completed", "expired", "cancelling", "cancelled"

STATUSES = (VALIDATING, FAILED, IN_PROGRESS, FINALIZING, COMPLETED, EXPIRED, CANCELLING, CANCELLED)
TERMINAL = frozenset({FAILED, COMPLETED, EXPIRED, CANCELLED})
LIVE = frozenset(STATUSES) - TERMINAL

# to-status -> statuses it may be reached from. Expiry finalizes straight from a running status, so
# a crash mid-expiry leaves a running batch that the expiry loop expires again.
ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    IN_PROGRESS: (VALIDATING,),
    # validation fails a validating batch; a runner that hits a bug or lost input fails any live one
    FAILED: (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING),
    FINALIZING: (IN_PROGRESS,),
    COMPLETED: (FINALIZING,),
    CANCELLING: (VALIDATING, IN_PROGRESS),
    CANCELLED: (CANCELLING,),
    EXPIRED: (VALIDATING, IN_PROGRESS),
}

# the *_at column stamped when a batch enters a status
STAMP = {IN_PROGRESS: "in_progress_at", FAILED: "failed_at", FINALIZING: "finalizing_at",
         COMPLETED: "completed_at", CANCELLING: "cancelling_at", CANCELLED: "cancelled_at",
         EXPIRED: "expired_at"}

# how unfinished requests are reported when a batch ends in this status
UNFINISHED_CODE = {COMPLETED: "batch_incomplete", CANCELLED: "batch_cancelled",
                   EXPIRED: "batch_expired", FAILED: "batch_failed"}


def window_seconds(window: str) -> int:
    """'24h' -> 86400, '30m' -> 1800 (the config validates the shape)."""
    return int(window[:-1]) * (3600 if window[-1] == "h" else 60)
