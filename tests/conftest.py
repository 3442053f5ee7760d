"""Shared fixtures: a tiny random Llama built from a config (with the bundled tokenizer), and
a helper that runs the real `flywheel` CLI in a subprocess."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "SmolLM2-135M-Instruct"


def tiny_llama(out: Path, context: int = 2048) -> Path:
    """Save a 2-layer, 64-wide random Llama with SmolLM2's tokenizer and chat template, with
    `context` positions, to `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(BUNDLED)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=context, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer and chat template."""
    if not (BUNDLED / "config.json").is_file():
        pytest.skip("bundled model not converted: run `make setup`")
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 900, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run `python -m flywheel.cli ARGS` and return the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def tiny_catalog(tiny_model, tmp_path_factory) -> Path:
    """A catalog made by two real rounds of the tiny model (no Prefect): copy it before
    writing to it."""
    ws = tmp_path_factory.mktemp("tiny-ws")
    proc = run_cli("iterate", "--rounds", "2", "--no-prefect", "--config", "configs/tiny.yaml",
                   "--set", f"models.policy={tiny_model}", "--set", f"workspace={ws}",
                   "--set", "judge.verdict=logprobs", "--set", "pairs.min_margin=0",
                   "--set", "pairs.require_agreement=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws / "flywheel.duckdb"


def catalog_state(path: Path) -> dict:
    """What a bad input must leave unchanged: the bytes of the catalog file (and of its WAL,
    if any) and, where DuckDB can read it, every table's row count. A missing file is
    `{"exists": False}`."""
    path = Path(path)
    if not path.exists():
        return {"exists": False}
    state = {"exists": True, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    wal = Path(str(path) + ".wal")
    state["wal"] = hashlib.sha256(wal.read_bytes()).hexdigest() if wal.exists() else None
    try:
        import duckdb

        con = duckdb.connect(str(path), read_only=True)
        try:
            tables = [r[0] for r in con.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_type = 'BASE TABLE' ORDER BY 1").fetchall()]
            state["rows"] = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
                             for t in tables}
        finally:
            con.close()
    except Exception as exc:  # a damaged file: its bytes are what must not change
        state["rows"] = f"unreadable: {type(exc).__name__}"
    return state


def prompt_rows(texts, *, source_ref: str = "x"):
    """Prompts rows (a DataFrame) of the given texts, ids `p_<text>`."""
    import pandas as pd

    return pd.DataFrame([{
        "prompt_id": f"p_{t}", "text": t, "gold": None, "constraints": "[]", "category": None,
        "source": "seed", "source_ref": f"{source_ref}:{i}", "examples": [], "raw": None}
        for i, t in enumerate(texts)])


def one_version_catalog(path: Path):
    """A catalog at `path` that already holds one prompts version (nothing may be lost)."""
    from flywheel.catalog import Catalog

    cat = Catalog(path)
    cat.init()
    rows = prompt_rows(["hello"]).assign(prompt_id="p_1", source_ref="x:1")
    cat.commit(kind="prompts", run_id="r0", round=0, parents=[], params={"x": 1},
               fp="f" * 20, tables={"prompts": rows})
    return cat


def two_rounds_of_prompts(path: Path):
    """A catalog at `path` with two prompts versions: round 0 (hello, world), round 1 (hello,
    again)."""
    from flywheel.catalog import Catalog

    cat = Catalog(path)
    cat.init()
    for round_, texts in ((0, ["hello", "world"]), (1, ["hello", "again"])):
        cat.commit(kind="prompts", run_id="r0", round=round_, parents=[], params={"r": round_},
                   fp=f"{round_}" * 20, tables={"prompts": prompt_rows(texts)})
    return cat


def pairs_catalog(path: Path):
    """A catalog at `path` with 3 seed prompts and 3 pairs on them: (catalog, pairs version,
    prompts version)."""
    import pandas as pd

    from flywheel.catalog import Catalog
    from flywheel.promptfile import load_prompt_file
    from flywheel.stages.prompts import seed_rows

    seeds = ROOT / "data" / "seed_prompts.jsonl"
    cat = Catalog(path)
    cat.init()
    prompts = seed_rows(load_prompt_file(seeds), str(seeds)).head(3)
    pv = cat.commit(kind="prompts", run_id="r", round=0, parents=[], params={}, fp="p" * 20,
                    tables={"prompts": prompts})
    pairs = pd.DataFrame([{"pair_id": f"pair{i}", "prompt_id": pid, "chosen_id": f"a{i}",
                           "rejected_id": f"b{i}", "chosen_text": f"good {i}",
                           "rejected_text": f"bad {i}", "chosen_score": 1.0,
                           "rejected_score": 0.0, "margin": 1.0, "rule": "verifier",
                           "min_margin": 0.5, "judgment_ids": [f"j{i}"]}
                          for i, pid in enumerate(prompts.prompt_id)])
    v = cat.commit(kind="pairs", run_id="r", round=1, parents=[pv.version_id], params={},
                   fp="q" * 20, tables={"pairs": pairs})
    return cat, v.version_id, pv.version_id


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server (llama-cpp-python) serving the bundled SmolLM2 GGUF
    as "smollm2" on a free loopback port, key "test-key-not-secret-123", context 2048: an
    object with `.base_url` (".../v1"), `.url` (without /v1), `.api_key`, `.alias`,
    `.log_path`. Skipped when llama-cpp-python is not installed, except on CI (CI=true), where
    that fails: CI installs it and a skip would hide the endpoint tests."""
    import importlib.util
    from types import SimpleNamespace

    if importlib.util.find_spec("llama_cpp") is None:
        reason = "llama-cpp-python is not installed: run `make setup`"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the endpoint tests must run on CI)")
        pytest.skip(reason)
    from flywheel.modelprep import bundled_gguf
    from flywheel.servers import ManagedServer, free_port, llama_cpp_argv, llama_cpp_env

    key, alias, port = "test-key-not-secret-123", "smollm2", free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    argv = llama_cpp_argv(bundled_gguf(), port=port, alias=alias, n_ctx=2048)
    with ManagedServer(argv, port=port, headers={"Authorization": f"Bearer {key}"},
                       env=llama_cpp_env(key),
                       log_path=log_path) as server:
        yield SimpleNamespace(base_url=server.base_url, url=server.url, api_key=key,
                              alias=alias, log_path=log_path)
