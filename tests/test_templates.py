"""Tests for flywheel.templates and the Jinja2 templates: the defaults shipped in the package
(flywheel/default_prompts/), their copies in the top-level prompts/, and the lookup order
(./prompts of the current directory first, then the package)."""

from __future__ import annotations

import fnmatch
import hashlib
import re
import shutil
from pathlib import Path

import pytest

from flywheel.errors import FlywheelError
from flywheel.parsing import parse_pairwise, parse_score
from flywheel.templates import (
    TEMPLATE_DIR,
    available_templates,
    find_template,
    render,
    search_path,
    template_hash,
)

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ["pairwise.j2", "pairwise_brief.j2", "pointwise.j2", "pointwise_brief.j2",
             "self_instruct.j2"]
#: The defaults' hashes: they are part of every judgment's fingerprint, so a change here means
#: every judgment made with that template is recomputed (say so in the CHANGELOG).
DEFAULT_HASHES = {"pairwise.j2": "30ce3b93ec260597", "pairwise_brief.j2": "ead672c94a7aec46",
                  "pointwise.j2": "249db6e337854d28", "pointwise_brief.j2": "eeb1d3fd09e0a4fb",
                  "self_instruct.j2": "5af20b336d626c23"}


@pytest.fixture
def template_copy(tmp_path: Path) -> Path:
    """A private copy of the default templates that tests may modify."""
    target = tmp_path / "prompts"
    shutil.copytree(TEMPLATE_DIR, target)
    return target


def test_template_dir_is_package_data() -> None:
    assert TEMPLATE_DIR == ROOT / "flywheel" / "default_prompts"
    assert (TEMPLATE_DIR / "README.md").is_file()
    assert sorted(p.name for p in TEMPLATE_DIR.glob("*.j2")) == TEMPLATES


def test_top_level_prompts_equal_the_packaged_defaults() -> None:
    """The top-level prompts/ is what users read: byte for byte the shipped defaults (their
    hashes are in the judgments' fingerprints), README included, no file on one side only."""
    top = ROOT / "prompts"
    names = sorted(p.name for p in top.iterdir() if p.is_file())
    assert names == sorted(p.name for p in TEMPLATE_DIR.iterdir() if p.is_file())
    assert names == ["README.md", *TEMPLATES]
    differ = [n for n in names if (top / n).read_bytes() != (TEMPLATE_DIR / n).read_bytes()]
    assert differ == [], "copy prompts/ to flywheel/default_prompts/ (or back)"


def test_pyproject_ships_the_defaults() -> None:
    """The package data rule covers every file of the defaults folder."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["flywheel.default_prompts"]
    shipped = [p.name for p in TEMPLATE_DIR.iterdir() if p.is_file()
               and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    assert sorted(shipped) == ["README.md", *TEMPLATES]


@pytest.mark.parametrize("name", TEMPLATES)
def test_default_template_hashes_are_unchanged(name: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no prompts/ here: the packaged default
    assert template_hash(name) == DEFAULT_HASHES[name]
    monkeypatch.chdir(ROOT)  # the repository's prompts/: the same bytes, the same hash
    assert find_template(name) == ROOT / "prompts" / name
    assert template_hash(name) == DEFAULT_HASHES[name]


def test_available_templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert available_templates("/nonexistent/dir") == []
    monkeypatch.chdir(tmp_path)
    assert available_templates() == TEMPLATES
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "mine.j2").write_text("x")
    (tmp_path / "prompts" / "pairwise.j2").write_text("y")
    (tmp_path / "prompts" / "notes.txt").write_text("z")
    assert available_templates() == sorted([*TEMPLATES, "mine.j2"])


def test_search_path_is_read_at_call_time(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert search_path() == [tmp_path / "prompts", TEMPLATE_DIR]
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert search_path() == [tmp_path / "sub" / "prompts", TEMPLATE_DIR]
    assert search_path(tmp_path) == [tmp_path]
    assert search_path(str(tmp_path)) == [tmp_path]


def test_outside_the_repository_the_packaged_defaults_render(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_template("pointwise_brief.j2") == TEMPLATE_DIR / "pointwise_brief.j2"
    text = render("pointwise_brief.j2", prompt="What is 2+2?", response="It is 4.")
    assert "What is 2+2?" in text and "It is 4." in text


def test_user_prompts_folder_overrides_one_template(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """./prompts/pairwise.j2 replaces the default pairwise template (and its hash); the
    templates it does not hold still come from the package."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    mine = tmp_path / "prompts" / "pairwise.j2"
    mine.write_text("Q={{ prompt }} A={{ response_a }} B={{ response_b }}\n")
    assert find_template("pairwise.j2") == mine
    assert render("pairwise.j2", prompt="q", response_a="1", response_b="2") == "Q=q A=1 B=2"
    expected = hashlib.sha256(mine.read_bytes()).hexdigest()[:16]
    assert template_hash("pairwise.j2") == expected != DEFAULT_HASHES["pairwise.j2"]
    assert find_template("pointwise.j2") == TEMPLATE_DIR / "pointwise.j2"
    assert template_hash("pointwise.j2") == DEFAULT_HASHES["pointwise.j2"]
    mine.unlink()  # removed again: back to the default
    assert template_hash("pairwise.j2") == DEFAULT_HASHES["pairwise.j2"]


def test_unknown_template_names_both_folders(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "mine.j2").write_text("x")
    with pytest.raises(FlywheelError) as info:
        render("nope.j2", prompt="p")
    message = str(info.value)
    assert message.splitlines()[0] == (
        "unknown template 'nope.j2': not in prompts/ of the current directory nor among "
        "flywheel's default templates")
    assert f"searched: {tmp_path / 'prompts'}, then {TEMPLATE_DIR}" in message
    assert f"available templates: {', '.join(sorted([*TEMPLATES, 'mine.j2']))}" in message
    assert f"put nope.j2 in {tmp_path / 'prompts'}" in message


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
