"""Render the Jinja2 prompt templates in ``prompts/`` and fingerprint them.

Templates use ``StrictUndefined``: a variable the caller forgot is an error,
never a silently empty string inside a judge prompt.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import jinja2

from flywheel.errors import FlywheelError

TEMPLATE_DIR: Path = Path(__file__).resolve().parent.parent / "prompts"

_UNDEFINED_NAME = re.compile(r"'([^']+)' is undefined")


def _resolve_dir(template_dir: str | Path | None) -> Path:
    """Return the template directory to use (the repo's ``prompts/`` by default)."""
    return Path(template_dir) if template_dir is not None else TEMPLATE_DIR


def available_templates(template_dir: str | Path | None = None) -> list[str]:
    """Sorted file names of the ``*.j2`` templates in ``template_dir``."""
    directory = _resolve_dir(template_dir)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.glob("*.j2") if p.is_file())


def _template_path(name: str, template_dir: str | Path | None) -> Path:
    """Path of template ``name``; FlywheelError listing the choices if it is missing."""
    directory = _resolve_dir(template_dir)
    path = directory / name
    if Path(name).name != name or not path.is_file():
        available = available_templates(directory)
        raise FlywheelError(
            f"unknown template {name!r} in {directory}",
            details=[f"available templates: {', '.join(available) or '(none)'}"],
        )
    return path


def render(
    name: str, template_dir: str | Path | None = None, **variables: object
) -> str:
    """Render template ``name`` (e.g. ``"pairwise.j2"``) with ``variables``, stripped.

    Raises FlywheelError for an unknown template, a syntax error, or a variable
    the template uses but the caller did not pass.
    """
    path = _template_path(name, template_dir)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
        autoescape=False,
    )
    try:
        template = env.get_template(name)
        text = template.render(**variables)
    except jinja2.UndefinedError as exc:
        match = _UNDEFINED_NAME.search(str(exc))
        missing = match.group(1) if match else str(exc)
        raise FlywheelError(
            f"template {name!r} needs variable {missing!r}, which was not given",
            details=[
                f"given: {', '.join(sorted(variables)) or '(none)'}",
                f"jinja2: {exc}",
            ],
        ) from exc
    except jinja2.TemplateSyntaxError as exc:
        raise FlywheelError(
            f"template {name!r} has a syntax error at line {exc.lineno}: {exc.message}"
        ) from exc
    return text.strip()


def template_hash(name: str, template_dir: str | Path | None = None) -> str:
    """First 16 hex chars of the sha256 of the template file's bytes."""
    path = _template_path(name, template_dir)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
