"""`/v1/files`: upload (multipart, streamed to disk), list, retrieve, content, delete."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.auth import OWNER
from gateway.errors import ApiError, bad_request, disk_full
from gateway.file_expiry import expiry_seconds
from gateway.filestore import AtomicWriter, NotUtf8, TooLarge
from gateway.ids import new_file_id
from gateway.responses import json_response
from gateway.state import CONFIG, DB, SERVICE, STORE
from gateway.views_util import int_param, list_page

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
CHUNK = 1 << 20  # an upper bound: read_chunk returns what has arrived, up to this
MAX_FIELD = 4096
# the SDK's form fields of `expires_after` (the nested object, as multipart spells it)
EXPIRY_FIELDS = {"expires_after[anchor]": "anchor", "expires_after[seconds]": "seconds"}


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": row["created_at"], "filename": row["filename"],
            "purpose": row["purpose"], "status": "processed", "expires_at": row.get("expires_at"),
            "status_details": None}


async def upload(request: web.Request) -> web.Response:
    if request.content_type != "multipart/form-data":
        raise ApiError(415, "Uploads must be multipart/form-data with fields `file` and `purpose`.",
                       code="unsupported_media_type")
    cfg, store = request.app[CONFIG], request.app[STORE]
    # ENOSPC (507) if the disk has no room for it: an upload must never take the room a delete needs
    store.ensure_reserve()
    purpose: str | None = None
    file_id, filename, size, problem, n_files = None, "", 0, None, 0
    not_utf8: str | None = None
    expires: dict[str, str] = {}
    try:  # any way out without a committed row deletes the content: nothing unowned stays on disk
        try:
            reader = await request.multipart()  # ValueError without a (valid) boundary
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise bad_request("Nested multipart bodies are not supported.")
                if part.name == "purpose":
                    purpose = (await part.read_chunk(MAX_FIELD)).decode("utf-8", "replace").strip()
                    await part.release()
                elif part.name in EXPIRY_FIELDS:
                    raw = await part.read_chunk(MAX_FIELD)
                    expires[EXPIRY_FIELDS[part.name]] = raw.decode("utf-8", "replace").strip()
                    await part.release()
                elif part.name == "file" and n_files == 0:
                    n_files, filename = 1, part.filename or "upload.jsonl"
                    problem = _filename_problem(filename)
                    if problem is None:
                        file_id = new_file_id()
                        # only batch input must be UTF-8 JSONL; with the purpose not read yet,
                        # a problem is noted and decided on once it is
                        size, problem, not_utf8 = await _receive(
                            part, store.writer(file_id, cfg.limits.max_file_bytes),
                            strict=purpose == "batch")
                    else:
                        await part.release()
                else:
                    n_files += part.name == "file"
                    await part.release()  # drained, so the client reads our answer
        except (ValueError, AssertionError, HttpProcessingError) as exc:  # malformed framing
            raise bad_request(f"Malformed multipart body: {exc}") from None
        if n_files > 1:  # which one was meant is a guess; keeping either would be wrong
            raise bad_request(f"An upload takes one `file` part; this one has {n_files}.",
                              param="file", code="too_many_files")
        if problem is not None:
            raise problem
        if file_id is None:
            raise bad_request("Missing required parameter: 'file'.", param="file",
                              code="missing_required_parameter")
        if purpose is None:
            raise bad_request("Missing required parameter: 'purpose'.", param="purpose",
                              code="missing_required_parameter")
        if purpose not in UPLOAD_PURPOSES:
            raise bad_request(f"Invalid purpose {purpose!r}; one of {', '.join(UPLOAD_PURPOSES)}.",
                              param="purpose", code="invalid_purpose")
        if not_utf8 is not None and purpose == "batch":
            raise bad_request(f"The file is not valid UTF-8 ({not_utf8}).", param="file",
                              code="invalid_encoding")
        if size == 0:
            raise bad_request("The file is empty.", param="file", code="empty_file")
        seconds = expiry_seconds(expires or None, "expires_after")
        now = request.app[SERVICE].now()
        row = {"id": file_id, "owner": request[OWNER], "bytes": size, "created_at": now,
               "filename": filename, "purpose": purpose, "batch_id": None,
               "expires_at": None if seconds is None else now + seconds}
        request.app[DB].insert_file(row)
    except BaseException:
        if file_id is not None:
            store.delete(file_id)
        raise
    return json_response(file_object(row))


def _filename_problem(filename: str) -> ApiError | None:
    """aiohttp hands over header bytes that are not UTF-8 as lone surrogates, which SQLite cannot
    store. Refused rather than stored with replacement characters: the filename is how the user
    recognizes the file in every listing, and a silently rewritten one would not be theirs; every
    well-behaved client (the SDK, curl, browsers) sends UTF-8: this is a broken client to tell."""
    try:
        filename.encode("utf-8")
    except UnicodeEncodeError:
        return bad_request("The filename is not valid UTF-8.", param="file",
                           code="invalid_filename")
    return None


async def _receive(part: BodyPartReader, w: AtomicWriter, strict: bool
                   ) -> tuple[int, ApiError | None, str | None]:
    """Stream the file part to disk. Over the limit or (`strict`) not UTF-8: keep draining the body
    (so the client reads our answer instead of a reset connection), discard the file, report the
    problem. Not `strict`: the first UTF-8 problem is returned, the bytes kept."""
    problem: ApiError | None = None
    w.check_utf8(strict)
    try:
        while chunk := await part.read_chunk(CHUNK):
            if problem is None:
                try:
                    w.write(chunk)
                except TooLarge as exc:
                    problem = ApiError(413, f"The file is too large: {exc}.", param="file",
                                       code="file_too_large")
                except NotUtf8 as exc:
                    problem = bad_request(f"The file is not valid UTF-8 ({exc}).", param="file",
                                          code="invalid_encoding")
        if problem is None:
            try:
                await asyncio.to_thread(w.commit)
            except NotUtf8 as exc:
                problem = bad_request(f"The file is not valid UTF-8 ({exc}).", param="file",
                                      code="invalid_encoding")
    finally:
        w.abort()  # no-op after a commit
    return w.size, problem, w.not_utf8


async def list_files(request: web.Request) -> web.Response:
    q = request.query
    limit = int_param(q, "limit", 10_000, 1, 10_000)
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("`order` must be 'asc' or 'desc'.", param="order")
    rows, more = request.app[DB].list_files(request[OWNER], after=q.get("after") or None,
                                           limit=limit, order=order,
                                           purpose=q.get("purpose") or None,
                                           now=request.app[SERVICE].now())
    return json_response(list_page([file_object(r) for r in rows], more))


def _file(request: web.Request) -> dict[str, Any]:
    """The caller's file named in the path; an expired one is not found (`gateway.file_expiry`)."""
    return request.app[DB].get_file(request.match_info["file_id"], request[OWNER],
                                    request.app[SERVICE].now())


async def retrieve(request: web.Request) -> web.Response:
    row = _file(request)
    return json_response(file_object(row))


async def content(request: web.Request) -> web.StreamResponse:
    row = _file(request)
    path = request.app[STORE].path(row["id"])
    if not path.is_file():  # lost outside the API (or mid-delete): say so, not an empty 404
        raise ApiError(404, f"The content of file {row['id']} is missing from the server's "
                       "storage.", param="file_id", code="file_content_missing")
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


async def delete(request: web.Request) -> web.Response:
    """Works on a full disk, where SQLite has no room for the DELETE: `delete_file` checks the
    owner and live batches before it writes, so once it fails for room the file is going anyway.
    Its bytes are freed first (kept freed even if the retry fails too: the row then goes on the
    client's retry), then the store's reserve, and the DELETE is retried in that room."""
    file_id = request.match_info["file_id"]
    db, store, now = request.app[DB], request.app[STORE], request.app[SERVICE].now()
    try:
        db.delete_file(file_id, request[OWNER], now)
    except sqlite3.OperationalError as exc:
        if not disk_full(exc):
            raise
        store.delete(file_id)
        store.release_reserve()
        db.delete_file(file_id, request[OWNER])
    store.delete(file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})

