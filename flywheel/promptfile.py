"""Load and validate a prompt file (JSONL, one JSON object per line).

Each non-blank line looks like::

    {"prompt": "Explain X. Answer in at most 20 words.", "gold": "...",
     "constraints": [{"type": "max_words", "n": 20}], "category": "science", "id": "seed-001"}

Only ``prompt`` is required. An eval file may mark a line ``"split": "transfer"``: a
held-out prompt whose topic and instruction phrasings (the transfer phrasings of
flywheel.constraints) never appear in training; lines without a split are
``in_distribution``. Every problem in the file is collected and reported together in one
:class:`~flywheel.errors.FlywheelError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flywheel.constraints import validate_constraints
from flywheel.errors import FlywheelError

ALLOWED_KEYS = ("prompt", "gold", "constraints", "category", "id", "split")
#: the eval splits a line may name; a line without one is in-distribution
IN_DISTRIBUTION, TRANSFER = "in_distribution", "transfer"
SPLITS = (IN_DISTRIBUTION, TRANSFER)
OPTIONAL_STRINGS = ("gold", "category", "id")
MAX_SHOWN = 20
EXAMPLE = '{"prompt": "..."}'


def _type_name(value: Any) -> str:
    """JSON-ish type name of ``value`` for error messages."""
    return {dict: "object", list: "list", type(None): "null"}.get(type(value), type(value).__name__)


def _read_lines(path: Path) -> list[str]:
    """The file's lines; raises a :class:`FlywheelError` naming the path when unreadable."""
    if not path.exists():
        raise FlywheelError(
            f"prompt file not found: {path} — check the path, or create it with one JSON "
            f"object per line, e.g. {EXAMPLE}"
        )
    if not path.is_file():
        raise FlywheelError(f"prompt file {path} is not a file — give the path of a .jsonl file")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise FlywheelError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}) — save the file as UTF-8"
        ) from exc


def _parse_line(text: str, where: str) -> tuple[Any, list[str]]:
    """Parse one line as JSON; returns ``(value, errors)``."""
    try:
        return json.loads(text), []
    except json.JSONDecodeError as exc:
        reason = f"{exc.msg} at column {exc.colno}"
        return None, [f"{where}: not valid JSON ({reason}) — each line must be one JSON object"]


def _check_fields(obj: dict, where: str) -> list[str]:
    """Errors in the keys and value types of one prompt object."""
    errors = [
        f"{where}: unknown key {key!r} (allowed keys: {', '.join(ALLOWED_KEYS)})"
        for key in obj
        if key not in ALLOWED_KEYS
    ]
    prompt = obj.get("prompt")
    if "prompt" not in obj:
        errors.append(f'{where}: missing "prompt" — every line needs {EXAMPLE}')
    elif not isinstance(prompt, str):
        errors.append(f"{where}: prompt: expected str, got {_type_name(prompt)}")
    elif not prompt.strip():
        errors.append(f"{where}: prompt is empty")
    for key in OPTIONAL_STRINGS:
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            errors.append(f"{where}: {key}: expected str, got {_type_name(value)}")
        elif isinstance(value, str) and not value.strip():
            errors.append(f"{where}: {key} is empty — leave the key out instead")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        got = repr(split) if isinstance(split, str) else f"{json.dumps(split)} (not a string)"
        errors.append(f"{where}: split: unknown split {got} — use one of: "
                      f"{', '.join(SPLITS)} (or leave the key out: {IN_DISTRIBUTION})")
    if obj.get("constraints") is not None:
        errors += validate_constraints(obj["constraints"], where)
    return errors


def _normalise(obj: dict, line: int) -> dict:
    """The canonical form of a valid prompt object."""
    gold = obj.get("gold")
    record = {
        "prompt": obj["prompt"].strip(),
        "gold": gold.strip() if gold is not None else None,
        "constraints": list(obj.get("constraints") or []),
        "category": obj.get("category"),
        "id": obj.get("id"),
        "line": line,
    }
    if obj.get("split") is not None:
        record["split"] = obj["split"]
    return record


