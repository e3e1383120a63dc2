"""The gateway's OpenAPI 3.1 document, served at `GET /openapi.json`.

Hand-written, kept true to the views (`gateway/files_views.py`, `gateway/batches_views.py`,
`gateway/app.py`): every route, parameter, request body, response and error shape. The test suite
fuzzes the live server against it with schemathesis (`tests/hardening/test_openapi_fuzz.py`), so a
drift between this document and the code fails CI. Request bodies allow unknown properties because the
views ignore them (like OpenAI's API), and a `purpose` or `order` outside its enum is rejected (400).
"""

from __future__ import annotations

import copy

from typing import Any

from aiohttp import web

from gateway.batches_views import META_KEY_LEN, META_KEYS, META_VALUE_LEN, STRATEGY_KEY
from gateway.file_expiry import ANCHOR, MAX_S, MIN_S
from gateway.files_views import UPLOAD_PURPOSES
from gateway.lifecycle import STATUSES
from gateway.responses import json_response
from gateway.state import CONFIG
from gateway.validation import SUPPORTED_ENDPOINTS
from runtime.config import STRATEGIES, Config

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    return {**schema, "type": [schema["type"], "null"]}


_INT = {"type": "integer"}
_STR = {"type": "string"}
_TS = _nullable(_INT)  # unix seconds, null until the batch reaches that status
_PAGE_ID = {"type": "string", "description": "id of the page's first / last object; \"\" when "
            "the page is empty"}

