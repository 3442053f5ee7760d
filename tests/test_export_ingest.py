"""`flywheel export` and `flywheel ingest`: round trips, a TRL-ready preference dataset,
validated and deduplicated ingest with provenance, and the next round drawing from it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from flywheel.catalog import Catalog, prompt_id
from flywheel.cli import main
from flywheel.promptfile import load_prompt_file
from flywheel.stages.prompts import seed_rows
from tests.conftest import ROOT, catalog_state, pairs_catalog, run_cli

SEEDS = ROOT / "data" / "seed_prompts.jsonl"


def _seed_texts(n: int) -> list[str]:
    return [r["prompt"] for r in load_prompt_file(SEEDS)[:n]]


@pytest.fixture
def ws(tmp_path):
    """A workspace whose catalog holds the seed prompts (round 0), as `iterate` makes them."""
    cat = Catalog(tmp_path / "flywheel.duckdb")
    cat.init()
    cat.commit(kind="prompts", run_id="r0", round=0, parents=[], params={"seed_file": "s"},
               fp="s" * 20, tables={"prompts": seed_rows(load_prompt_file(SEEDS), str(SEEDS))})
    return tmp_path


def _state(ws):
    cat = Catalog(ws / "flywheel.duckdb")
    return (cat.df("SELECT version_id, row_count FROM versions ORDER BY version_id")
            .to_dict("records"), len(cat.df("SELECT * FROM prompts")))


def _ingest(ws, path, *extra) -> int:
    return main(["ingest", str(path), "--workspace", str(ws), *extra])


def _ingested(ws) -> list:
    cat = Catalog(ws / "flywheel.duckdb")
    return cat.df("SELECT * FROM versions WHERE kind = 'prompts' "
                  "AND params->>'source' = 'ingest' ORDER BY created_at").to_dict("records")


NEW = ["How do I reset my home router to factory settings?",
       "Write a short thank-you note to a colleague who helped me move.",
       "Suggest three names for a small bakery that sells sourdough."]


# -- ingest -----------------------------------------------------------------------------------
def test_ingest_jsonl_dedupes_against_catalog_and_file(ws, tmp_path, capsys):
    seeds = _seed_texts(2)
    lines = [{"prompt": seeds[0]},                           # exact duplicate of a seed
             {"prompt": seeds[1].upper() + "  "},            # same prompt_id (normalised)
             {"prompt": NEW[0], "gold": "Hold reset 10 s."},
             {"prompt": NEW[0] + "!"},                       # near-duplicate within the file
             {"prompt": NEW[1], "constraints": [{"type": "max_words", "n": 40}],
              "category": "writing"},
             {"prompt": NEW[2]}]
    f = tmp_path / "logs.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    before = _state(ws)[1]
    assert _ingest(ws, f, "--source", "prod-logs") == 0
    out = capsys.readouterr().out
    assert "added 3 prompts" in out and "dropped 3 as duplicates" in out
    (v,) = _ingested(ws)
    params = json.loads(v["params"])
    assert params["source"] == "ingest" and params["name"] == "prod-logs"
    assert params["file"] == str(f) and len(params["sha256"]) == 16
    assert v["round"] == 0 and v["row_count"] == 3 and list(v["parents"]) == []
    rows = Catalog(ws / "flywheel.duckdb").rows("prompts", v["version_id"])
    assert list(rows.text) == [NEW[0], NEW[1], NEW[2]]
    assert list(rows.prompt_id) == [prompt_id(t) for t in NEW]
    assert set(rows.source) == {"ingest"}
    assert list(rows.source_ref) == [f"{f}:3", f"{f}:5", f"{f}:6"]
    assert list(rows.category) == ["prod-logs", "writing", "prod-logs"]
    assert rows.gold.iloc[0] == "Hold reset 10 s."
    assert json.loads(rows.constraints.iloc[1]) == [{"type": "max_words", "n": 40}]
    assert _state(ws)[1] == before + 3

    # the same file again: same fingerprint, nothing written
    after = _state(ws)
    assert _ingest(ws, f, "--source", "prod-logs") == 0
    assert "already ingested" in capsys.readouterr().out
    assert _state(ws) == after


def test_ingest_near_duplicate_of_catalog_and_threshold(ws, tmp_path, capsys):
    f = tmp_path / "one.jsonl"
    f.write_text(json.dumps({"prompt": NEW[0]}) + "\n")
    assert _ingest(ws, f) == 0
    assert "added 1 prompts" in capsys.readouterr().out
    g = tmp_path / "near.jsonl"
    g.write_text(json.dumps({"prompt": NEW[0] + " Thanks."}) + "\n")
    assert _ingest(ws, g) == 0
    assert "1 near-duplicates of the catalog" in capsys.readouterr().out
    h = tmp_path / "near2.jsonl"
    h.write_text(json.dumps({"prompt": NEW[0] + " Thanks!"}) + "\n")
    assert _ingest(ws, h, "--dedupe-threshold", "1.0") == 0
    assert "added 1 prompts" in capsys.readouterr().out


def test_ingest_csv_and_parquet(ws, tmp_path, capsys):
    csv = tmp_path / "prod.csv"
    pd.DataFrame({"prompt": [NEW[0], _seed_texts(1)[0], NEW[1]],
                  "category": ["", "x", "notes"],
                  "constraints": ['[{"type": "max_words", "n": 30}]', "", ""],
                  "user_id": ["u1", "u2", "u3"]}).to_csv(csv, index=False)
    assert _ingest(ws, csv, "--source", "prod") == 0
    assert "added 2 prompts" in capsys.readouterr().out
    pq = tmp_path / "more.parquet"
    pd.DataFrame({"prompt": [NEW[1], NEW[2]], "gold": [None, "Crumb & Co."]}
                 ).to_parquet(pq, index=False)
    assert _ingest(ws, pq) == 0
    assert "added 1 prompts" in capsys.readouterr().out  # NEW[1] came with the CSV
    first, second = _ingested(ws)
    cat = Catalog(ws / "flywheel.duckdb")
    a = cat.rows("prompts", first["version_id"])
    assert list(a.source_ref) == [f"{csv}:2", f"{csv}:4"]
    assert list(a.category) == ["prod", "notes"]
    assert json.loads(a.constraints.iloc[0]) == [{"type": "max_words", "n": 30}]
    b = cat.rows("prompts", second["version_id"])
    assert list(b.text) == [NEW[2]] and list(b.source_ref) == [f"{pq}:2"]
    assert b.gold.iloc[0] == "Crumb & Co." and b.category.iloc[0] == "more"


@pytest.mark.parametrize("name,content,expect", [
    ("bad.jsonl", '{"prompt": "What is rain?"}\n{"prompt": "broken",\n',
     ["bad.jsonl line 2", "not valid JSON"]),
    ("noprompt.csv", "text,category\nhello,x\n", ["noprompt.csv", "no `prompt` column"]),
    ("badrow.csv", 'prompt,constraints\n"ok",\n,\n"fine","[{""type"": ""nope""}]"\n',
     ["badrow.csv line 3: prompt is empty", "badrow.csv line 4: constraints[0]"]),
    ("empty.jsonl", "", ["empty.jsonl", "contains no prompts"]),
    ("empty.csv", "", ["empty.csv is empty"]),
    ("header.csv", "prompt\n", ["header.csv contains no prompts"]),
    ("logs.txt", "hello\n", ["logs.txt", "unsupported file type"]),
])
def test_bad_ingest_input_exits_2_and_writes_nothing(ws, tmp_path, capsys, name, content,
                                                     expect):
    f = tmp_path / name
    f.write_text(content)
    before = _state(ws)
    assert _ingest(ws, f) == 2
    err = capsys.readouterr().err
    for part in expect:
        assert part in err, err
    assert _state(ws) == before


# -- ingest refusals, through the real CLI -----------------------------------------------------
BIG = ("word " * 210_000).strip()  # a 1 MB prompt


def _files(tmp):
    """The input files the cases use (written before the snapshot that must not change)."""
    (tmp / "new.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in NEW))
    (tmp / "big.jsonl").write_text(json.dumps({"prompt": NEW[0]}) + "\n"
                                   + json.dumps({"prompt": BIG}) + "\n")
    pd.DataFrame({"prompt": [NEW[0], BIG]}).to_csv(tmp / "big.csv", index=False)
    pd.DataFrame({"prompt": [NEW[0], BIG]}).to_parquet(tmp / "big.parquet", index=False)
    (tmp / "long.jsonl").write_text(json.dumps({"prompt": "Tell me why. " * 29 + "Why?"})
                                    + "\n")
    (tmp / "limit.yaml").write_text("prompts:\n  max_prompt_tokens: 50\n")
    (tmp / "bad.jsonl").write_text('{"prompt": "What is rain?"}\n{"prompt": "broken",\n')
    (tmp / "badrow.csv").write_text('prompt,category\n"ok",x\n,y\n')
    (tmp / "notes.txt").write_text("a file\n")
    (tmp / "held.jsonl").write_text(json.dumps({"prompt": NEW[0]}) + "\n" + json.dumps(
        {"prompt": NEW[1], "split": "transfer"}) + "\n")
    pd.DataFrame({"prompt": NEW[:3], "split": [None, "transfer", "transfer"]}).to_csv(
        tmp / "held.csv", index=False)


INGEST_REFUSALS = [
    # (case, arguments after FILE ({tmp}, {ws} filled in), file, run in ROOT, message parts)
    ("catalog missing, no --create", ["--catalog", "{tmp}/new/sub/x.duckdb"], "new.jsonl",
     False, ["no catalog at {tmp}/new/sub/x.duckdb", "pass --create",
             "and the folder {tmp}/new/sub"]),
    ("workspace missing, no --create", ["--workspace", "{tmp}/elsewhere"], "new.jsonl", False,
     ["no catalog at {tmp}/elsewhere/flywheel.duckdb", "pass --create"]),
    ("config's workspace missing", ["--set", "workspace={tmp}/w2"], "new.jsonl", False,
     ["no catalog at {tmp}/w2/flywheel.duckdb", "pass --create"]),
    ("catalog is a folder", ["--catalog", "{ws}"], "new.jsonl", False,
     ["{ws} is a folder, not a catalog file", "--workspace {ws}"]),
    ("catalog under a file", ["--catalog", "{tmp}/notes.txt/x.duckdb", "--create"],
     "new.jsonl", False, ["{tmp}/notes.txt is a file", "check the path"]),
    ("1 MB prompt in a CSV", ["--workspace", "{ws}"], "big.csv", True,
     ["big.csv line 3: the prompt is at least", "tokens, over the limit of 1,024",
      "shorten it, or raise the limit with --set prompts.max_prompt_tokens=N"]),
    ("1 MB prompt in a JSONL", ["--workspace", "{ws}"], "big.jsonl", True,
     ["big.jsonl line 2: the prompt is at least", "tokens, over the limit of 1,024",
      "shorten it"]),
    ("1 MB prompt in a Parquet file, no tokenizer", ["--workspace", "{ws}"], "big.parquet",
     False, ["big.parquet row 2: the prompt is 1,049,999 UTF-8 bytes", "shorten it"]),
    ("limit from --config", ["--workspace", "{ws}", "--config", "{tmp}/limit.yaml"],
     "long.jsonl", False,
     ["long.jsonl line 1: the prompt is 381 UTF-8 bytes", "over the limit of 50",
      "--set prompts.max_prompt_tokens=N"]),
    ("negative --wait", ["--workspace", "{ws}", "--wait", "-1"], "new.jsonl", False,
     ["--wait -1.0", "0 or more"]),
    ("unknown --set key", ["--workspace", "{ws}", "--set", "prompts.max_promt_tokens=5"],
     "new.jsonl", False, ["prompts.max_promt_tokens: unknown key",
                          "did you mean 'prompts.max_prompt_tokens'?"]),
    ("--config not found", ["--workspace", "{ws}", "--config", "{tmp}/none.yaml"],
     "new.jsonl", False, ["none.yaml: config file not found", "pass an existing YAML file"]),
    ("eval file from the config not found",
     ["--workspace", "{ws}", "--set", "eval.prompts_file={tmp}/gone.jsonl"], "new.jsonl",
     False, ["held-out eval file not found: {tmp}/gone.jsonl (from eval.prompts_file)",
             "give the right one with --eval-file"]),
    ("dedupe threshold 0", ["--workspace", "{ws}", "--dedupe-threshold", "0"], "new.jsonl",
     False, ["--dedupe-threshold 0.0", "give a value in (0, 1]"]),
    ("broken JSONL line", ["--workspace", "{ws}"], "bad.jsonl", False,
     ["bad.jsonl line 2: not valid JSON", "each line must be one JSON object"]),
    ("CSV row without a prompt", ["--workspace", "{ws}"], "badrow.csv", False,
     ["badrow.csv line 3: prompt is empty", "remove the row"]),
    ("a transfer-split line (JSONL)", ["--workspace", "{ws}"], "held.jsonl", False,
     ["held.jsonl is a file to ingest into the prompt pool, but 1 line is marked \"split\": "
      "\"transfer\"", "held.jsonl line 2: \"split\": \"transfer\"",
      "move those lines to the eval file"]),
    ("transfer-split rows (CSV)", ["--workspace", "{ws}"], "held.csv", False,
     ["2 lines are marked \"split\": \"transfer\"", "held.csv line 3:", "held.csv line 4:"]),
    ("file not found", ["--workspace", "{ws}"], "gone.csv", False,
     ["prompt file not found: {tmp}/gone.csv", "check the path"]),
]


@pytest.mark.badinput
@pytest.mark.parametrize("case,args,name,in_root,expect", INGEST_REFUSALS,
                         ids=[c[0] for c in INGEST_REFUSALS])
def test_ingest_refusal_changes_nothing(ws, tmp_path, case, args, name, in_root, expect):
    """Refused before anything is written: no catalog, folder or lock file appears, and the
    catalog is unchanged. In ROOT the default policy's tokenizer counts tokens; elsewhere
    UTF-8 bytes stand in."""
    from tests.test_export_safety import snapshot

    tmp = tmp_path / "in"
    tmp.mkdir()
    _files(tmp)

    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp)).replace("{ws}", str(ws))

    before, state = snapshot(tmp_path), catalog_state(ws / "flywheel.duckdb")
    proc = run_cli("ingest", str(tmp / name), *map(fill, args), cwd=ROOT if in_root else tmp,
                   timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for part in map(fill, expect):
        assert part in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before
    assert catalog_state(ws / "flywheel.duckdb") == state


def test_ingest_create_starts_a_catalog_and_its_folders(tmp_path, capsys):
    f = tmp_path / "new.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in NEW))
    db = tmp_path / "new" / "sub" / "x.duckdb"
    assert main(["ingest", str(f), "--catalog", str(db)]) == 2
    assert not (tmp_path / "new").exists()
    assert main(["ingest", str(f), "--catalog", str(db), "--create"]) == 0
    assert "added 3 prompts" in capsys.readouterr().out
    assert len(Catalog(db).df("SELECT * FROM prompts")) == 3


def test_ingest_defaults_come_from_the_config(ws, tmp_path, capsys):
    """--config sets the catalog (workspace), the dedupe threshold and the held-out file; the
    flags still override it."""
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": NEW[2]}) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"workspace: {ws}\nprompts:\n  dedupe_threshold: 1.0\n"
                   f"eval:\n  prompts_file: {held}\n")
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n"
                         for p in [NEW[0], NEW[0] + "!", NEW[2]]))
    assert main(["ingest", str(f), "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    # threshold 1.0: the near-copy stays; the held-out prompt (from the config) is dropped
    assert "added 2 prompts" in out and "1 held-out eval prompts" in out
    (v,) = _ingested(ws)
    assert json.loads(v["params"])["dedupe_threshold"] == 1.0
    g = tmp_path / "q.jsonl"
    g.write_text(json.dumps({"prompt": NEW[1]}) + "\n" + json.dumps({"prompt": NEW[1] + "?"})
                 + "\n")
    assert main(["ingest", str(g), "--config", str(cfg), "--dedupe-threshold", "0.6"]) == 0
    assert "added 1 prompts" in capsys.readouterr().out


def test_ingest_help_has_example():
    for cmd in ("ingest", "export"):
        proc = run_cli(cmd, "--help", timeout=60)
        assert proc.returncode == 0 and "example" in proc.stdout


# -- export -----------------------------------------------------------------------------------
def _pairs_catalog(tmp_path) -> tuple[Catalog, str]:
    cat, pairs, _ = pairs_catalog(tmp_path / "flywheel.duckdb")
    return cat, pairs


def test_export_parquet_jsonl_hf_of_pairs(tmp_path, capsys):
    cat, pv = _pairs_catalog(tmp_path)
    c = str(cat.path)
    assert main(["export", pv, "--format", "parquet", "-o", str(tmp_path / "p.parquet"),
                 "--catalog", c]) == 0
    back = pd.read_parquet(tmp_path / "p.parquet")
    assert list(back.pair_id) == ["pair0", "pair1", "pair2"]
    assert list(back.judgment_ids.iloc[0]) == ["j0"]
    assert main(["export", pv, "--format", "jsonl", "-o", str(tmp_path / "p.jsonl"),
                 "--catalog", c]) == 0
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [x["pair_id"] for x in lines] == ["pair0", "pair1", "pair2"]

    from datasets import load_from_disk

    assert main(["export", pv, "--format", "hf", "-o", str(tmp_path / "hf"),
                 "--catalog", c]) == 0
    assert "load_from_disk" in capsys.readouterr().out
    ds = load_from_disk(str(tmp_path / "hf"))
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 3
    text = dict(zip(cat.rows("prompts", cat.get(pv).parents).prompt_id,
                    cat.rows("prompts", cat.get(pv).parents).text))
    assert ds[0]["prompt"] == [{"role": "user", "content": list(text.values())[0]}]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "good 0"}]
    assert ds[0]["rejected"] == [{"role": "assistant", "content": "bad 0"}]

    # an existing output is not overwritten without --force
    assert main(["export", pv, "--format", "hf", "-o", str(tmp_path / "hf"),
                 "--catalog", c]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", pv, "--format", "hf", "-o", str(tmp_path / "hf"), "--force",
                 "--catalog", c]) == 0


def test_export_errors_name_version_and_format(tmp_path, capsys):
    cat, pv = _pairs_catalog(tmp_path)
    prompts_v = cat.get(pv).parents[0]
    assert main(["export", prompts_v, "--format", "hf", "-o", str(tmp_path / "x"),
                 "--catalog", str(cat.path)]) == 2
    err = capsys.readouterr().err
    assert prompts_v in err and "needs a pairs version" in err and "--format parquet" in err
    assert not (tmp_path / "x").exists()
    assert main(["export", "pairs-r9-nope", "--catalog", str(cat.path)]) == 2
    assert "pairs-r9-nope" in capsys.readouterr().err


# -- with a real (tiny) model -----------------------------------------------------------------
@pytest.mark.slow
def test_export_round_trips_of_a_real_catalog(tiny_catalog, tmp_path):
    cat = Catalog(tiny_catalog)
    for kind, key in (("pairs", "pair_id"), ("samples", "sample_id")):
        v = cat.df(f"SELECT version_id FROM versions WHERE kind = '{kind}' AND row_count > 0 "
                   "ORDER BY round LIMIT 1").version_id[0]
        rows = cat.rows(kind, v)
        for fmt in ("parquet", "jsonl"):
            out = tmp_path / f"{v}.{fmt}"
            assert main(["export", v, "--format", fmt, "-o", str(out),
                         "--catalog", str(tiny_catalog)]) == 0
            back = (pd.read_parquet(out) if fmt == "parquet"
                    else pd.read_json(out, lines=True, dtype=False))
            assert len(back) == len(rows)
            assert list(back[key]) == list(rows[key])
            assert set(back.version_id) == {v}


@pytest.mark.slow
def test_hf_export_trains_with_dpo_trainer_as_is(tiny_catalog, tiny_model, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cat = Catalog(tiny_catalog)
    pv = cat.df("SELECT version_id FROM versions WHERE kind = 'pairs' AND row_count >= 2 "
                "ORDER BY round LIMIT 1").version_id[0]
    out = tmp_path / "pairs.hf"
    assert main(["export", pv, "--format", "hf", "-o", str(out),
                 "--catalog", str(tiny_catalog)]) == 0
    ds = load_from_disk(str(out))
    assert len(ds) == cat.get(pv).row_count
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), bf16=False,
                     gradient_checkpointing=False, use_cpu=True, report_to="none",
                     max_steps=1, per_device_train_batch_size=2, save_strategy="no")
    trainer = DPOTrainer(model=model, args=args, processing_class=tok, train_dataset=ds)
    result = trainer.train()
    assert result.global_step == 1


@pytest.mark.slow
def test_next_round_draws_from_ingested_prompts(tiny_model, tmp_path):
    ws = tmp_path / "ws"
    f = tmp_path / "prod.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": t}) for t in NEW) + "\n")
    assert _ingest(ws, f, "--source", "prod", "--create") == 0
    (ingested,) = _ingested(ws)
    proc = run_cli("iterate", "--rounds", "1", "--no-prefect", "--config", "configs/tiny.yaml",
                   "--set", f"models.policy={tiny_model}", "--set", f"workspace={ws}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cat = Catalog(ws / "flywheel.duckdb")
    samples = cat.df("SELECT * FROM versions WHERE kind = 'samples' AND round = 1")
    assert ingested["version_id"] in list(samples.parents[0])
    new = cat.df("SELECT * FROM versions WHERE kind = 'prompts' AND round = 1")
    assert ingested["version_id"] in list(new.parents[0])


def test_ingest_drops_held_out_eval_prompts(ws, tmp_path, capsys):
    evals = [r["prompt"] for r in load_prompt_file(ROOT / "data" / "eval_prompts.jsonl")[:2]]
    f = tmp_path / "leak.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": p}) for p in [evals[0], evals[1].lower(),
                                                                 NEW[2]]) + "\n")
    assert _ingest(ws, f) == 0
    out = capsys.readouterr().out
    assert "added 1 prompts" in out and "2 held-out eval prompts" in out
    (v,) = _ingested(ws)
    assert list(Catalog(ws / "flywheel.duckdb").rows("prompts", v["version_id"]).text) == \
        [NEW[2]]
