"""`/v1/files`: upload (multipart, streamed to disk), list, retrieve, content, delete."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.auth import OWNER
from gateway.errors import ApiError, bad_request
from gateway.filestore import AtomicWriter, NotUtf8, TooLarge
from gateway.ids import new_file_id
from gateway.responses import json_response
from gateway.state import CONFIG, DB, SERVICE, STORE
from gateway.views_util import int_param

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
CHUNK = 1 << 20  # an upper bound: read_chunk returns what has arrived, up to this
MAX_FIELD = 4096


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": row["created_at"], "filename": row["filename"],
            "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


async def upload(request: web.Request) -> web.Response:
    if request.content_type != "multipart/form-data":
        raise ApiError(415, "Uploads must be multipart/form-data with fields `file` and `purpose`.",
                       code="unsupported_media_type")
    cfg, store = request.app[CONFIG], request.app[STORE]
    purpose: str | None = None
    file_id, filename, size, problem = None, "", 0, None
    try:
        reader = await request.multipart()  # ValueError without a (valid) boundary
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise bad_request("Nested multipart bodies are not supported.")
            if part.name == "purpose":
                purpose = (await part.read_chunk(MAX_FIELD)).decode("utf-8", "replace").strip()
                await part.release()
            elif part.name == "file" and file_id is None:
                file_id, filename = new_file_id(), part.filename or "upload.jsonl"
                size, problem = await _receive(part, store.writer(file_id, cfg.limits.max_file_bytes))
            else:
                await part.release()
    except (ValueError, AssertionError, HttpProcessingError) as exc:  # malformed multipart framing
        raise bad_request(f"Malformed multipart body: {exc}") from None
    if problem is not None:
        raise problem
    if file_id is None:
        raise bad_request("Missing required parameter: 'file'.", param="file",
                          code="missing_required_parameter")
    try:
        if purpose is None:
            raise bad_request("Missing required parameter: 'purpose'.", param="purpose",
                              code="missing_required_parameter")
        if purpose not in UPLOAD_PURPOSES:
            raise bad_request(f"Invalid purpose {purpose!r}; one of {', '.join(UPLOAD_PURPOSES)}.",
                              param="purpose", code="invalid_purpose")
        if size == 0:
            raise bad_request("The file is empty.", param="file", code="empty_file")
    except ApiError:
        store.delete(file_id)
        raise
    row = {"id": file_id, "owner": request[OWNER], "bytes": size,
           "created_at": request.app[SERVICE].now(),
           "filename": filename, "purpose": purpose, "batch_id": None}
    request.app[DB].insert_file(row)
    return json_response(file_object(row))


async def _receive(part: BodyPartReader, w: AtomicWriter) -> tuple[int, ApiError | None]:
    """Stream the file part to disk. Over the limit or not UTF-8: keep draining the body (so the
    client reads our answer instead of a reset connection), discard the file, report the problem."""
    problem: ApiError | None = None
    w.check_utf8()
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
    return w.size, problem


async def list_files(request: web.Request) -> web.Response:
    q = request.query
    limit = int_param(q, "limit", 10_000, 1, 10_000)
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("`order` must be 'asc' or 'desc'.", param="order")
    rows, more = request.app[DB].list_files(request[OWNER], after=q.get("after") or None,
                                           limit=limit, order=order,
                                           purpose=q.get("purpose") or None)
    data = [file_object(r) for r in rows]
    return json_response({"object": "list", "data": data,
                              "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None, "has_more": more})


async def retrieve(request: web.Request) -> web.Response:
    row = request.app[DB].get_file(request.match_info["file_id"], request[OWNER])
    return json_response(file_object(row))


async def content(request: web.Request) -> web.StreamResponse:
    row = request.app[DB].get_file(request.match_info["file_id"], request[OWNER])
    return web.FileResponse(request.app[STORE].path(row["id"]),
                            headers={"Content-Type": "application/octet-stream"})


async def delete(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    request.app[DB].delete_file(file_id, request[OWNER])
    request.app[STORE].delete(file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})