_COUNTS = {"type": "object", "required": ["total", "completed", "failed"],
           "properties": {k: {"type": "integer", "minimum": 0}
                          for k in ("total", "completed", "failed")}}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": _STR, "type": _STR, "param": _nullable(_STR),
                           "code": _nullable(_STR)}}},
    },
    "FileObject": {
        "type": "object",
        "required": ["id", "object", "bytes", "created_at", "filename", "purpose", "status"],
        "properties": {
            "id": {"type": "string", "pattern": "^file-"},
            "object": {"type": "string", "enum": ["file"]},
            "bytes": {"type": "integer", "minimum": 1},
            "created_at": _INT,
            "filename": _STR,
            "purpose": {"type": "string", "enum": [*UPLOAD_PURPOSES, "batch_output"]},
            "status": {"type": "string", "enum": ["processed"]},
            "expires_at": _TS,
            "status_details": _nullable(_STR),
        },
    },
    "FileList": {
        "type": "object", "required": ["object", "data", "first_id", "last_id", "has_more"],
        "properties": {"object": {"type": "string", "enum": ["list"]},
                       "data": {"type": "array", "items": _ref("FileObject")},
                       "first_id": _PAGE_ID, "last_id": _PAGE_ID,
                       "has_more": {"type": "boolean"}},
    },
    "FileDeleted": {
        "type": "object", "required": ["id", "object", "deleted"],
        "properties": {"id": _STR, "object": {"type": "string", "enum": ["file"]},
                       "deleted": {"type": "boolean"}},
    },
    "BatchError": {
        "type": "object", "required": ["code", "message", "param", "line"],
        "properties": {"code": _STR, "message": _STR, "param": _nullable(_STR),
                       "line": _nullable({"type": "integer", "minimum": 1})},
    },
    "RequestCounts": _COUNTS,
    "Usage": {
        "type": "object",
        "required": ["input_tokens", "input_tokens_details", "output_tokens",
                     "output_tokens_details", "total_tokens"],
        "properties": {
            "input_tokens": _INT, "output_tokens": _INT, "total_tokens": _INT,
            "input_tokens_details": {"type": "object", "required": ["cached_tokens"],
                                     "properties": {"cached_tokens": _INT}},
            "output_tokens_details": {"type": "object", "required": ["reasoning_tokens"],
                                      "properties": {"reasoning_tokens": _INT}},
        },
    },
    "Metadata": {
        "type": "object", "maxProperties": META_KEYS,
        "propertyNames": {"maxLength": META_KEY_LEN},
        "properties": {STRATEGY_KEY: {"type": "string", "enum": list(STRATEGIES)}},
        "description": f"at most {META_KEYS} keys of at most {META_KEY_LEN} characters; "
                       f"string values of at most {META_VALUE_LEN} characters. The key `strategy` "
                       "picks the planning strategy (samullm, sequential, even-split, ...).",
        "additionalProperties": {"type": "string", "maxLength": META_VALUE_LEN},
    },
    "Batch": {
        "type": "object",
        "required": ["id", "object", "endpoint", "model", "errors", "input_file_id",
                     "completion_window", "status", "output_file_id", "error_file_id",
                     "created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at",
                     "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts",
                     "metadata", "usage", "model_request_counts", "estimated_completion_at"],
        "properties": {
            "id": {"type": "string", "pattern": "^batch_"},
            "object": {"type": "string", "enum": ["batch"]},
            "endpoint": _STR,
            "model": {**_nullable(_STR), "description": "the model when the batch uses one"},
            "errors": _nullable({"type": "object", "required": ["object", "data"],
                                 "properties": {"object": {"type": "string", "enum": ["list"]},
                                                "data": {"type": "array",
                                                         "items": _ref("BatchError")}}}),
            "input_file_id": _STR,
            "completion_window": _STR,
            "status": {"type": "string", "enum": list(STATUSES)},
            "output_file_id": _nullable(_STR),
            "error_file_id": _nullable(_STR),
            "created_at": _INT,
            "expires_at": _TS,
            **{k: _TS for k in ("in_progress_at", "finalizing_at", "completed_at", "failed_at",
                                "expired_at", "cancelling_at", "cancelled_at")},
            "request_counts": _ref("RequestCounts"),
            "metadata": _nullable({"type": "object",
                                   "additionalProperties": {"type": "string"}}),
            "usage": _nullable(_ref("Usage")),
            "model_request_counts": {"type": "object", "additionalProperties": _COUNTS,
                                     "description": "extension: request_counts per model"},
            "estimated_completion_at": {**_TS, "description": "extension: when the latest plan "
                                        "predicts the batch done (unix s); null before the "
                                        "first plan and once the batch ended"},
        },
    },
    "BatchList": {
        "type": "object", "required": ["object", "data", "first_id", "last_id", "has_more"],
        "properties": {"object": {"type": "string", "enum": ["list"]},
                       "data": {"type": "array", "items": _ref("Batch")},
                       "first_id": _PAGE_ID, "last_id": _PAGE_ID,
                       "has_more": {"type": "boolean"}},
    },
    "BatchEvent": {
        "type": "object", "required": ["id", "object", "created_at", "type", "data"],
        "properties": {
            "id": {"type": "string", "pattern": "^batchevent_"},
            "object": {"type": "string", "enum": ["batch.event"]},
            "created_at": _INT,
            "type": {"type": "string", "description":
                     "batch_submitted, plan, replan (stage, stages, strategy, reasons, "
                     "predicted_makespan_s, predicted_completion_s/_at), plan_failed, "
                     "engine_start, engine_started, engine_stop, engine_start_failed, "
                     "engine_failed, engine_sleep, engine_wake, model_finished, deadline_at_risk, "
                     "deadline_miss_predicted, storage_stalled, storage_resumed, batch_finished, "
                     "batch_cancelled"},
            "data": {"type": "object", "description": "the event's fields; `time`: unix s"},
        },
    },
    "CreateBatchRequest": {
        "type": "object", "required": ["input_file_id", "endpoint", "completion_window"],
        "properties": {
            "input_file_id": {"type": "string", "minLength": 1},
            "endpoint": {"type": "string", "enum": list(SUPPORTED_ENDPOINTS), "description":
                         "another endpoint is refused (400, param `endpoint`, code "
                         "unsupported_endpoint)"},
            "completion_window": {"type": "string", "minLength": 1,
                                  "description": "one of [limits].completion_windows, e.g. 24h"},
            "metadata": _nullable(_ref("Metadata")),
            "output_expires_after": {"$ref": "#/components/schemas/ExpiresAfter", "description":
                                     "the output and error files expire that long after they "
                                     "are written"},
        },
    },
    "ExpiresAfter": {
        "type": "object", "required": ["anchor", "seconds"],
        "properties": {"anchor": {"type": "string", "enum": [ANCHOR]},
                       "seconds": {"type": "integer", "minimum": MIN_S, "maximum": MAX_S}},
    },
    "ModelList": {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"type": "string", "enum": ["list"]},
                       "data": {"type": "array", "items": {
                           "type": "object",
                           "required": ["id", "object", "created", "owned_by", "endpoints"],
                           "properties": {"id": _STR, "object": {"type": "string",
                                                                 "enum": ["model"]},
                                          "created": _INT, "owned_by": _STR,
                                          # an extension: what lines for this model may address
                                          "endpoints": {"type": "array", "items": {
                                              "type": "string", "enum": list(SUPPORTED_ENDPOINTS)},
                                              "description": "the batch endpoints it serves: "
                                              "generating ones, or /v1/embeddings"}}}}},
    },
}

