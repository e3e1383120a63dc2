"""`samullm batch submit | watch | results`: a thin client of the gateway's HTTP API through the
official `openai` SDK (what any user's code would do), never a second path into the gateway.

`--base-url` (default $OPENAI_BASE_URL, else http://127.0.0.1:8000/v1) and `--api-key` (default
$OPENAI_API_KEY) pick the gateway and the key. Per-model progress comes from the Batch object's
`model_request_counts` extension and the ETA from `estimated_completion_at`; the plans and engines
from `GET /v1/batches/{id}/events` (`cli.batch_watch`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

import openai

from cli.batch_watch import TERMINAL, watch

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def add_batch_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="submit a batch, watch it, download its results (a client "
                                     "of a running gateway)")
    verbs = p.add_subparsers(dest="verb", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
                        help=f"the gateway's API root (default $OPENAI_BASE_URL, else "
                             f"{DEFAULT_BASE_URL})")
    common.add_argument("--api-key", default=None,
                        help="an API key of [auth].api_keys (default $OPENAI_API_KEY)")
    watching = argparse.ArgumentParser(add_help=False)
    watching.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    watching.add_argument("--no-events", dest="events", action="store_false",
                          help="do not print the plans and engine events as they come")

    s = verbs.add_parser("submit", parents=[common, watching],
                         help="upload a JSONL file and create a batch; prints the batch id")
    s.add_argument("file", type=Path, help="the requests, one OpenAI batch line each")
    s.add_argument("--endpoint", default="/v1/chat/completions",
                   help="the batch's endpoint (the gateway says which it serves)")
    s.add_argument("--completion-window", default="24h")
    s.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="batch metadata (repeatable); strategy=... picks the planning strategy")
    s.add_argument("--watch", action="store_true", help="then watch it to its end")
    s.set_defaults(func=submit_main)

    w = verbs.add_parser("watch", parents=[common, watching],
                         help="per-model progress bars with the planner's ETA until the batch ends")
    w.add_argument("batch_id")
    w.set_defaults(func=watch_main)

    r = verbs.add_parser("results", parents=[common],
                         help="download an ended batch's output (or error) file")
    r.add_argument("batch_id")
    r.add_argument("-o", "--output", default="-", help="where to write it ('-': stdout)")
    r.add_argument("--errors", action="store_true", help="the error file instead")
    r.set_defaults(func=results_main)


def client_for(args: argparse.Namespace) -> openai.OpenAI:
    key = args.api_key or os.environ.get("OPENAI_API_KEY") or "unused-when-no-keys-configured"
    return openai.OpenAI(base_url=args.base_url, api_key=key, max_retries=2)


def _fail(message: str) -> int:
    print(f"samullm: {message}", file=sys.stderr)
    return 1


def _api_call(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The SDK's errors as one line on stderr and exit status 1 (2 for a usage error)."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except openai.APIConnectionError:
            return _fail(f"cannot reach the gateway at {args.base_url}")
        except openai.APIStatusError as exc:
            return _fail(f"{exc.status_code}: {exc.message}")
        except OSError as exc:
            return _fail(str(exc))
    return run


@_api_call
def submit_main(args: argparse.Namespace) -> int:
    metadata = {}
    for kv in args.metadata:
        key, eq, value = kv.partition("=")
        if not eq:
            print(f"samullm: --metadata wants KEY=VALUE, not {kv!r}", file=sys.stderr)
            return 2
        metadata[key] = value
    client = client_for(args)
    with open(args.file, "rb") as fh:
        f = client.files.create(file=(args.file.name, fh), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint=args.endpoint,
                              completion_window=args.completion_window,
                              **({"metadata": metadata} if metadata else {}))
    print(b.id, flush=True)
    if not args.watch:
        return 0
    return _outcome(watch(client, b.id, args.interval, events=args.events))


@_api_call
def watch_main(args: argparse.Namespace) -> int:
    return _outcome(watch(client_for(args), args.batch_id, args.interval, events=args.events))


def _outcome(b: openai.types.Batch) -> int:
    """Exit status 0 for a completed batch, 1 for one that failed, expired or was cancelled."""
    return 0 if b.status == "completed" else 1


@_api_call
def results_main(args: argparse.Namespace) -> int:
    client = client_for(args)
    b = client.batches.retrieve(args.batch_id)
    if b.status not in TERMINAL:
        return _fail(f"batch {b.id} is {b.status}; its files are written when it ends "
                     f"(`samullm batch watch {b.id}`)")
    file_id = b.error_file_id if args.errors else b.output_file_id
    kind = "error" if args.errors else "output"
    if file_id is None:  # OpenAI leaves the id null when there is nothing to report
        if args.output != "-":
            Path(args.output).write_bytes(b"")
        print(f"batch {b.id} ({b.status}) has no {kind} lines", file=sys.stderr)
        return 0
    with client.files.with_streaming_response.content(file_id) as resp:
        if args.output == "-":
            for chunk in resp.iter_bytes():
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        else:
            resp.stream_to_file(args.output)
            print(f"wrote batch {b.id}'s {kind} file {file_id} to {args.output}",
                  file=sys.stderr)
    return 0
