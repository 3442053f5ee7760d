"""Preflight loads what the run will use before anything is written: each model's config.json,
tokenizer and weight-file headers, and each prompt file in full with every prompt's length in
tokens. Broken inputs go through the real CLI: exit 2, the message names the file (and line)
and a fix, the catalog is unchanged, no lock or cache is written, the model folder is untouched.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from flywheel.config import load_config
from flywheel.errors import FlywheelError
from flywheel.modelprep import config_problems, weight_problems
from flywheel.pipeline import preflight
from tests.conftest import ROOT, catalog_state, one_version_catalog, run_cli

KEY = "prompts.max_prompt_tokens"
FIX_WEIGHTS = "copy or download it again"


@pytest.fixture(scope="module")
def sharded_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model saved as a real sharded checkpoint (an index and two or more shards)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(out, max_shard_size="1MB")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    return out


def _workspace(root: Path) -> Path:
    """A workspace whose catalog already holds one version (nothing may be lost)."""
    ws = root / "ws"
    one_version_catalog(ws / "flywheel.duckdb")
    return ws


def _files(folder: Path) -> dict:
    """What must not change in a model folder: every file's name, size and mtime."""
    if not folder.is_dir():
        return {"file": folder.stat().st_size} if folder.exists() else {}
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def _jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


# -- how each case breaks its input -----------------------------------------------------------
# A case gets (tmp folder, an intact copy of the tiny model, the sharded model) and returns
# (extra CLI args, fragments the message must hold); `{m}` in a fragment is the model folder.
Case = Callable[[Path, Path, Path], tuple[list[str], list[str]]]


def _policy(m: Path) -> list[str]:
    return ["--set", f"models.policy={m}"]


def no_weights(tmp, m, sharded):
    (m / "model.safetensors").unlink()
    return _policy(m), [f"models.policy: {m} has no weight files",
                        "model.save_pretrained(folder)"]


def corrupt_config(tmp, m, sharded):
    (m / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 64,,\n}')
    return _policy(m), [f"models.policy: {m}/config.json is not valid JSON",
                        "at line 2, column 21", "copy config.json again"]


def config_is_a_list(tmp, m, sharded):
    (m / "config.json").write_text("[1, 2]")
    return _policy(m), [f"{m}/config.json holds a JSON list, not an object",
                        "copy config.json again"]


def config_without_model_type(tmp, m, sharded):
    (m / "config.json").write_text('{"hidden_size": 64}')
    return _policy(m), [f'{m}/config.json has no "model_type"', "copy config.json again"]


def config_missing(tmp, m, sharded):
    (m / "config.json").unlink()
    return _policy(m), [f"models.policy: {m}/config.json is missing", "flywheel setup-model"]


def config_not_utf8(tmp, m, sharded):
    (m / "config.json").write_bytes(b'{"model_type": "\xff"}')
    return _policy(m), [f"{m}/config.json is not UTF-8 text", "copy config.json again"]


def truncated_safetensors(tmp, m, sharded):
    f = m / "model.safetensors"
    size = f.stat().st_size
    with f.open("r+b") as fh:
        fh.truncate(5_000_000)
    return _policy(m), [f"{f} is truncated: 5,000,000 bytes, its header says {size:,}",
                        FIX_WEIGHTS]


def safetensors_cut_inside_header(tmp, m, sharded):
    f = m / "model.safetensors"
    with f.open("r+b") as fh:
        fh.truncate(100)
    return _policy(m), [f"{f} is not a complete safetensors file (100 bytes", FIX_WEIGHTS]


def safetensors_damaged_header(tmp, m, sharded):
    f = m / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"%%%%"  # the JSON header no longer parses
    f.write_bytes(bytes(data))
    return _policy(m), [f"{f} has a damaged safetensors header", FIX_WEIGHTS]


def safetensors_with_trailing_bytes(tmp, m, sharded):
    f = m / "model.safetensors"
    with f.open("ab") as fh:
        fh.write(b"\0" * 10)
    return _policy(m), [f"{f} has 10 bytes after its last tensor", FIX_WEIGHTS]


