"""CLI commands: inspect (registered into `flywheel`'s parser by flywheel.cli)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> dict:
    """Add this module's subcommands to `sub`; return {command name: function(args) -> int}."""
    return {}
