"""Tests for flywheel.config: defaults, YAML diffs, --set overrides, error reporting."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from flywheel.config import (
    Config,
    config_reference,
    dump_yaml,
    load_config,
    validate,
)
from flywheel.errors import FlywheelError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    """Write a dedented YAML file and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(path: Path | None = None, overrides: tuple[str, ...] = ()) -> str:
    """The message of the FlywheelError that loading raises."""
    with pytest.raises(FlywheelError) as info:
        load_config(path, overrides)
    return str(info.value)


# --------------------------------------------------------------------------- loading


def test_defaults_load() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.sampling.n == 4
    assert cfg.train.loss_type == ["sigmoid"]
    assert cfg.models.judge.path == ""
    assert validate(cfg) == []


def test_paths() -> None:
    cfg = load_config(overrides=["workspace=runs/x"])
    assert cfg.catalog_path() == Path("runs/x/flywheel.duckdb")
    assert cfg.models_dir() == Path("runs/x/models")
    cfg = load_config(overrides=["workspace=runs/x", "catalog=elsewhere/c.duckdb"])
    assert cfg.catalog_path() == Path("elsewhere/c.duckdb")


def test_list_defaults_are_not_shared() -> None:
    a, b = Config(), Config()
    a.train.lora_targets.append("gate_proj")
    assert b.train.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_yaml_diff_merges_section_by_section(tmp_path: Path) -> None:
    path = write(tmp_path, """
        sampling:
          n: 8
        train:
          beta: 0.2
          lora_targets: [q_proj]
    """)
    cfg = load_config(path)
    assert cfg.sampling.n == 8
    assert cfg.sampling.temperature == 0.7  # untouched sibling keeps its default
    assert cfg.train.beta == 0.2
    assert cfg.train.lora_targets == ["q_proj"]
    assert cfg.judge == Config().judge


def test_empty_file_and_empty_section_are_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "sampling:\n", "b.yaml")) == Config()


def test_overrides_parse_types(tmp_path: Path) -> None:
    path = write(tmp_path, "sampling:\n  n: 8\n")
    cfg = load_config(path, [
        "sampling.n=6",
        "sampling.temperature=1",
        "train.learning_rate=1e-4",
        "train.lora_targets=[q_proj,v_proj]",
        "models.judge=",
        "judge.verifiers=false",
        "models.policy=123",
    ])
    assert cfg.sampling.n == 6 and isinstance(cfg.sampling.n, int)  # --set beats the file
    assert cfg.sampling.temperature == 1.0 and isinstance(cfg.sampling.temperature, float)
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.lora_targets == ["q_proj", "v_proj"]
    assert cfg.models.judge.path == ""
    assert cfg.judge.verifiers is False
    assert cfg.models.policy.path == "123"  # a str setting takes the text as written


def test_override_can_set_a_section_mapping() -> None:
    cfg = load_config(overrides=["sampling={n: 2, top_p: 0.5}"])
    assert (cfg.sampling.n, cfg.sampling.top_p, cfg.sampling.max_new_tokens) == (2, 0.5, 96)


def test_ints_accepted_for_floats_and_yaml_scientific_strings(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train:\n  epochs: 2\n  learning_rate: 2e-4\n"))
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.train.learning_rate == pytest.approx(2e-4)


# --------------------------------------------------------------------------- errors


def test_unknown_key_names_dotted_key_valid_keys_and_suggestion(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "sampling:\n  temprature: 0.5\n"))
    assert "cfg.yaml" in message
    assert "sampling.temprature: unknown key" in message
    assert "valid keys in 'sampling': n, temperature, top_p, max_new_tokens, prompts_per_round" \
        in message
    assert "did you mean 'sampling.temperature'?" in message


def test_unknown_top_level_key_suggests_its_section() -> None:
    message = error_of(overrides=("n=4",))
    assert "--set: n: unknown key" in message
    assert "valid keys at the top level:" in message
    assert "'sampling.n'" in message


def test_wrong_type_message_exact(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "sampling:\n  n: four\n"))
    assert "cfg.yaml: sampling.n: expected int, got str 'four'" in message
    assert "sampling.n: expected int, got str 'four'" in error_of(overrides=("sampling.n=four",))


