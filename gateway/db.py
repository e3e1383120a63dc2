"""SQLite (WAL) metadata store for files and batches.

Rows are plain dicts with JSON columns decoded. Storage raises its own exceptions (`NotFound`,
`Conflict`); the HTTP layer maps them. Listing is ordered by an insertion sequence (`seq`), so the
`after` cursor is stable even when many objects share a `created_at` second. Status changes go through
`transition`, a compare-and-set on the current status, so two tasks can never both move a batch.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import orjson


class StoreError(Exception):
    pass


class NotFound(StoreError):
    def __init__(self, kind: str, obj_id: str) -> None:
        super().__init__(f"no such {kind}: {obj_id}")
        self.kind, self.obj_id = kind, obj_id


class Conflict(StoreError):
    pass


# Schema versions: index i holds the statements that move a database from version i to i+1.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE files (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL, bytes INTEGER NOT NULL,
            created_at INTEGER NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
            batch_id TEXT)""",
        "CREATE INDEX files_owner ON files(owner, seq)",
        """CREATE TABLE batches (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL, endpoint TEXT NOT NULL,
            input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL, status TEXT NOT NULL,
            created_at INTEGER NOT NULL, expires_at INTEGER,
            in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER,
            failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
            output_file_id TEXT, error_file_id TEXT, model TEXT,
            errors TEXT, metadata TEXT, strategy TEXT,
            request_counts TEXT NOT NULL, model_request_counts TEXT NOT NULL, usage TEXT)""",
        "CREATE INDEX batches_owner ON batches(owner, seq)",
        "CREATE INDEX batches_status ON batches(status)",
    ],
    [  # non-blank lines of the input file, counted at create: the per-key queue limit's count of
        # a batch whose requests are not validated yet (NULL: created with no limit configured)
        "ALTER TABLE batches ADD COLUMN input_lines INTEGER",
        "CREATE INDEX batches_owner_status ON batches(owner, status)",
    ],
    [  # the webhook outbox (gateway.outbox): one row per (event, endpoint), written in the
        # transaction of the status change that causes the event; `webhook_id` is the
        # `webhook-id` header of every attempt, `payload` the exact body (signed anew each time)
        """CREATE TABLE webhook_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            webhook_id TEXT UNIQUE NOT NULL, url TEXT NOT NULL, event_type TEXT NOT NULL,
            batch_id TEXT NOT NULL, payload BLOB NOT NULL, enqueued_at REAL NOT NULL,
            state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL, last_error TEXT, delivered_at REAL)""",
        "CREATE INDEX webhook_outbox_due ON webhook_outbox(state, next_attempt_at)",
    ],
    [  # each batch's events as the executor reported them (gateway.events: at most
        # MAX_EVENTS_PER_BATCH a batch), and the latest plan's predicted completion (unix s)
        """CREATE TABLE batch_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT UNIQUE NOT NULL, batch_id TEXT NOT NULL, created_at INTEGER NOT NULL,
            type TEXT NOT NULL, data BLOB NOT NULL)""",
        "CREATE INDEX batch_events_batch ON batch_events(batch_id, seq)",
        "ALTER TABLE batches ADD COLUMN estimated_completion_at INTEGER",
    ],
    [  # file expiry (gateway.file_expiry): when a file expires (NULL: never), and the seconds a
        # batch's output and error files live after they are written (output_expires_after)
        "ALTER TABLE files ADD COLUMN expires_at INTEGER",
        "CREATE INDEX files_expires ON files(expires_at) WHERE expires_at IS NOT NULL",
        "ALTER TABLE batches ADD COLUMN output_expires_after INTEGER",
    ],
]

_LIVE_FILE = " AND (expires_at IS NULL OR expires_at > ?)"  # not expired by `now`
_JSON_COLS = ("errors", "metadata", "request_counts", "model_request_counts", "usage")


def _row(r: sqlite3.Row | None) -> dict[str, Any] | None:
    if r is None:
        return None
    d = dict(r)
    for col in _JSON_COLS:
        if col in d and d[col] is not None:
            d[col] = orjson.loads(d[col])  # every listed batch decodes five of these
    return d


