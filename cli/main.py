"""`samullm` console script. Subcommand names are fixed: other tools call them.

Each subcommand lives in its own module; heavy imports (vLLM, torch, transformers) happen only inside
the functions that need them, so `samullm plan` runs on a machine without an engine.
"""

from __future__ import annotations

import argparse
import sys

from cli.batch import add_batch_args
from cli.plan import add_plan_args, plan_main
from cli.serve import serve_main
from runtime.config import ConfigError
from runtime.config_help import annotated_config
from tools.profiler import add_profile_args, profile_main
from tools.tinymodel import tiny_model_main


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible Batch API gateway")
    p.add_argument("--config", default="conf/default.toml")
    p.add_argument("--host", default=None, help="overrides [server].host")
    p.add_argument("--port", type=int, default=None, help="overrides [server].port")
    p.add_argument("--state-dir", default=None, help="overrides [server].state_dir")
    p.add_argument("--make-demo-models", action="store_true",
                   help="write configured demo models that are missing (what `make run` does)")
    p.add_argument("--help-config", action="store_true",
                   help="print every config key with its default and help, as TOML, and exit")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    if args.help_config:
        print(annotated_config(), end="")
        return 0
    return serve_main(args)


def _add_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-model", help="write a random-weight Llama model + local BPE tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--intermediate", type=int, default=None, help="default 4 x hidden")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--max-position", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=tiny_model_main)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="predict stages and makespan of a batch input for each strategy")
    p.set_defaults(func=plan_main)
    add_plan_args(p)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure a model's per-iteration latency on this machine")
    p.set_defaults(func=profile_main)
    add_profile_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samullm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_tiny_model(sub)
    _add_plan(sub)
    _add_profile(sub)
    add_batch_args(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"samullm: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