# the list envelope of BatchList, of events
SCHEMAS["BatchEventList"] = {**SCHEMAS["BatchList"], "properties": {
    **SCHEMAS["BatchList"]["properties"], "data": {"type": "array", "items": _ref("BatchEvent")}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


def _ok(schema: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref(schema)}}}


AUTH_ERR = {"401": _error("missing or wrong API key (only when [auth].api_keys is set)")}
BAD = {"400": _error("invalid parameter")}
MISSING = {"404": _error("no such object for this API key")}
CONFLICT = {"409": {**_error("the object's state does not allow this; never retry"),
                    "headers": {"x-should-retry": {"schema": {"type": "string",
                                                              "enum": ["false"]}}}}}
TOO_LARGE = {"413": _error("body over the size limit")}


def _bad(description: str) -> dict[str, Any]:
    return {"400": _error(description)}


def _missing(description: str) -> dict[str, Any]:
    return {"404": _error(description)}


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


_AFTER = _query("after", _STR, "cursor: an object id from a previous page (404 if unknown)")

PATHS: dict[str, Any] = {
    "/health": {"get": {"operationId": "health", "security": [], "responses": {
        "200": {"description": "alive", "content": {JSON: {"schema": {
            "type": "object", "required": ["status"],
            "properties": {
                "status": {"type": "string", "enum": ["ok"]},
                # with real CPU engines: spare processes ready to become one (runtime.engines.spares)
                "spare_engines": {"type": "object", "required": ["ready", "target"],
                                  "properties": {"ready": {"type": "integer", "minimum": 0},
                                                 "target": {"type": "integer", "minimum": 0},
                                                 # what a start without one costs more (CPU s)
                                                 "import_s": {"type": "number", "minimum": 0}}},
                # [scheduler] auto_profile = "idle": background profiling of shapes without a
                # profile (runtime.executor.autoprofile)
                "auto_profile": {
                    "type": "object", "required": ["state", "missing"],
                    "properties": {
                        "state": {"type": "string", "enum": ["profiling", "waiting", "done"]},
                        "missing": {"type": "integer", "minimum": 0,
                                    "description": "shapes without a profile"},
                        "failed": {"type": "integer", "minimum": 1,
                                   "description": "of those, the ones whose run failed"},
                        "shape": {"type": "object", "required": ["model", "tp", "threads",
                                                                 "devices"],
                                  "description": "while profiling: the shape measured"},
                        "running_s": {"type": "number", "minimum": 0}}}}}}}}}}},
    "/metrics": {"get": {"operationId": "metrics", "security": [], "responses": {
        "200": {"description": "Prometheus text exposition",
                "content": {"text/plain": {"schema": _STR}}}}}},
    "/openapi.json": {"get": {"operationId": "openapi", "security": [], "responses": {
        "200": {"description": "this document",
                "content": {JSON: {"schema": {"type": "object"}}}}}}},
    "/v1/models": {"get": {"operationId": "listModels", "responses": {
        "200": _ok("ModelList"), **AUTH_ERR}}},
    "/v1/files": {
        "post": {
            "operationId": "uploadFile",
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["file", "purpose"],
                # other fields are ignored (their names must still make valid part headers)
                "properties": {
                    "file": {"type": "string", "format": "binary", "minLength": 1,
                             "description": "at most [limits].max_file_bytes; for purpose "
                                            "`batch` UTF-8 JSONL, any bytes for the others"},
                    "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
                    "expires_after[anchor]": {"type": "string", "enum": [ANCHOR], "description":
                                              "with expires_after[seconds]: the file expires "
                                              "(reads as deleted, then is deleted) that long "
                                              "after it was created"},
                    "expires_after[seconds]": {"type": "integer", "minimum": MIN_S,
                                               "maximum": MAX_S}}}}}},
            "responses": {"200": _ok("FileObject"),
                          **_bad("missing field, unknown purpose, empty, batch input not UTF-8"),
                          **AUTH_ERR, **TOO_LARGE,
                          "415": _error("not multipart/form-data")},
        },
        "get": {
            "operationId": "listFiles",
            "parameters": [
                _AFTER,
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000}, "page size"),
                _query("order", {"type": "string", "enum": ["asc", "desc"]}, "by creation"),
                _query("purpose", _STR, "only files with this purpose"),
            ],
            "responses": {"200": _ok("FileList"), **BAD, **AUTH_ERR, **MISSING},
        },
    },
    "/v1/files/{file_id}": {
        "parameters": [_path_param("file_id")],
        "get": {"operationId": "retrieveFile",
                "responses": {"200": _ok("FileObject"), **AUTH_ERR, **MISSING}},
        "delete": {"operationId": "deleteFile",
                   "responses": {"200": _ok("FileDeleted"), **AUTH_ERR, **MISSING,
                                 **CONFLICT}},
    },
    "/v1/files/{file_id}/content": {
        "parameters": [_path_param("file_id")],
        "get": {"operationId": "downloadFile", "responses": {
            "200": {"description": "the file's bytes",
                    "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                        "format": "binary"}}}},
            **AUTH_ERR, **MISSING}},
    },
    "/v1/batches": {
        "post": {
            "operationId": "createBatch",
            "requestBody": {"required": True, "content": {JSON: {
                "schema": _ref("CreateBatchRequest")}}},
            "responses": {"200": _ok("Batch", "created; validation runs in the background"),
                          **_bad("invalid JSON or parameter, endpoint not served, input file of the "
                                 "wrong purpose"),
                          **AUTH_ERR, **_missing("unknown input_file_id"), **TOO_LARGE},
        },
        "get": {
            "operationId": "listBatches",
            "parameters": [_AFTER, _query("limit", {"type": "integer", "minimum": 1,
                                                    "maximum": 100}, "page size")],
            "responses": {"200": _ok("BatchList"), **BAD, **AUTH_ERR, **MISSING},
        },
    },
    "/v1/batches/{batch_id}": {
        "parameters": [_path_param("batch_id")],
        "get": {"operationId": "retrieveBatch",
                "responses": {"200": _ok("Batch"), **AUTH_ERR, **MISSING}},
    },
    "/v1/batches/{batch_id}/cancel": {
        "parameters": [_path_param("batch_id")],
        "post": {"operationId": "cancelBatch",
                 "responses": {"200": _ok("Batch", "cancelling or cancelled"), **AUTH_ERR,
                               **MISSING, **CONFLICT}},
    },
    "/v1/batches/{batch_id}/events": {
        "parameters": [_path_param("batch_id")],
        "get": {"operationId": "listBatchEvents",
                "description": "the batch's events, oldest first (extension)",
                "parameters": [_AFTER, _query("limit", {"type": "integer", "minimum": 1,
                                                        "maximum": 1000}, "page size (100)")],
                "responses": {"200": _ok("BatchEventList"), **BAD, **AUTH_ERR, **MISSING}},
    },
}


def document(cfg: Config | None = None, server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh dict); with `cfg`, the allowed completion windows."""
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "samullm", "version": "0.1.0",
                 "description": "OpenAI-compatible Files + Batches API; one input file may "
                                "address several models. Errors are OpenAI-shaped."},
        "paths": copy.deepcopy(PATHS),
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
    if cfg is not None:
        req = doc["components"]["schemas"]["CreateBatchRequest"]["properties"]
        req["completion_window"]["enum"] = list(cfg.limits.completion_windows)
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(document(request.app[CONFIG]))