def test_bool_is_not_an_int() -> None:
    assert "judge.samples: expected int, got bool True" in error_of(
        overrides=("judge.samples=true",))
    assert "train.beta: expected float, got bool False" in error_of(
        overrides=("train.beta=false",))


def test_list_items_are_checked() -> None:
    message = error_of(overrides=("train.lora_targets=[q_proj, 3]",))
    assert "train.lora_targets: expected list[str], but item 1 is int 3" in message
    message = error_of(overrides=("train.loss_type=ipo",))
    assert "train.loss_type: expected list[str], got str 'ipo' (write [ipo])" in message


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    assert "models: expected a mapping of settings, got int 5" in error_of(
        write(tmp_path, "models: 5\n"))


def test_all_errors_reported_in_one_exception(tmp_path: Path) -> None:
    path = write(tmp_path, """
        sampling:
          temprature: 0.5
          n: four
        judge:
          mode: best
          samples: true
    """)
    message = error_of(path, ("train.beta=-1", "sampling.top_p"))
    assert "invalid configuration (6 problems):" in message
    for part in (
        "cfg.yaml: sampling.temprature: unknown key",
        "cfg.yaml: sampling.n: expected int, got str 'four'",
        "cfg.yaml: judge.mode: 'best' is not one of: pointwise, pairwise, hybrid",
        "cfg.yaml: judge.samples: expected int, got bool True",
        "--set: train.beta: must be > 0, got -1.0",
        "--set sampling.top_p: expected KEY=VALUE",
    ):
        assert part in message


def test_bad_choice_lists_choices() -> None:
    message = error_of(overrides=("judge.mode=best",))
    assert "--set: judge.mode: 'best' is not one of: pointwise, pairwise, hybrid" in message
    message = error_of(overrides=("train.loss_type=[sigmoid, dpo]",))
    assert "train.loss_type: 'dpo' is not one of: sigmoid, hinge, ipo" in message


def test_override_without_equals() -> None:
    assert "--set sampling.n: expected KEY=VALUE" in error_of(overrides=("sampling.n",))


def test_override_with_unparsable_value() -> None:
    message = error_of(overrides=("sampling.n=[1,",))
    assert "--set: sampling.n: cannot parse value" in message


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    message = error_of(missing)
    assert f"{missing}: config file not found" in message
    assert "--config" in message


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "sampling:\n  n: 4\n   bad: [\n")
    message = error_of(path)
    assert "cfg.yaml: YAML syntax error at line 3" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "- a\n- b\n"))
    assert "cfg.yaml: the top level must be a mapping" in message


@pytest.mark.parametrize(("override", "expected"), [
    ("sampling.top_p=0", "sampling.top_p: must be in (0, 1], got 0.0"),
    ("prompts.top_p=1.5", "prompts.top_p: must be in (0, 1], got 1.5"),
    ("sampling.temperature=-0.1", "sampling.temperature: must be >= 0, got -0.1"),
    ("pairs.min_length_ratio=-0.5", "pairs.min_length_ratio: must be >= 0, got -0.5"),
    ("prompts.constraint_prob=1.2", "prompts.constraint_prob: must be in [0, 1], got 1.2"),
    ("prompts.dedupe_threshold=0", "prompts.dedupe_threshold: must be in (0, 1], got 0.0"),
    ("models.batch_size=0", "models.batch_size: must be > 0, got 0"),
    ("train.lora_r=0", "train.lora_r: must be > 0, got 0"),
    ("train.epochs=0", "train.epochs: must be > 0, got 0.0"),
    ("judge.max_new_tokens=0", "judge.max_new_tokens: must be > 0, got 0"),
    ("models.device=tpu", "models.device: 'tpu' is not one of: cpu, cuda, cuda:N, auto"),
    ("models.dtype=int8", "models.dtype: 'int8' is not one of: float32, bfloat16, float16"),
    ("train.method=ppo", "train.method: 'ppo' is not one of: dpo, spin"),
    ("judge.verdict=vibes", "judge.verdict: 'vibes' is not one of: text, logprobs"),
    ("models.backend=tgi", "models.backend: 'tgi' is not one of: transformers, vllm"),
])
def test_value_checks(override: str, expected: str) -> None:
    assert f"--set: {expected}" in error_of(overrides=(override,))


