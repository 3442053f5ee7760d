"""CLI commands: data (registered into `flywheel`'s parser by flywheel.cli).

`flywheel export` writes the rows of any catalog version to Parquet or JSONL, or a pairs version
as a TRL-ready conversational preference dataset; `flywheel ingest` turns a JSONL, CSV or
Parquet file of prompts (production logs, say) into a new prompts version that the next
`flywheel iterate` draws from.

Heavy imports (pandas, datasets) happen inside the commands.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from flywheel.errors import FlywheelError

DEFAULT_CATALOG = "data/flywheel.duckdb"
FORMATS = ("parquet", "jsonl", "hf")
SUFFIX = {"parquet": ".parquet", "jsonl": ".jsonl", "hf": ".hf"}
INGEST_TYPES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                ".parquet": "parquet", ".pq": "parquet"}
TABULAR_COLUMNS = ("prompt", "gold", "constraints", "category")
MAX_SHOWN = 20


def register(sub: argparse._SubParsersAction) -> dict:
    """Add this module's subcommands to `sub`; return {command name: function(args) -> int}."""
    ex = sub.add_parser(
        "export", help="write a version's rows to Parquet or JSONL, or pairs as a TRL dataset",
        description="Write the rows of one catalog version (any kind) to a Parquet or JSONL "
                    "file, read-only. `--format hf` (pairs versions only) writes a TRL-ready "
                    "conversational preference dataset (prompt / chosen / rejected as chat "
                    "messages) with datasets' save_to_disk; load it with "
                    "datasets.load_from_disk(PATH) and hand it to trl.DPOTrainer as is.",
        epilog="example:\n  flywheel export pairs-r1-0123456789 --format hf -o out/pairs-r1\n"
               "  flywheel export samples-r2-0123456789 --format parquet",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("version", metavar="VERSION", help="the version id (see `flywheel versions`)")
    ex.add_argument("--format", "-f", choices=FORMATS, default="parquet",
                    help="parquet (default), jsonl, or hf (a pairs version as a datasets "
                         "folder)")
    ex.add_argument("-o", "--out", metavar="PATH",
                    help="output file (folder for hf); default VERSION.parquet / .jsonl / .hf")
    ex.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    ex.add_argument("--catalog", default=DEFAULT_CATALOG, help="the DuckDB file")

    ing = sub.add_parser(
        "ingest", help="add prompts from a JSONL, CSV or Parquet file as a new prompts version",
        description="Validate a file of prompts (JSONL like the seed file; CSV or Parquet with a "
                    "`prompt` column and optional `gold`, `constraints` (a JSON string) and "
                    "`category`), drop exact and near-duplicates of every prompt already in "
                    "the catalog and within the file, and commit the rest as one prompts "
                    "version (round 0, source 'ingest'). The next `flywheel iterate` puts it "
                    "in the pool after the seeds. Ingesting the same file again is a no-op.",
        epilog="example:\n  flywheel ingest logs/prod-2026-11.csv --source prod-logs",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ing.add_argument("file", metavar="FILE", help="a .jsonl, .csv or .parquet file of prompts")
    ing.add_argument("--source", metavar="NAME",
                     help="provenance name, stored as the prompts' category where the file "
                          "gives none (default: the file's stem)")
    where = ing.add_mutually_exclusive_group()
    where.add_argument("--workspace", metavar="DIR",
                       help="the workspace whose catalog (DIR/flywheel.duckdb) to write")
    where.add_argument("--catalog", help=f"the DuckDB file (default {DEFAULT_CATALOG})")
    ing.add_argument("--eval-file", metavar="PATH",
                     help="held-out eval prompts that must never enter training; copies and "
                          "near-copies are dropped (default: eval.prompts_file, "
                          "data/eval_prompts.jsonl)")
    ing.add_argument("--dedupe-threshold", type=float, metavar="T",
                     help="character 3-gram Jaccard at or above which a prompt is a "
                          "near-duplicate (default: prompts.dedupe_threshold, 0.6)")
    return {"export": cmd_export, "ingest": cmd_ingest}


# -- export -----------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from flywheel.catalog import TABLES, Catalog

    cat = Catalog(args.catalog)
    v = cat.get(args.version)
    out = Path(args.out or f"{v.version_id}{SUFFIX[args.format]}")
    if out.exists() and not args.force:
        raise FlywheelError(f"{out} already exists: pass --force to overwrite it, or choose "
                            "another path with -o")
    if args.format == "hf":
        n = _export_hf(cat, v, out)
        print(f"wrote {n} preference pairs of {v.version_id} to {out} (a datasets folder: "
              f"datasets.load_from_disk({str(out)!r}))")
        return 0
    rows = cat.rows(v.kind, v.version_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "parquet":
        rows.to_parquet(out, index=False)
    else:
        rows.to_json(out, orient="records", lines=True, force_ascii=False, date_format="iso")
    print(f"wrote {len(rows)} rows of {v.version_id} ({v.kind}, table {TABLES[v.kind]}) "
          f"to {out}")
    return 0


def _export_hf(cat, v, out: Path) -> int:
    import shutil

    from flywheel.stages.train import preference_dataset

    if v.kind != "pairs":
        raise FlywheelError(
            f"--format hf needs a pairs version; {v.version_id} is a {v.kind} version",
            details=["list pairs versions with `flywheel versions --kind pairs`",
                     f"or export {v.version_id} with --format parquet or --format jsonl"])
    pairs = cat.rows("pairs", v.version_id)
    if pairs.empty:
        raise FlywheelError(f"{v.version_id} has no pairs: nothing to train on",
                            details=["export it with --format parquet or jsonl to inspect it"])
    sources = [p for p in v.parents if cat.get(p).kind == "prompts"]
    sql = ("SELECT prompt_id, text FROM prompts WHERE prompt_id IN (SELECT unnest(?))"
           + (" AND version_id IN (SELECT unnest(?))" if sources else "")
           + " ORDER BY version_id")
    params = [sorted(set(pairs.prompt_id))] + ([sources] if sources else [])
    texts = cat.df(sql, params).drop_duplicates("prompt_id")
    text = dict(zip(texts.prompt_id, texts.text))
    missing = sorted(set(pairs.prompt_id) - set(text))
    if missing:
        raise FlywheelError(f"{v.version_id}: no prompt text in the catalog for "
                            f"{len(missing)} prompt id(s), e.g. {missing[0]}")
    ds = preference_dataset(pairs, text)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_to_disk(str(out))
    return len(ds)


# -- ingest -----------------------------------------------------------------------------------
def cmd_ingest(args) -> int:
    from flywheel.catalog import Catalog, fingerprint, new_run_id

    path = Path(args.file)
    threshold = args.dedupe_threshold
    if threshold is None:
        from flywheel.config import Config

        threshold = Config().prompts.dedupe_threshold
    if not 0.0 < threshold <= 1.0:
        raise FlywheelError(f"--dedupe-threshold {threshold}: give a value in (0, 1]")
    records = load_ingest_file(path)  # validates everything before anything is written
    catalog = Path(args.catalog or (Path(args.workspace) / "flywheel.duckdb" if args.workspace
                                    else DEFAULT_CATALOG))
    cat = Catalog(catalog)
    name = args.source or path.stem
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    params = {"source": "ingest", "file": str(path), "sha256": digest, "name": name,
              "dedupe_threshold": threshold}
    # the content, not the path, identifies the input: the same file again is a no-op
    fp = fingerprint("prompts", {k: params[k] for k in ("source", "sha256", "name",
                                                        "dedupe_threshold")}, [])
    hit = cat.find(fp)
    if hit is not None:
        print(f"{path} was already ingested as {hit.version_id} ({hit.row_count} prompts): "
              "nothing to do")
        return 0
    existing = _catalog_prompts(cat)
    rows, dropped = dedupe_rows(records, existing, threshold, str(path), name,
                                held_out=_held_out(args.eval_file))
    cat.init()
    v = cat.commit(kind="prompts", run_id=new_run_id(), round=0, parents=[],
                   params={**params, "records": len(records), "dropped": dropped}, fp=fp,
                   tables={"prompts": rows}, row_count=len(rows))
    n_dropped = sum(dropped.values())
    detail = ", ".join(f"{n} {why}" for why, n in dropped.items() if n)
    print(f"added {len(rows)} prompts from {path} as {v.version_id}; dropped {n_dropped} as "
          f"duplicates" + (f" ({detail})" if detail else ""))
    return 0


def load_ingest_file(path: Path) -> list[dict]:
    """Validated prompt records of a JSONL, CSV or Parquet file (the shape of
    `load_prompt_file`'s records; `line` is the file line, or the row number for Parquet)."""
    kind = INGEST_TYPES.get(path.suffix.lower())
    if kind is None:
        raise FlywheelError(f"{path}: unsupported file type {path.suffix or '(none)'!r}",
                            details=["give a .jsonl, .csv or .parquet file of prompts"])
    if not path.is_file():
        raise FlywheelError(f"prompt file not found: {path} — check the path")
    if kind == "jsonl":
        from flywheel.promptfile import load_prompt_file

        return load_prompt_file(path)
    import pandas as pd

    try:
        if kind == "csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            df = pd.read_parquet(path)
    except pd.errors.EmptyDataError as exc:
        raise FlywheelError(f"{path} is empty — give a header line with a `prompt` column and "
                            "one prompt per row") from exc
    except Exception as exc:  # pandas / pyarrow parse errors
        raise FlywheelError(f"{path}: cannot read it as {kind.upper()}: {exc}") from exc
    if "prompt" not in df.columns:
        raise FlywheelError(
            f"{path}: no `prompt` column (columns: {', '.join(map(str, df.columns)) or 'none'})",
            details=["the file needs a `prompt` column; `gold`, `constraints` (a JSON list) "
                     "and `category` are optional"])
    offset, unit = (2, "line") if kind == "csv" else (1, "row")
    records, errors = [], []
    for i, row in enumerate(df.to_dict("records")):
        number = i + offset
        rec, problems = _check_row(row, f"{path} {unit} {number}")
        errors += problems
        if not problems:
            records.append({**rec, "line": number})
    if errors:
        shown = errors[:MAX_SHOWN] + ([f"and {len(errors) - MAX_SHOWN} more"]
                                      if len(errors) > MAX_SHOWN else [])
        noun = "problem" if len(errors) == 1 else "problems"
        raise FlywheelError(f"prompt file {path} has {len(errors)} {noun}:", details=shown)
    if not records:
        raise FlywheelError(f"{path} contains no prompts — add one row per prompt")
    return records


def _cell(value):
    """A cell as a stripped string, or None when empty/missing."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        return value.strip() or None
    return value


def _check_row(row: dict, where: str) -> tuple[dict, list[str]]:
    from flywheel.constraints import validate_constraints

    errors = []
    rec = {k: _cell(row.get(k)) for k in TABULAR_COLUMNS}
    if rec["prompt"] is None:
        errors.append(f"{where}: prompt is empty")
    for key in TABULAR_COLUMNS:
        if rec[key] is not None and not isinstance(rec[key], str):
            errors.append(f"{where}: {key}: expected a string, got {type(rec[key]).__name__}")
    constraints = []
    if isinstance(rec["constraints"], str):
        try:
            constraints = json.loads(rec["constraints"])
        except json.JSONDecodeError as exc:
            errors.append(f"{where}: constraints: not valid JSON ({exc.msg} at column "
                          f"{exc.colno}) — give a JSON list like "
                          '[{"type": "max_words", "n": 20}]')
        else:
            errors += validate_constraints(constraints, where)
    rec["constraints"] = constraints if isinstance(constraints, list) else []
    return rec, errors


def _catalog_prompts(cat):
    import pandas as pd

    if not cat.path.is_file():
        return pd.DataFrame(columns=["prompt_id", "text", "constraints"])
    return cat.df("SELECT DISTINCT prompt_id, text, constraints FROM prompts")


def _held_out(eval_file: str | None):
    """The held-out eval prompts (an empty frame when the default file is absent)."""
    import pandas as pd

    from flywheel.config import Config
    from flywheel.promptfile import load_prompt_file
    from flywheel.stages.prompts import seed_rows

    path = Path(eval_file or Config().eval.prompts_file)
    if eval_file is None and not path.is_file():
        return pd.DataFrame(columns=["prompt_id", "text", "constraints"])
    return seed_rows(load_prompt_file(path), str(path))


def dedupe_rows(records: list[dict], existing, threshold: float, source_file: str,
                name: str, held_out=None):
    """Rows of the ingested prompts version and the counts of what was dropped and why.

    Copies and near-copies of `held_out` (the eval prompts) are dropped first: they never
    enter training."""
    import pandas as pd

    from flywheel.catalog import prompt_id
    from flywheel.stages.prompts import (
        PROMPT_COLUMNS,
        NearDuplicateIndex,
        task_text,
        task_texts,
    )

    seen, in_file = set(existing.prompt_id), set()
    pool, mine = NearDuplicateIndex(threshold), NearDuplicateIndex(threshold)
    for t in task_texts(existing) if len(existing) else []:
        pool.add(t)
    evals = NearDuplicateIndex(threshold)
    held_ids = set() if held_out is None else set(held_out.prompt_id)
    for t in task_texts(held_out) if held_out is not None and len(held_out) else []:
        evals.add(t)
    dropped = {"held-out eval prompts": 0, "exact duplicates of the catalog": 0,
               "near-duplicates of the catalog": 0, "duplicates within the file": 0}
    rows = []
    for r in records:
        pid, task = prompt_id(r["prompt"]), task_text(r["prompt"], r["constraints"])
        if pid in held_ids or evals.is_duplicate(task):
            dropped["held-out eval prompts"] += 1
        elif pid in seen:
            dropped["exact duplicates of the catalog"] += 1
        elif pid in in_file or mine.is_duplicate(task):
            dropped["duplicates within the file"] += 1
        elif pool.is_duplicate(task):
            dropped["near-duplicates of the catalog"] += 1
        else:
            in_file.add(pid)
            mine.add(task)
            rows.append({"prompt_id": pid, "text": r["prompt"], "gold": r.get("gold"),
                         "constraints": json.dumps(r["constraints"]),
                         "category": r.get("category") or name, "source": "ingest",
                         "source_ref": f"{source_file}:{r['line']}", "examples": [],
                         "raw": None})
    return pd.DataFrame(rows, columns=PROMPT_COLUMNS), dropped