class Database:
    """One connection, used from the event loop thread (statements are small and local)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # called inside `transition`'s savepoint once a batch moved, with (batch id, new status,
        # the fields written): what they write commits or rolls back with the status change
        self.on_transition: list[Callable[[str, str, dict[str, Any]], None]] = []
        self._migrate()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        for i in range(version, len(MIGRATIONS)):
            with self.tx():
                for stmt in MIGRATIONS[i]:
                    self._db.execute(stmt)
                self._db.execute(f"PRAGMA user_version = {i + 1}")

    def close(self) -> None:
        self._db.close()

    def tx(self) -> "_Tx":
        return _Tx(self._db)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        """A statement on this connection, for a table another module owns (the webhook outbox)."""
        return self._db.execute(sql, args)

    # --- files -----------------------------------------------------------------------------------
    def insert_file(self, row: dict[str, Any]) -> None:
        """A batch's output or error file (`batch_id` set) without an `expires_at` expires its
        batch's `output_expires_after` seconds after `created_at` (never when that is NULL)."""
        cols = ("id", "owner", "bytes", "created_at", "filename", "purpose", "batch_id",
                "expires_at")
        args = [row.get(c) for c in cols]
        if row.get("expires_at") is None and row.get("batch_id") is not None:
            r = self._db.execute("SELECT output_expires_after FROM batches WHERE id = ?",
                                 (row["batch_id"],)).fetchone()
            if r is not None and r[0] is not None:
                args[-1] = row["created_at"] + r[0]
        self._db.execute(
            f"INSERT OR REPLACE INTO files ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            args)

    def get_file(self, file_id: str, owner: str, now: int | None = None) -> dict[str, Any]:
        """With `now`, a file expired by then is not found (it reads as deleted)."""
        sql, args = "SELECT * FROM files WHERE id = ? AND owner = ?", [file_id, owner]
        if now is not None:
            sql, args = sql + _LIVE_FILE, [*args, now]
        r = self._db.execute(sql, args).fetchone()
        if r is None:
            raise NotFound("File", file_id)
        return dict(r)

    def list_files(self, owner: str, *, after: str | None, limit: int, order: str,
                   purpose: str | None, now: int | None = None
                   ) -> tuple[list[dict[str, Any]], bool]:
        where, args = ["owner = ?"], [owner]
        if now is not None:
            where.append(_LIVE_FILE[5:])
            args.append(now)
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if after:
            seq = self._seq("files", after, owner, "File")
            where.append("seq > ?" if order == "asc" else "seq < ?")
            args.append(seq)
        sql = (f"SELECT * FROM files WHERE {' AND '.join(where)} "
               f"ORDER BY seq {'ASC' if order == 'asc' else 'DESC'} LIMIT ?")
        rows = [dict(r) for r in self._db.execute(sql, [*args, limit + 1])]
        return rows[:limit], len(rows) > limit

    def file_ids(self) -> set[str]:
        """Every file id, whoever owns it (the start-up sweep's `known`)."""
        return {r[0] for r in self._db.execute("SELECT id FROM files")}

    def expired_files(self, now: int) -> list[str]:
        """Ids of the files expired by `now` that are not the input of a live batch."""
        return [r[0] for r in self._db.execute(
            "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ? AND id NOT IN "
            "(SELECT input_file_id FROM batches WHERE status IN "
            "('validating', 'in_progress', 'finalizing', 'cancelling')) ORDER BY expires_at",
            (now,))]

    def delete_expired_file(self, file_id: str, now: int) -> None:
        self._db.execute("DELETE FROM files WHERE id = ? AND expires_at <= ?", (file_id, now))

    def delete_file(self, file_id: str, owner: str, now: int | None = None) -> None:
        self.get_file(file_id, owner, now)
        live = self._db.execute(
            "SELECT id FROM batches WHERE input_file_id = ? AND status IN "
            "('validating', 'in_progress', 'finalizing', 'cancelling') LIMIT 1", (file_id,)).fetchone()
        if live is not None:
            raise Conflict(f"File {file_id} is the input of batch {live[0]}, which is still running.")
        self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    # --- batches ---------------------------------------------------------------------------------
    def insert_batch(self, row: dict[str, Any]) -> None:
        row = {k: (json.dumps(v) if k in _JSON_COLS and v is not None else v) for k, v in row.items()}
        cols = list(row)
        self._db.execute(
            f"INSERT INTO batches ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [row[c] for c in cols])

    def get_batch(self, batch_id: str, owner: str | None = None) -> dict[str, Any]:
        if owner is None:
            r = self._db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        else:
            r = self._db.execute("SELECT * FROM batches WHERE id = ? AND owner = ?",
                                 (batch_id, owner)).fetchone()
        if r is None:
            raise NotFound("Batch", batch_id)
        return _row(r)  # type: ignore[return-value]

    def list_batches(self, owner: str, *, after: str | None,
                     limit: int) -> tuple[list[dict[str, Any]], bool]:
        where, args = ["owner = ?"], [owner]
        if after:
            where.append("seq < ?")
            args.append(self._seq("batches", after, owner, "Batch"))
        sql = f"SELECT * FROM batches WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?"
        rows = [_row(r) for r in self._db.execute(sql, [*args, limit + 1])]
        return rows[:limit], len(rows) > limit  # type: ignore[return-value]

    def batches_in(self, statuses: Iterable[str]) -> list[dict[str, Any]]:
        st = list(statuses)
        sql = f"SELECT * FROM batches WHERE status IN ({', '.join('?' * len(st))}) ORDER BY seq"
        return [_row(r) for r in self._db.execute(sql, st)]  # type: ignore[misc]

    def owner_batches_in(self, owner: str, statuses: Iterable[str]) -> list[dict[str, Any]]:
        """(id, request_counts, input_lines) of the owner's batches in `statuses` (the queue
        limit's count: a few columns, not whole rows)."""
        st = list(statuses)
        sql = (f"SELECT id, request_counts, input_lines FROM batches WHERE owner = ? AND status "
               f"IN ({', '.join('?' * len(st))})")
        return [_row(r) for r in self._db.execute(sql, [owner, *st])]  # type: ignore[misc]

    def count_by_status(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._db.execute(
            "SELECT status, COUNT(*) FROM batches GROUP BY status")}

    def update_batch(self, batch_id: str, **fields: Any) -> None:
        fields = {k: (json.dumps(v) if k in _JSON_COLS and v is not None else v)
                  for k, v in fields.items()}
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._db.execute(f"UPDATE batches SET {sets} WHERE id = ?", [*fields.values(), batch_id])

    def transition(self, batch_id: str, allowed_from: Iterable[str], to: str,
                   **fields: Any) -> bool:
        """Move the batch to `to` if its status is in `allowed_from`; False (no change) otherwise.
        The move and what the `on_transition` hooks write are one transaction (a savepoint, so
        inside `tx()` too): a hook that raises undoes the move."""
        written = fields
        fields = {k: (json.dumps(v) if k in _JSON_COLS and v is not None else v)
                  for k, v in {"status": to, **fields}.items()}
        frm = list(allowed_from)
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._db.execute("SAVEPOINT transition")
        try:
            cur = self._db.execute(
                f"UPDATE batches SET {sets} WHERE id = ? AND status IN "
                f"({', '.join('?' * len(frm))})", [*fields.values(), batch_id, *frm])
            moved = cur.rowcount == 1
            if moved:
                for hook in self.on_transition:
                    hook(batch_id, to, written)
        except BaseException:
            self._db.execute("ROLLBACK TO transition")
            self._db.execute("RELEASE transition")
            raise
        self._db.execute("RELEASE transition")
        return moved

    def _seq(self, table: str, obj_id: str, owner: str, kind: str) -> int:
        r = self._db.execute(f"SELECT seq FROM {table} WHERE id = ? AND owner = ?",
                             (obj_id, owner)).fetchone()
        if r is None:
            raise NotFound(kind, obj_id)
        return int(r[0])


class _Tx:
    """`with db.tx():` — BEGIN IMMEDIATE … COMMIT, ROLLBACK on error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    def __enter__(self) -> None:
        self._c.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._c.execute("ROLLBACK" if exc_type else "COMMIT")
