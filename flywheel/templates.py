"""Render the Jinja2 prompt templates and fingerprint them.

The default templates ship inside the package (``flywheel/default_prompts/``), so an installed
flywheel renders prompts from any directory. A template named in the config is looked up first
in ``prompts/`` of the current directory (where users read, copy and override them; in a
checkout of the repository that is the top-level ``prompts/``, byte-identical to the packaged
defaults), then among the packaged defaults. ``template_hash`` fingerprints the file actually
used, so an override changes the judgments' fingerprints and a copy of a default does not.

Templates use ``StrictUndefined``: a variable the caller forgot is an error, never a silently
empty string inside a judge prompt.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import jinja2

from flywheel.errors import FlywheelError

#: The default templates (and their README), shipped as package data.
TEMPLATE_DIR: Path = Path(__file__).resolve().parent / "default_prompts"

#: The user's templates: ``prompts/`` relative to the current directory, looked up first (like
#: every relative path in a config, it is read from the directory flywheel runs in).
USER_TEMPLATE_DIR: Path = Path("prompts")

_UNDEFINED_NAME = re.compile(r"'([^']+)' is undefined")


def search_path(template_dir: str | Path | None = None) -> list[Path]:
    """The folders a template is looked up in, in order: ``[template_dir]`` when one is given,
    else ``./prompts`` (absolute, from the current directory) and then the packaged defaults."""
    if template_dir is not None:
        return [Path(template_dir)]
    return [USER_TEMPLATE_DIR.absolute(), TEMPLATE_DIR]


def available_templates(template_dir: str | Path | None = None) -> list[str]:
    """Sorted file names of the ``*.j2`` templates found in the search path (see
    ``search_path``); a name present in several folders is listed once."""
    names = {p.name for d in search_path(template_dir) if d.is_dir()
             for p in d.glob("*.j2") if p.is_file()}
    return sorted(names)


def find_template(name: str, template_dir: str | Path | None = None) -> Path:
    """The file template ``name`` resolves to: the first folder of the search path that has it.

    Raises FlywheelError naming every folder searched and the templates available."""
    folders = search_path(template_dir)
    if Path(name).name == name:
        for folder in folders:
            if (folder / name).is_file():
                return folder / name
    details = [f"searched: {', then '.join(str(f) for f in folders)}",
               f"available templates: {', '.join(available_templates(template_dir)) or '(none)'}"]
    if template_dir is not None:
        raise FlywheelError(f"unknown template {name!r} in {folders[0]}", details=details)
    details.append(f"to use a template of your own, put {name} in {folders[0]}, or name an "
                   "available one in the config")
    raise FlywheelError(f"unknown template {name!r}: not in prompts/ of the current directory "
                        "nor among flywheel's default templates", details=details)


def render(
    name: str, template_dir: str | Path | None = None, **variables: object
) -> str:
    """Render template ``name`` (e.g. ``"pairwise.j2"``) with ``variables``, stripped.

    Raises FlywheelError for an unknown template, a syntax error, or a variable
    the template uses but the caller did not pass.
    """
    path = find_template(name, template_dir)
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
                f"template file: {path}",
                f"given: {', '.join(sorted(variables)) or '(none)'}",
                f"jinja2: {exc}",
            ],
        ) from exc
    except jinja2.TemplateSyntaxError as exc:
        raise FlywheelError(
            f"template {name!r} has a syntax error at line {exc.lineno}: {exc.message}",
            details=[f"template file: {path}"],
        ) from exc
    return text.strip()


def template_hash(name: str, template_dir: str | Path | None = None) -> str:
    """First 16 hex chars of the sha256 of the bytes of the file ``name`` resolves to."""
    path = find_template(name, template_dir)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
