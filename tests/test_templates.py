"""Tests for flywheel.templates and the Jinja2 templates in prompts/."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from flywheel.errors import FlywheelError
from flywheel.parsing import parse_pairwise, parse_score
from flywheel.templates import TEMPLATE_DIR, available_templates, render, template_hash

TEMPLATES = ["pairwise.j2", "pairwise_brief.j2", "pointwise.j2", "pointwise_brief.j2",
             "self_instruct.j2"]


@pytest.fixture
def template_copy(tmp_path: Path) -> Path:
    """A private copy of the prompts/ directory that tests may modify."""
    target = tmp_path / "prompts"
    shutil.copytree(TEMPLATE_DIR, target)
    return target


def test_template_dir_is_repo_prompts() -> None:
    expected = Path(__file__).resolve().parent.parent / "prompts"
    assert expected == TEMPLATE_DIR
    assert (TEMPLATE_DIR / "README.md").is_file()


def test_available_templates() -> None:
    assert available_templates() == TEMPLATES
    assert available_templates("/nonexistent/dir") == []


def test_readme_documents_every_template() -> None:
    readme = (TEMPLATE_DIR / "README.md").read_text()
    for name in TEMPLATES:
        assert name in readme
    for token in ("[[A]]", "[[B]]", "[[C]]", "Score:"):
        assert token in readme


def test_self_instruct_renders_examples() -> None:
    examples = ["Write a poem about cats.", "Explain gravity to a child."]
    text = render("self_instruct.j2", examples=examples)
    assert "Task 1: Write a poem about cats." in text
    assert "Task 2: Explain gravity to a child." in text
    assert "ONE new task" in text
    assert text.endswith("Task 3:")
    assert text == text.strip()
    assert len(text.split()) < 80  # short enough for a 135M model


def test_pointwise_renders_rubric() -> None:
    text = render("pointwise.j2", prompt="What is 2+2?", response="It is 4.")
    assert "What is 2+2?" in text
    assert "It is 4." in text
    assert text.index("What is 2+2?") < text.index("It is 4.")
    assert "up to 100 words" in text
    assert "Score: <total points>" in text
    assert text.count("point") >= 5
    for phrase in (
        "relevant",
        "substantial portion",
        "basic elements",
        "AI Assistant's perspective",
        "impeccably tailored",
    ):
        assert phrase in text
    # The rubric itself must not parse as a verdict (the judge's score comes after it).
    assert not parse_score(text).ok


def test_pointwise_max_words() -> None:
    text = render("pointwise.j2", prompt="p", response="r", max_words=30)
    assert "up to 30 words" in text
    assert "up to 100 words" not in text


def test_pairwise_renders_a_before_b() -> None:
    text = render(
        "pairwise.j2",
        prompt="Name a colour.",
        response_a="RESPONSE-ALPHA",
        response_b="RESPONSE-BETA",
    )
    assert "Name a colour." in text
    assert (
        text.index("Name a colour.")
        < text.index("RESPONSE-ALPHA")
        < text.index("RESPONSE-BETA")
    )
    for token in ("[[A]]", "[[B]]", "[[C]]"):
        assert token in text
    assert "position" in text and "length" in text
    # The instructions list all three verdict formats in one paragraph: read as a verdict,
    # that paragraph is ambiguous, never a tie.
    r = parse_pairwise(text.split("[User Question]")[0])
    assert not r.ok and r.error.startswith("ambiguous")


def test_no_autoescape() -> None:
    text = render("pointwise.j2", prompt="<b>a & b</b>", response="x < y")
    assert "<b>a & b</b>" in text
    assert "x < y" in text


@pytest.mark.parametrize(
    ("name", "variables", "missing"),
    [
        ("pairwise.j2", {"prompt": "p", "response_a": "a"}, "response_b"),
        ("pairwise.j2", {"response_a": "a", "response_b": "b"}, "prompt"),
        ("pointwise.j2", {"prompt": "p"}, "response"),
        ("self_instruct.j2", {}, "examples"),
    ],
)
def test_missing_variable_raises(
    name: str, variables: dict[str, object], missing: str
) -> None:
    with pytest.raises(FlywheelError) as info:
        render(name, **variables)
    message = str(info.value)
    assert name in message
    assert f"'{missing}'" in message


def test_unknown_template_lists_available() -> None:
    with pytest.raises(FlywheelError) as info:
        render("nope.j2")
    message = str(info.value)
    assert "'nope.j2'" in message
    for name in TEMPLATES:
        assert name in message


def test_unknown_template_in_custom_dir(tmp_path: Path) -> None:
    (tmp_path / "only.j2").write_text("hi {{ who }}")
    with pytest.raises(FlywheelError, match=r"available templates: only\.j2"):
        render("pairwise.j2", template_dir=tmp_path)
    assert render("only.j2", template_dir=tmp_path, who="there") == "hi there"
    assert render("only.j2", template_dir=str(tmp_path), who="there") == "hi there"


def test_path_outside_dir_is_unknown(tmp_path: Path) -> None:
    with pytest.raises(FlywheelError, match="unknown template"):
        render("../README.md", template_dir=tmp_path)


def test_syntax_error_raises(tmp_path: Path) -> None:
    (tmp_path / "bad.j2").write_text("{% if %}")
    with pytest.raises(FlywheelError, match=r"'bad\.j2' has a syntax error"):
        render("bad.j2", template_dir=tmp_path)


def test_result_is_stripped(tmp_path: Path) -> None:
    (tmp_path / "pad.j2").write_text("\n\n  {{ x }}  \n\n")
    assert render("pad.j2", template_dir=tmp_path, x="v") == "v"


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_hash_is_stable(name: str, template_copy: Path) -> None:
    digest = template_hash(name)
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert template_hash(name) == digest
    assert template_hash(name, template_dir=template_copy) == digest


def test_template_hash_changes_with_file(template_copy: Path) -> None:
    before = template_hash("pairwise.j2", template_dir=template_copy)
    path = template_copy / "pairwise.j2"
    path.write_bytes(path.read_bytes() + b"\n")
    after = template_hash("pairwise.j2", template_dir=template_copy)
    assert after != before
    assert template_hash("pairwise.j2") == before  # the original is untouched


def test_template_hash_unknown() -> None:
    with pytest.raises(FlywheelError, match="unknown template"):
        template_hash("missing.j2")


def test_render_sees_modified_template(template_copy: Path) -> None:
    (template_copy / "pairwise.j2").write_text("A={{ response_a }} B={{ response_b }}")
    assert (
        render(
            "pairwise.j2", template_dir=template_copy, response_a="1", response_b="2"
        )
        == "A=1 B=2"
    )