def _duplicate_ids(records: list[dict], path: Path) -> list[str]:
    """Errors for ids used on more than one line."""
    first: dict[str, int] = {}
    errors = []
    for rec in records:
        rid = rec["id"]
        if rid is None:
            continue
        if rid in first:
            errors.append(
                f"{path} line {rec['line']}: id {rid!r} already used on line {first[rid]}"
            )
        else:
            first[rid] = rec["line"]
    return errors


def _raise_if_errors(path: Path, errors: list[str]) -> None:
    """Raise one :class:`FlywheelError` listing up to ``MAX_SHOWN`` errors."""
    if not errors:
        return
    shown = errors[:MAX_SHOWN]
    if len(errors) > MAX_SHOWN:
        shown.append(f"and {len(errors) - MAX_SHOWN} more")
    noun = "problem" if len(errors) == 1 else "problems"
    raise FlywheelError(f"prompt file {path} has {len(errors)} {noun}:", details=shown)


def load_prompt_file(path: str | Path, *, require_nonempty: bool = True) -> list[dict]:
    """Load and validate a JSONL prompt file.

    Returns one dict per non-blank line with keys ``prompt``, ``gold`` (None if
    absent), ``constraints`` ([] if absent), ``category`` (None), ``id`` (None)
    and ``line`` (1-based), and ``split`` where the line has one. Raises
    :class:`FlywheelError` listing every problem.
    """
    path = Path(path)
    records: list[dict] = []
    errors: list[str] = []
    for number, text in enumerate(_read_lines(path), start=1):
        if not text.strip():
            continue
        where = f"{path} line {number}"
        obj, problems = _parse_line(text, where)
        if not problems and not isinstance(obj, dict):
            problems = [f"{where}: expected a JSON object like {EXAMPLE}, got {_type_name(obj)}"]
        problems = problems or _check_fields(obj, where)
        errors += problems
        if not problems:
            records.append(_normalise(obj, number))
    errors += _duplicate_ids(records, path)
    _raise_if_errors(path, errors)
    if require_nonempty and not records:
        raise FlywheelError(
            f"{path} contains no prompts — add one JSON object per line, e.g. {EXAMPLE}"
        )
    return records


def refuse_transfer(path: str | Path, records: list[dict], what: str = "a training prompt file",
                    unit: str = "line") -> None:
    """Raise when ``records`` (loaded from ``path``) hold lines marked ``"split": "transfer"``:
    prompts that train the model (the seed file, `flywheel ingest`) must not, since the transfer
    split is the held-out check of phrasings and topics never trained on."""
    bad = [r for r in records if r.get("split") == TRANSFER]
    if not bad:
        return
    shown = [f"{path} {unit} {r['line']}: \"split\": \"transfer\"" for r in bad[:MAX_SHOWN]]
    if len(bad) > MAX_SHOWN:
        shown.append(f"and {len(bad) - MAX_SHOWN} more")
    noun = "line is" if len(bad) == 1 else "lines are"
    raise FlywheelError(
        f"{path} is {what}, but {len(bad)} {noun} marked \"split\": \"transfer\": the transfer "
        "split is held out from training (its phrasings and topics must never be trained on)",
        details=[*shown, "move those lines to the eval file (eval.prompts_file), or drop their "
                 "\"split\" key if they are meant for training; nothing was written"])


def length_problems(path: str | Path, records: list[dict], max_tokens: int,
                    tokenizer: str | Path | None) -> list[str]:
    """One problem per prompt of a loaded file over ``max_tokens`` tokens (file and line
    named, with the fix), at most ``MAX_SHOWN`` shown; [] when every prompt fits."""
    from flywheel.limits import KEY, too_long

    errors = too_long([(f"{path} line {r['line']}", r["prompt"]) for r in records], max_tokens,
                      tokenizer)
    if not errors:
        return []
    shown = errors[:MAX_SHOWN]
    if len(errors) > MAX_SHOWN:
        shown.append(f"and {len(errors) - MAX_SHOWN} more")
    noun = "prompt is" if len(errors) == 1 else "prompts are"
    return [f"prompt file {path}: {len(errors)} {noun} longer than {KEY} ({max_tokens:,} "
            "tokens):", *shown]
