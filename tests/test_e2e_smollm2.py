"""End to end: one round of the demo config on the bundled SmolLM2-135M-Instruct, through the
real CLI and Prefect, with sizes cut down so it runs in a few minutes on 2 CPU cores."""

from __future__ import annotations

import json

import duckdb
import pytest

from tests.conftest import BUNDLED, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_round(tmp_path_factory):
    if not (BUNDLED / "config.json").is_file():
        pytest.skip("bundled model not converted: run `make setup`")
    ws = tmp_path_factory.mktemp("smol")
    proc = run_cli("iterate", "--rounds", "1", "--config", "configs/demo.yaml",
                   "--set", f"workspace={ws}", "--set", "progress=false",
                   "--set", "sampling.prompts_per_round=8", "--set", "prompts.num_new=2",
                   "--set", "prompts.max_attempts=4", "--set", "eval.max_prompts=8",
                   "--set", "sampling.max_new_tokens=32", "--set", "eval.max_new_tokens=32",
                   "--set", "train.epochs=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ws, proc


def test_smollm2_round_writes_every_kind_and_trains(smol_round):
    ws, proc = smol_round
    con = duckdb.connect(str(ws / "flywheel.duckdb"), read_only=True)
    kinds = {k for (k,) in con.execute("SELECT kind FROM versions WHERE round = 1").fetchall()}
    assert kinds == {"prompts", "samples", "judgments", "canary", "pairs", "model", "eval",
                     "gate"}
    texts = con.execute("SELECT text, finish_reason, completion_tokens FROM samples").fetchall()
    assert len(texts) == 8 * 4
    assert sum(1 for t, _, _ in texts if t.strip()) >= 28  # the real model answers
    assert {f for _, f, _ in texts} <= {"stop", "length"}
    probs = con.execute("SELECT probs FROM judgments WHERE type = 'pointwise' LIMIT 1"
                        ).fetchone()[0]
    assert set(json.loads(probs)) == {"0", "1", "2", "3", "4", "5"}
    model = con.execute("SELECT method, path FROM models JOIN versions USING (version_id) "
                        "WHERE round = 1").fetchone()
    pairs = con.execute("SELECT count(*) FROM pairs").fetchone()[0]
    assert pairs >= 1 and model[0] == "dpo"
    assert (ws / "models").is_dir() and model[1].startswith(str(ws / "models"))
    summary = con.execute("SELECT pass_rate, base_pass_rate, order_flip_rate "
                          "FROM round_summary WHERE round = 1").fetchone()
    assert all(v is not None for v in summary)
    assert "round 1" in proc.stderr and "held-out pass" in proc.stderr
