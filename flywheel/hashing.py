"""Ids and fingerprints: pure functions of their inputs (the standard library only).

Stages make their row ids here (`stable_id`, `prompt_id`); the pipeline fingerprints each
stage's output here. Nothing in this module touches the catalog.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from flywheel import __version__

#: The code version every stage had before stages carried their own (`Stage.code`): stages
#: whose output has not changed since keep it, so their fingerprints (and version ids) stay.
CODE_VERSION = f"{__version__}+1"


def stable_id(*parts: object, length: int = 16) -> str:
    """A short, stable hex id from its parts."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode())
    return h.hexdigest()[:length]


def normalise_text(text: str) -> str:
    """Case- and whitespace-insensitive form of a prompt, the basis of its `prompt_id`."""
    return " ".join(text.lower().split())


def prompt_id(text: str) -> str:
    """The stable id of a prompt: the hash of its normalised text."""
    return "p_" + stable_id(normalise_text(text))


def fingerprint(kind: str, params: Mapping[str, Any], parent_fps: Sequence[str],
                code: str = CODE_VERSION) -> str:
    """Hash of everything that determines a version's content: its kind, the params that
    shape it, its parents' fingerprints and the code version of the stage that made it."""
    payload = json.dumps(
        {"kind": kind, "params": params, "parents": list(parent_fps), "code": code},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]