def test_cross_field_problem_blames_the_source_that_set_it(tmp_path: Path) -> None:
    path = write(tmp_path, "prompts:\n  max_chars: 10\n")
    message = error_of(path, ("seed=1",))
    assert "cfg.yaml: prompts.max_chars: must be >= prompts.min_chars (16), got 10" in message
    message = error_of(None, ("seed=1", "prompts.min_chars=500"))
    assert "--set: prompts.max_chars: must be >= prompts.min_chars (500), got 400" in message


def test_import_is_light() -> None:
    heavy = "{'torch', 'transformers', 'prefect'}"
    code = f"import sys, flywheel.config; sys.exit(bool({heavy} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO).returncode == 0


def test_validate_returns_messages() -> None:
    cfg = Config()
    cfg.judge.mode = "best"
    cfg.sampling.n = 0
    problems = validate(cfg)
    assert "judge.mode: 'best' is not one of: pointwise, pairwise, hybrid" in problems
    assert "sampling.n: must be > 0, got 0" in problems


def test_constraint_types_checked_against_library(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("flywheel.constraints")
    fake.CONSTRAINTS = {"word_count": object(), "no_commas": object()}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flywheel.constraints", fake)
    cfg = load_config(overrides=["prompts.constraint_types=[no_commas]"])
    assert cfg.prompts.constraint_types == ["no_commas"]
    message = error_of(overrides=("prompts.constraint_types=[no_comas]",))
    assert "unknown constraint type(s) 'no_comas'; known: no_commas, word_count" in message


def test_constraint_check_skipped_without_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flywheel.constraints", None)  # import raises ImportError
    cfg = load_config(overrides=["prompts.constraint_types=[anything]"])
    assert cfg.prompts.constraint_types == ["anything"]


# --------------------------------------------------------------------------- shipped files


def test_configs_are_shipped() -> None:
    names = {p.name for p in SHIPPED}
    assert {"demo.yaml", "spin.yaml", "self_rewarding.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert validate(cfg) == []


def test_demo_config_starts_with_its_command() -> None:
    first = (REPO / "configs" / "demo.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert "flywheel iterate --rounds 3 --config configs/demo.yaml" in first


def test_spin_config_selects_spin() -> None:
    assert load_config(REPO / "configs" / "spin.yaml").train.method == "spin"


# --------------------------------------------------------------------------- reference & dumps


def _leaf_keys(obj: object, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_config_reference_covers_every_field() -> None:
    reference = config_reference()
    keys = [row[0] for row in reference]
    assert keys == _leaf_keys(Config())
    assert len(keys) == len(set(keys))
    for key, type_name, default, help_text in reference:
        assert type_name in {"str", "int", "float", "bool", "list[str]", "list[float]",
                             "dict"}, key
        assert default, key
        assert help_text.strip(), f"{key} has no help text"
    rows = {row[0]: row for row in reference}
    assert rows["sampling.n"] == ("sampling.n", "int", "4", "Candidate answers per prompt.")
    assert "One of: pointwise, pairwise, hybrid." in rows["judge.mode"][3]


def test_section_docstrings_list_fields() -> None:
    assert "prompts_per_round (int, default 32)" in (Config().sampling.__doc__ or "")


def test_section_accessor() -> None:
    cfg = Config()
    assert cfg.section("sampling")["n"] == 4
    with pytest.raises(FlywheelError, match="unknown config section 'smapling'"):
        cfg.section("smapling")


def test_to_dict_round_trips_through_dump_yaml(tmp_path: Path) -> None:
    cfg = load_config(overrides=[
        "sampling.n=7", "train.learning_rate=3e-6", "models.judge=judges/x",
        "train.loss_type=[sigmoid, sft]", "progress=false", "prompts.constraint_types=[]",
    ])
    path = tmp_path / "dump.yaml"
    path.write_text(dump_yaml(cfg), encoding="utf-8")
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()
    assert again == cfg
