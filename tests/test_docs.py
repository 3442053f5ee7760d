"""Docs that are checked: every config field and every CLI command appear in the README, the
README's first commands are the demo and the tests, and every template is documented."""

from __future__ import annotations

import re

from flywheel.cli import COMMANDS
from flywheel.config import config_reference
from flywheel.templates import TEMPLATE_DIR, available_templates
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_documents_every_config_field():
    missing = [key for key, *_ in config_reference() if f"`{key}`" not in README]
    assert missing == []


def test_readme_mentions_every_command():
    missing = [c for c in COMMANDS if f"flywheel {c}" not in README]
    assert missing == []


def test_readme_opens_with_demo_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands[:2] == ["make demo", "make test"]


def test_every_template_is_documented():
    doc = (TEMPLATE_DIR / "README.md").read_text()
    assert [t for t in available_templates() if f"`{t}`" not in doc] == []


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
