"""Fault injection for the crash-safety tests: `FLYWHEEL_FAULT=<point>` kills the process with
SIGKILL when it reaches that point, as a crash or `kill -9` would.

Points: `<kind>:compute` (a stage has started its work), `<kind>:commit` (inside the stage's
commit transaction, after its rows are inserted and before the version row and COMMIT), and
`train:step` (training, right after the first checkpoint is saved), and `migrate:<name>`
(inside the migrations' transaction, right after migration <name> is applied or recorded,
before COMMIT). Kinds: prompts, samples, judgments, pairs, model, eval, gate. Unset in normal
use; checking them costs two dict lookups.

`FLYWHEEL_STALL=<point>` instead makes the process wait there (up to 10 minutes), as a long
computation would, so the interrupt tests can signal a run that is inside a given stage; it
prints `FLYWHEEL_STALL=<point>: waiting` to stderr first.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def point(name: str) -> None:
    """Kill this process now if `FLYWHEEL_FAULT` names this point; wait here if
    `FLYWHEEL_STALL` does."""
    if os.environ.get("FLYWHEEL_FAULT") == name:
        print(f"FLYWHEEL_FAULT={name}: killing process {os.getpid()} (SIGKILL)",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("FLYWHEEL_STALL") == name:
        print(f"FLYWHEEL_STALL={name}: waiting (process {os.getpid()})", file=sys.stderr,
              flush=True)
        from flywheel import interrupt

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            interrupt.check()  # a stop request made in another thread
            time.sleep(0.05)
