"""`flywheel cache`: the workspace's endpoint request cache (registered by flywheel.cli).

Each response from an endpoint (a judge or prompt generator behind `backend: openai`) is
stored as it arrives, keyed by a hash of the request, so a stage stopped halfway resumes
without sending what was answered. The cache is never a version: clearing it loses no data,
only the answers a rerun of an unfinished stage would otherwise reuse.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_RAW = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> dict:
    """Add `cache` to `sub`; return {command name: function(args) -> int}."""
    ca = sub.add_parser(
        "cache", help="size of the endpoint request cache, or clear it",
        description="The request cache of a workspace (<workspace>/.flywheel/requests.sqlite3)"
                    ": every endpoint response, stored as it arrives, so an interrupted stage "
                    "resumes without sending what was answered. It is never a version; "
                    "clearing it removes only that file.",
        epilog="examples:\n  flywheel cache                     entries and size\n"
               "  flywheel cache clear --workspace data/endpoint", formatter_class=_RAW)
    ca.add_argument("action", nargs="?", choices=("info", "clear"), default="info",
                    help="info (default): entries and size; clear: remove every entry")
    ca.add_argument("--workspace", default="data", help="the workspace (default: data)")
    return {"cache": cmd_cache}


def cache_path(workspace: str | Path) -> Path:
    """The request cache of `workspace` (the rule of Config.request_cache_path)."""
    from flywheel.config import Config

    return Config(workspace=str(workspace)).request_cache_path()


def describe(path: Path) -> str:
    """`<path>: N responses, X MB` (or that there is none)."""
    from flywheel.backends.cache import RequestCache

    if not path.exists():
        return f"{path}: no request cache (nothing sent to an endpoint from this workspace)"
    entries, size = RequestCache(path).stats()
    return f"{path}: {entries:,} cached responses, {size / 1e6:.1f} MB"


def cmd_cache(args) -> int:
    from flywheel.backends.cache import RequestCache

    path = cache_path(args.workspace)
    if args.action == "clear":
        if not path.exists():
            print(f"{path}: no request cache; nothing to clear", file=sys.stderr)
            return 0
        removed = RequestCache(path).clear()
        print(f"{path}: cleared {removed:,} cached responses", file=sys.stderr)
        return 0
    print(describe(path))
    return 0