def _sharded_copy(tmp: Path, sharded: Path) -> tuple[Path, list[str]]:
    m = tmp / "sharded-copy"
    shutil.copytree(sharded, m)
    index = json.loads((m / "model.safetensors.index.json").read_text())
    return m, sorted(set(index["weight_map"].values()))


def missing_shard(tmp, m, sharded):
    m, shards = _sharded_copy(tmp, sharded)
    (m / shards[-1]).unlink()
    return _policy(m), [f"models.policy: {m / shards[-1]} is missing: "
                        f"model.safetensors.index.json names it as one of {len(shards)} shards",
                        "copy every shard the index lists"]


def truncated_shard(tmp, m, sharded):
    m, shards = _sharded_copy(tmp, sharded)
    with (m / shards[0]).open("r+b") as fh:
        fh.truncate((m / shards[0]).stat().st_size - 4)
    return _policy(m), [f"{m / shards[0]} is truncated", FIX_WEIGHTS]


def corrupt_index(tmp, m, sharded):
    m, _ = _sharded_copy(tmp, sharded)
    (m / "model.safetensors.index.json").write_text('{"weight_map": ')
    return _policy(m), [f"{m}/model.safetensors.index.json is not valid JSON",
                        "copy the index again with its shards"]


def index_without_weight_map(tmp, m, sharded):
    m, _ = _sharded_copy(tmp, sharded)
    (m / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return _policy(m), [f'{m}/model.safetensors.index.json has no "weight_map"',
                        "copy the index again with its shards"]


def _torch_bin(m: Path) -> Path:
    import torch

    (m / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(64)}, m / "pytorch_model.bin")
    return m / "pytorch_model.bin"


