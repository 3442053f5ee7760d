"""Fault injection for the crash-safety tests: `FLYWHEEL_FAULT=<point>` kills the process with
SIGKILL when it reaches that point, as a crash or `kill -9` would.

Points: `<kind>:compute` (a stage has started its work), `<kind>:commit` (inside the stage's
commit transaction, after its rows are inserted and before the version row and COMMIT), and
`train:step` (training, right after the first checkpoint is saved). Kinds: prompts, samples,
judgments, pairs, model, eval, gate. Unset in normal use; checking it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import sys


def point(name: str) -> None:
    """Kill this process now if `FLYWHEEL_FAULT` names this point."""
    if os.environ.get("FLYWHEEL_FAULT") == name:
        print(f"FLYWHEEL_FAULT={name}: killing process {os.getpid()} (SIGKILL)",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