def truncated_bin(tmp, m, sharded):
    f = _torch_bin(m)
    with f.open("r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return _policy(m), [f"{f} is truncated or damaged", FIX_WEIGHTS]


def empty_bin(tmp, m, sharded):
    f = _torch_bin(m)
    f.write_bytes(b"")
    return _policy(m), [f"{f} is empty", FIX_WEIGHTS]


def tokenizer_missing(tmp, m, sharded):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (m / name).unlink()
    return _policy(m), [f"models.policy: cannot load the tokenizer of {m}",
                        "no tokenizer file there", "tokenizer.save_pretrained(folder)"]


def tokenizer_corrupt(tmp, m, sharded):
    (m / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return _policy(m), [f"models.policy: cannot load the tokenizer of {m}",
                        "tokenizer.save_pretrained(folder)"]


def no_chat_template(tmp, m, sharded):
    (m / "chat_template.jinja").unlink()
    return _policy(m), [f"models.policy: the tokenizer of {m} has no chat template",
                        "copy chat_template.jinja"]


def generator_is_a_file(tmp, m, sharded):
    f = tmp / "generator.bin"
    f.write_text("not a folder")
    return _policy(m) + ["--set", f"models.generator={f}"], [
        f"models.generator: model path '{f}' is a file, not a checkpoint folder",
        "point models.generator at the folder that holds config.json"]


def judge_missing(tmp, m, sharded):
    j = tmp / "no-such-judge"
    return _policy(m) + ["--set", f"models.judge={j}"], [
        f"models.judge: model path '{j}' does not exist", "flywheel setup-model"]


def judge_without_weights(tmp, m, sharded):
    j = tmp / "judge"
    shutil.copytree(m, j)
    (j / "model.safetensors").unlink()
    return _policy(m) + ["--set", f"models.judge={j}"], [
        f"models.judge: {j} has no weight files", "model.save_pretrained(folder)"]


def generator_with_truncated_weights(tmp, m, sharded):
    g = tmp / "generator"
    shutil.copytree(m, g)
    with (g / "model.safetensors").open("r+b") as fh:
        fh.truncate(1_000_000)
    return _policy(m) + ["--set", f"models.generator={g}"], [
        f"models.generator: {g}/model.safetensors is truncated: 1,000,000 bytes", FIX_WEIGHTS]


def seed_line_of_a_megabyte(tmp, m, sharded):
    seeds = _jsonl(tmp / "seeds.jsonl", ["What is rain?", "x" * (1 << 20), "Why is the sky blue?"])
    return _policy(m) + ["--set", f"prompts.seed_file={seeds}"], [
        f"prompt file {seeds}: 1 prompt is longer than {KEY} (1,024 tokens)",
        f"{seeds} line 2: the prompt is at least 12,946 tokens, over the limit of 1,024",
        f"shorten it, or raise the limit with --set {KEY}=N"]


def eval_line_too_long(tmp, m, sharded):
    ev = _jsonl(tmp / "eval.jsonl", ["What is rain?", "Name a river.", "rain " * 1500])
    return _policy(m) + ["--set", f"eval.prompts_file={ev}"], [
        f"{ev} line 3: the prompt is 1,500 tokens, over the limit of 1,024 ({KEY})",
        f"--set {KEY}=N"]


def seed_line_over_a_lower_limit(tmp, m, sharded):
    seeds = _jsonl(tmp / "seeds.jsonl", ["Name a river.",
                                         "Explain, in plain words, how the water cycle works."])
    ev = _jsonl(tmp / "eval.jsonl", ["What is rain?"])
    return _policy(m) + ["--set", f"prompts.seed_file={seeds}", "--set",
                         f"eval.prompts_file={ev}", "--set", f"{KEY}=8"], [
        f"{seeds} line 2: the prompt is 12 tokens, over the limit of 8 ({KEY})",
        f"--set {KEY}=N"]


def many_lines_too_long(tmp, m, sharded):
    seeds = _jsonl(tmp / "seeds.jsonl", ["ok"] + ["word " * 1100] * 25)
    return _policy(m) + ["--set", f"prompts.seed_file={seeds}"], [
        f"prompt file {seeds}: 25 prompts are longer than {KEY}",
        f"{seeds} line 2: the prompt is", f"{seeds} line 21: the prompt is", "and 5 more",
        f"--set {KEY}=N"]


def every_problem_at_once(tmp, m, sharded):
    (m / "tokenizer.json").unlink()
    (m / "tokenizer_config.json").unlink()
    (m / "model.safetensors").unlink()
    f = tmp / "generator.txt"
    f.write_text("x")
    seeds = tmp / "seeds.jsonl"
    seeds.write_text('{"prompt": "What is rain?"}\n{"prompt": "broken",\n')
    return _policy(m) + ["--set", f"models.generator={f}", "--set",
                         f"prompts.seed_file={seeds}"], [
        f"cannot load the tokenizer of {m}", f"{m} has no weight files",
        f"models.generator: model path '{f}' is a file", f"{seeds} line 2: not valid JSON"]


CASES: list[Case] = [
    no_weights, corrupt_config, config_is_a_list, config_without_model_type, config_missing,
    config_not_utf8, truncated_safetensors, safetensors_cut_inside_header,
    safetensors_damaged_header, safetensors_with_trailing_bytes, missing_shard,
    truncated_shard, corrupt_index, index_without_weight_map, truncated_bin, empty_bin,
    tokenizer_missing, tokenizer_corrupt, no_chat_template, generator_is_a_file, judge_missing,
    judge_without_weights, generator_with_truncated_weights, seed_line_of_a_megabyte,
    eval_line_too_long, seed_line_over_a_lower_limit, many_lines_too_long,
    every_problem_at_once,
]


#: cases also run as a separate `python -m flywheel.cli` process (the rest call `cli.main`,
#: the same entry point, in this process: the same parsing, checks, message and exit code,
#: without paying the torch import of a tokenizer load per case)
SUBPROCESS = ("truncated_safetensors", "missing_shard", "tokenizer_missing",
              "seed_line_of_a_megabyte", "every_problem_at_once")
RUNS = [pytest.param(case, False, id=case.__name__) for case in CASES] + [
    pytest.param(case, True, id=f"{case.__name__}-subprocess")
    for case in CASES if case.__name__ in SUBPROCESS]


def _iterate(ws: Path, args: list[str], subprocess: bool, capsys) -> tuple[int, str]:
    """`flywheel iterate --rounds 1 --no-prefect` on the workspace: (exit code, stderr)."""
    argv = ["iterate", "--rounds", "1", "--no-prefect", "--set", f"workspace={ws}", *args]
    if subprocess:
        proc = run_cli(*argv, timeout=180)
        return proc.returncode, proc.stderr
    from flywheel.cli import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.badinput
@pytest.mark.parametrize(("case", "subprocess"), RUNS)
def test_broken_input_is_refused_before_anything_is_written(case: Case, subprocess: bool,
                                                            tiny_model, sharded_model,
                                                            tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the default prompt files are relative to the project
    ws = _workspace(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    args, fragments = case(tmp_path, model, sharded_model)
    folders = [Path(a.split("=", 1)[1]) for a in args if a.startswith("models.")]
    before = catalog_state(ws / "flywheel.duckdb")
    files = {f: _files(f) for f in folders}
    code, err = _iterate(ws, args, subprocess, capsys)
    assert code == 2, err[-3000:]
    assert err.startswith("error: cannot start: nothing was written"), err[-3000:]
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert "Traceback" not in err
    assert catalog_state(ws / "flywheel.duckdb") == before
    assert sorted(p.name for p in ws.iterdir()) == ["flywheel.duckdb"]  # no lock, no cache
    assert {f: _files(f) for f in folders} == files
    assert not any((f / ".flywheel-hash").exists() for f in folders)


@pytest.mark.badinput
def test_a_limit_of_zero_is_a_config_error(tmp_path):
    ws = _workspace(tmp_path)
    before = catalog_state(ws / "flywheel.duckdb")
    proc = run_cli("iterate", "--rounds", "1", "--no-prefect", "--set", f"workspace={ws}",
                   "--set", f"{KEY}=0", timeout=60)
    assert proc.returncode == 2
    assert f"--set: {KEY}: must be > 0, got 0" in proc.stderr
    assert catalog_state(ws / "flywheel.duckdb") == before


# -- what passes, in process ------------------------------------------------------------------
def _cfg(tmp_path: Path, policy: Path, *sets: str):
    return load_config(None, [f"models.policy={policy}", f"workspace={tmp_path / 'ws'}", *sets])


def test_intact_checkpoints_pass_and_nothing_is_written(tiny_model, sharded_model, tmp_path):
    before = {m: _files(m) for m in (tiny_model, sharded_model)}
    preflight(_cfg(tmp_path, tiny_model, f"models.judge={sharded_model}",
                   f"models.generator={sharded_model}"))
    assert {m: _files(m) for m in (tiny_model, sharded_model)} == before
    assert not (tmp_path / "ws").exists()


def test_the_bundled_prompt_files_fit_the_default_limit(tiny_model, tmp_path):
    preflight(_cfg(tmp_path, tiny_model))  # data/seed_prompts.jsonl, data/eval_prompts.jsonl


def test_a_readable_pytorch_bin_passes(tiny_model, tmp_path):
    m = tmp_path / "model"
    shutil.copytree(tiny_model, m)
    _torch_bin(m)
    assert weight_problems(m, "models.policy") == []
    with zipfile.ZipFile(m / "pytorch_model.bin") as zf:
        assert zf.namelist()


def test_the_length_limit_counts_with_the_policy_tokenizer(tiny_model, tmp_path):
    seeds = _jsonl(tmp_path / "seeds.jsonl", ["Explain, in plain words, how the water cycle "
                                              "works."])
    ev = _jsonl(tmp_path / "eval.jsonl", ["What is rain?"])
    cfg = _cfg(tmp_path, tiny_model, f"prompts.seed_file={seeds}", f"eval.prompts_file={ev}")
    for limit, fits in ((12, True), (11, False)):
        cfg.prompts.max_prompt_tokens = limit
        if fits:
            preflight(cfg)
        else:
            with pytest.raises(FlywheelError, match="is 12 tokens, over the limit of 11"):
                preflight(cfg)


def test_config_problems_read_no_weights(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text('{"model_type": "llama"}')
    assert config_problems(m, "models.policy") == []
    assert weight_problems(m, "models.policy")[0].startswith(
        f"models.policy: {m} has no weight files")
