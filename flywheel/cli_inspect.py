"""CLI commands: inspect (registered into `flywheel`'s parser by flywheel.cli).

`flywheel show VERSION`, `flywheel lineage ID` and `flywheel diff V1 V2` read the catalog
(opened read-only) and print sections of rows. Every read command takes one set of output
options: a table (default), `--json`, `--nl` (newline-delimited JSON) or `--csv`; the printer,
`print_frame` / `print_sections`, is shared so other commands can use it.

Machine formats of several sections: `--json` prints one object {section: [rows]}; `--nl` one
JSON object per row with a `section` key; `--csv` one table with a `section` column and the
union of the sections' columns.
"""

from __future__ import annotations

import argparse
import json
import sys

from flywheel.catalog import Catalog
from flywheel.catalog import queries as q
from flywheel.errors import FlywheelError

FORMATS = ("table", "json", "nl", "csv")
#: chosen ids of pairs whose chosen answer is not a sample: SPIN's gold answer, a repaired one
NOT_SAMPLES = ("gold:", "repair:")

#: The stable row id of each kind that `flywheel diff` compares by.
ROW_IDS = {"prompts": "prompt_id", "samples": "sample_id", "judgments": "judgment_id",
           "pairs": "pair_id"}

#: The text columns whose lengths `flywheel diff` compares.
TEXT_COLUMNS = {"prompts": ["text"], "samples": ["text"],
                "pairs": ["chosen_text", "rejected_text"]}

_RAW = argparse.RawDescriptionHelpFormatter


# -- printing -----------------------------------------------------------------------------
def _plain(value):
    """A JSON-ready Python value from whatever DuckDB/pandas returned."""
    import math

    if value is None:
        return None
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _plain(value.tolist())
    if hasattr(value, "isoformat"):  # datetime, pandas Timestamp
        try:
            import pandas as pd

            if value is pd.NaT:
                return None
        except ImportError:  # pragma: no cover
            pass
        return value.isoformat()
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError, ImportError):
        pass
    return str(value)


def _records(df) -> list[dict]:
    return [{str(k): _plain(v) for k, v in row.items()} for row in df.to_dict("records")]


def _cell(value) -> str:
    """A CSV / table cell: lists and maps as JSON, None as empty."""
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def print_frame(df, fmt: str = "table", *, file=None) -> None:
    """Print one DataFrame as a table (default), `json` (a list of records), `nl` (one JSON
    object per line) or `csv` (a header row, lists and maps JSON-encoded)."""
    out = file or sys.stdout
    if fmt == "json":
        print(json.dumps(_records(df), indent=1, default=str), file=out)
    elif fmt == "nl":
        for rec in _records(df):
            print(json.dumps(rec, default=str), file=out)
    elif fmt == "csv":
        import csv

        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([str(c) for c in df.columns])
        for row in df.itertuples(index=False):
            writer.writerow([_cell(v) for v in row])
    elif fmt == "table":
        if not len(df):
            print("(no rows)", file=out)
            return
        import pandas as pd

        shown = df.copy()
        for col in shown.columns:
            if shown[col].dtype == object:
                shown[col] = shown[col].map(_cell)
        with pd.option_context("display.max_rows", 500, "display.max_columns", 60,
                               "display.width", 200, "display.max_colwidth", 60):
            print(shown.to_string(index=False), file=out)
    else:
        raise FlywheelError(f"unknown output format {fmt!r}", details=[
            f"use one of: {', '.join(FORMATS)}"])


def _print_vertical(df, out) -> None:
    """Each row as `column  value` lines, full text, empty fields left out (the readable form
    of a few wide rows)."""
    if not len(df):
        print("(no rows)", file=out)
        return
    width = max(len(str(c)) for c in df.columns)
    for i, rec in enumerate(df.to_dict("records")):
        if i:
            print(file=out)
        for key, value in rec.items():
            if _plain(value) is None:
                continue
            text = _cell(value).replace("\n", "\n" + " " * (width + 2))
            print(f"{str(key):<{width}}  {text}", file=out)


def print_sections(sections: dict, fmt: str = "table", *, vertical: tuple = (),
                   file=None) -> None:
    """Print named DataFrames: headed tables (sections in `vertical` as `key value` lines),
    or one JSON object / NL stream / CSV table for all of them (see the module doc)."""
    out = file or sys.stdout
    if fmt == "table":
        for i, (name, df) in enumerate(sections.items()):
            if i:
                print(file=out)
            print(f"== {name} ({len(df)} row{'s' if len(df) != 1 else ''})", file=out)
            if name in vertical:
                _print_vertical(df, out)
            else:
                print_frame(df, "table", file=out)
    elif fmt == "json":
        print(json.dumps({name: _records(df) for name, df in sections.items()}, indent=1,
                         default=str), file=out)
    elif fmt == "nl":
        for name, df in sections.items():
            for rec in _records(df):
                print(json.dumps({"section": name, **rec}, default=str), file=out)
    elif fmt == "csv":
        import pandas as pd

        frames = [df.assign(section=name) for name, df in sections.items() if len(df)]
        if frames:
            merged = pd.concat(frames, ignore_index=True, sort=False)
        else:
            merged = pd.DataFrame(columns=["section"])
        cols = ["section"] + [c for c in merged.columns if c != "section"]
        print_frame(merged[cols], "csv", file=out)
    else:
        print_frame(None, fmt, file=out)  # raises the unknown-format error


# -- arguments ----------------------------------------------------------------------------
def add_output_args(p: argparse.ArgumentParser, *, sections: bool = True) -> None:
    """The shared output options of read commands: --json | --nl | --csv (default: table).
    `sections`: the command prints several sections (show, lineage, diff), not one table."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", dest="fmt", action="store_const", const="json",
                   help="print JSON (one object of sections)" if sections
                   else "print a JSON list of records")
    g.add_argument("--nl", dest="fmt", action="store_const", const="nl",
                   help="print newline-delimited JSON (one row per line"
                        + (", with its section)" if sections else ")"))
    g.add_argument("--csv", dest="fmt", action="store_const", const="csv",
                   help="print CSV (one table, a `section` column first)" if sections
                   else "print CSV")
    p.set_defaults(fmt="table")


def _depth(text: str) -> int | None:
    """--depth: a level count >= 0, or `all` (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a number or `all`: {text!r}: give --depth N (levels, 0 or more) or "
            "--depth all") from None
    if n < 0:
        raise argparse.ArgumentTypeError(
            f"must be 0 or more, not {n}: give --depth N (0: no example prompts) or "
            "--depth all")
    return n


def _limit(text: str) -> int:
    """--limit: a row count, 0 or more (a negative one would silently print nothing)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a number: {text!r}: give --limit N with N 0 or more") from None
    if n < 0:
        raise argparse.ArgumentTypeError(
            f"must be 0 or more, not {n}: give --limit N with N >= 0 (0: no rows), or leave "
            "--limit out")
    return n


#: The help of every read command's --catalog.
CATALOG_HELP = ("the catalog file (default <workspace>/flywheel.duckdb of the default "
                "workspace: data/flywheel.duckdb)")


def add_catalog_arg(p: argparse.ArgumentParser) -> None:
    """--catalog PATH of a read command; `open_catalog(args)` resolves it."""
    p.add_argument("--catalog", metavar="PATH", default=None, help=CATALOG_HELP)


def open_catalog(args) -> Catalog:
    """The Catalog of a read command: --catalog, else the default workspace's catalog (the
    rule of `flywheel.config.catalog_path`)."""
    from flywheel.config import catalog_path

    return Catalog(catalog_path(catalog=args.catalog))


def register(sub: argparse._SubParsersAction) -> dict:
    """Add this module's subcommands to `sub`; return {command name: function(args) -> int}."""
    sh = sub.add_parser(
        "show", help="the rows of one version, with its header",
        description="Print one version's header (kind, round, parents, row count, params) and "
                    "its rows, from the table of its kind.",
        epilog="example:\n  flywheel show pairs-r1-0123456789 --limit 5\n"
               "  flywheel show prompts-r0-0123456789 --csv > prompts.csv",
        formatter_class=_RAW)
    sh.add_argument("version", help="a version id (see `flywheel versions`)")
    sh.add_argument("--limit", type=_limit, default=None,
                    help="print at most N rows (N >= 0; default: all)")
    add_catalog_arg(sh)
    add_output_args(sh)

    li = sub.add_parser(
        "lineage", help="where a version or row came from, and what was made from it",
        description="Ancestors and descendants of a version id, or of one row: a prompt "
                    "(p_...), sample (s_...), judgment (j_...) or pair (pr_...). A row's lineage "
                    "shows its prompt and the few-shot example prompts it came from (--depth "
                    "levels of them; `--depth all`: back to the seeds), the samples, every "
                    "judgment of them with rationale and verdict or score, the pairs, and the "
                    "model versions trained on them.",
        epilog="example:\n  flywheel lineage pr_0123456789abcdef\n"
               "  flywheel lineage p_0123456789abcdef --depth all\n"
               "  flywheel lineage model-r2-0123456789 --json",
        formatter_class=_RAW)
    li.add_argument("id", help="a version id or a row id (p_, s_, j_, pr_)")
    li.add_argument("--depth", type=_depth, default=EXAMPLE_DEPTH, metavar="N|all",
                    help="levels of few-shot example prompts to walk back (default "
                         f"{EXAMPLE_DEPTH}; `all`: back to the seeds)")
    add_catalog_arg(li)
    add_output_args(li)

    di = sub.add_parser(
        "diff", help="what changed between two versions of one kind",
        description="Rows added and removed by stable id; for pairs, preferences that flipped "
                    "(same prompt, chosen and rejected swapped); for judgments, the score "
                    "distribution of each version; for prompts, samples and pairs, text lengths.",
        epilog="example:\n  flywheel diff pairs-r1-0123456789 pairs-r2-0123456789",
        formatter_class=_RAW)
    di.add_argument("v1", help="the older version")
    di.add_argument("v2", help="the newer version")
    di.add_argument("--limit", type=_limit, default=50,
                    help="list at most N added / removed rows each (default 50)")
    add_catalog_arg(di)
    add_output_args(di)
    return {"show": cmd_show, "lineage": cmd_lineage, "diff": cmd_diff}


# -- helpers ------------------------------------------------------------------------------
def _version_or_error(con, version_id: str, catalog: Catalog):
    df = q.version_header(con, version_id)
    if not len(df):
        raise FlywheelError(f"no version {version_id!r} in {catalog.path}",
                            details=["list the versions with `flywheel versions`"])
    return df


# -- show ---------------------------------------------------------------------------------
def cmd_show(args) -> int:
    cat = open_catalog(args)
    with cat.read() as con:
        head = _version_or_error(con, args.version, cat)
        kind = head.at[0, "kind"]
        rows = q.version_rows(con, kind, args.version, args.limit)
        sections = {"version": head, "rows": rows}
        if kind == "eval":
            sections["items"] = q.eval_items(con, args.version, args.limit)
    print_sections(sections, args.fmt, vertical=("version",))
    return 0


# -- lineage ------------------------------------------------------------------------------
#: How many levels of few-shot examples `flywheel lineage` walks back by default: a prompt
#: generated in round N rests on `prompts.few_shot` examples per level, N levels deep (8 per
#: level and 10 rounds: ~25k rows), so the whole walk is opt-in (`--depth all`).
EXAMPLE_DEPTH = 1


def _concurrently(con, *fns):
    """[fn(c) for fn in fns], each on its own cursor of `con` (a connection to the same
    database) in its own thread: the lookups of one lineage are independent, and on a fresh
    connection each mostly waits on reading and decompressing its blocks (DuckDB releases the
    GIL meanwhile), so running them side by side takes ~20% off `flywheel lineage`."""
    from concurrent.futures import ThreadPoolExecutor

    cursors = [con.cursor() for _ in fns]
    try:
        with ThreadPoolExecutor(len(fns)) as pool:
            futures = [pool.submit(fn, c) for fn, c in zip(fns, cursors)]
            return [f.result() for f in futures]
    finally:
        for c in cursors:
            c.close()


def _row_lineage(con, rid: str, depth: int | None = EXAMPLE_DEPTH) -> tuple[dict, bool]:
    """Sections for one row id: pairs, prompt, example prompts (`depth` levels; None: all),
    samples, judgments, models; and whether example levels were left out."""
    prompt_ids: list[str] = []
    sample_ids: list[str] = []
    judgment_ids: list[str] = []
    pairs = None
    found = None
    if rid.startswith("pr_") or rid[:2] not in ("p_", "s_", "j_"):
        pairs = q.pairs_by_id(con, rid)
        if len(pairs):
            found = "pair"
    if found is None and (rid.startswith("j_") or not rid.startswith(("p_", "s_", "pr_"))):
        j = q.judgments_by_id(con, rid)
        if len(j):
            found = "judgment"
            judgment_ids = [rid]
            prompt_ids = list(dict.fromkeys(j["prompt_id"]))
            for col in ("sample_id", "sample_a", "sample_b"):
                sample_ids += [s for s in j[col] if isinstance(s, str)]
            pairs = q.pairs_with_judgment(con, rid)
    if found is None and (rid.startswith("s_") or not rid.startswith(("p_", "j_", "pr_"))):
        of_sample = q.prompts_of_sample(con, rid)
        if of_sample:
            found = "sample"
            sample_ids = [rid]
            prompt_ids = list(dict.fromkeys(of_sample))
            pairs = q.pairs_of_sample(con, rid)
    if found is None and (rid.startswith("p_") or not rid.startswith(("s_", "j_", "pr_"))):
        if q.has_prompt(con, rid):
            found = "prompt"
            prompt_ids = [rid]
            sample_ids = q.samples_of_prompt(con, rid)
            pairs = q.pairs_of_prompt(con, rid)
    if found is None:
        raise FlywheelError(f"no version or row {rid!r} in the catalog", details=[
            "give a version id (`flywheel versions`) or a row id: prompt p_..., sample s_..., "
            "judgment j_..., pair pr_..."])
    if found == "pair":
        prompt_ids = list(dict.fromkeys(pairs["prompt_id"]))
    for _, pr in pairs.iterrows():
        if found == "pair":
            sample_ids += [x for x in (pr["chosen_id"], pr["rejected_id"])
                           if not x.startswith(NOT_SAMPLES)]
            judgment_ids += list(pr["judgment_ids"])
    sample_ids = list(dict.fromkeys(sample_ids))

    def prompt_and_examples(c):
        prompt = q.prompts_by_id(c, prompt_ids)
        return (prompt, *q.example_prompts(c, prompt, depth))

    (prompt, examples, more), samples, judgments, models = _concurrently(
        con, prompt_and_examples, lambda c: q.samples_by_id(c, sample_ids),
        lambda c: q.judgments_of_samples(c, prompt_ids, sample_ids, judgment_ids),
        lambda c: q.models_trained_on(c, list(dict.fromkeys(pairs["version_id"]))))
    samples.insert(1, "role", "")
    if found == "pair":
        role = {}
        for _, pr in pairs.iterrows():
            role.setdefault(pr["chosen_id"], "chosen")
            role.setdefault(pr["rejected_id"], "rejected")
        samples["role"] = samples["sample_id"].map(lambda s: role.get(s, ""))
        gold = [pr for _, pr in pairs.iterrows() if pr["chosen_id"].startswith(NOT_SAMPLES)]
        if gold:
            import pandas as pd

            extra = pd.DataFrame([{"sample_id": g["chosen_id"], "role": "chosen",
                                   "prompt_id": g["prompt_id"],
                                   "model_version": g["chosen_id"].split(":", 1)[0],
                                   "text": g["chosen_text"]} for g in gold])
            samples = pd.concat([extra, samples], ignore_index=True, sort=False)
        order = {"chosen": 0, "rejected": 1, "": 2}
        samples = samples.sort_values("role", key=lambda c: c.map(order), kind="stable")
    pair_cols = ["pair_id", "version_id", "prompt_id", "rule", "chosen_id", "rejected_id",
                 "chosen_score", "rejected_score", "margin", "judgment_ids"]
    sections = {}
    if found == "pair":
        sections["pair"] = pairs[pair_cols + ["chosen_text", "rejected_text"]]
    sections["prompt"] = prompt
    sections["example prompts"] = examples
    sections["samples"] = samples.reset_index(drop=True)
    sections["judgments"] = judgments
    if found != "pair":
        sections["pairs"] = pairs[pair_cols]
    sections["models"] = models
    return sections, more


def cmd_lineage(args) -> int:
    cat = open_catalog(args)
    with cat.read() as con:
        # row ids have a prefix no version id has (versions are `<kind>-r<round>-<hash>`)
        row_id = args.id.startswith(("p_", "s_", "j_", "pr_"))
        head = None if row_id else q.version_header(con, args.id, brief=True)
        if head is not None and len(head):
            tree = q.version_tree(con, args.id)
            sections = {
                "version": head,
                "ancestors": tree[tree.direction == "ancestor"].drop(columns="direction"),
                "descendants": tree[tree.direction == "descendant"].drop(columns="direction"),
            }
            vertical = ("version",)
        else:
            depth = getattr(args, "depth", EXAMPLE_DEPTH)
            sections, more = _row_lineage(con, args.id, depth)
            vertical = ("pair", "prompt", "samples", "judgments")
            if more:
                print(f"note: example prompts shown {depth} level{'s' if depth != 1 else ''} "
                      "back; --depth N (or --depth all) walks further towards the seeds",
                      file=sys.stderr)
    for name, df in sections.items():
        sections[name] = df.reset_index(drop=True)
    print_sections(sections, args.fmt, vertical=vertical)
    return 0


# -- diff ---------------------------------------------------------------------------------
def _lengths(df, kind: str, label: str):
    out = []
    for col in TEXT_COLUMNS.get(kind, []):
        lengths = df[col].fillna("").map(len) if len(df) else df[col]
        out.append({"version": label, "column": col, "rows": len(df),
                    "mean_chars": round(float(lengths.mean()), 2) if len(df) else None,
                    "median_chars": float(lengths.median()) if len(df) else None})
    return out


def diff_versions(con, v1: str, v2: str, cat: Catalog, limit: int = 50) -> dict:
    """The sections of `flywheel diff V1 V2` (DataFrames), for the CLI and for tests."""
    import pandas as pd

    h1 = _version_or_error(con, v1, cat)
    h2 = _version_or_error(con, v2, cat)
    k1, k2 = h1.at[0, "kind"], h2.at[0, "kind"]
    if k1 != k2:
        raise FlywheelError(f"cannot diff {v1!r} ({k1}) with {v2!r} ({k2})",
                            details=["give two versions of the same kind"])
    if k1 not in ROW_IDS:
        raise FlywheelError(f"cannot diff {k1} versions: they have no stable row id",
                            details=[f"diff works on: {', '.join(ROW_IDS)}"])
    key = ROW_IDS[k1]
    a = q.version_rows(con, k1, v1)
    b = q.version_rows(con, k1, v2)
    ids_a, ids_b = set(a[key]), set(b[key])
    added_ids, removed_ids = ids_b - ids_a, ids_a - ids_b
    show = {"prompts": [key, "source", "text"],
            "samples": [key, "prompt_id", "idx", "text"],
            "judgments": [key, "type", "judge", "sample_id", "score", "verdict"],
            "pairs": [key, "prompt_id", "rule", "margin", "chosen_text", "rejected_text"]}[k1]
    n = max(int(limit), 0)
    added = b[b[key].isin(added_ids)].sort_values(key)[show].head(n)
    removed = a[a[key].isin(removed_ids)].sort_values(key)[show].head(n)
    sections = {
        "summary": pd.DataFrame([{
            "kind": k1, "v1": v1, "v2": v2, "rows_v1": len(a), "rows_v2": len(b),
            "added": len(added_ids), "removed": len(removed_ids),
            "common": len(ids_a & ids_b)}]),
        "added": added.reset_index(drop=True),
        "removed": removed.reset_index(drop=True),
    }
    if k1 == "pairs":
        m = a.merge(b, on="prompt_id", suffixes=("_v1", "_v2"))
        flipped = m[(m.chosen_text_v1 == m.rejected_text_v2)
                    & (m.rejected_text_v1 == m.chosen_text_v2)]
        sections["flipped"] = flipped[[
            "prompt_id", "pair_id_v1", "pair_id_v2", "chosen_text_v1", "chosen_text_v2",
            "margin_v1", "margin_v2"]].reset_index(drop=True)
        sections["summary"]["flipped"] = len(flipped)
        sections["summary"]["same_prompt"] = m["prompt_id"].nunique()
    if k1 == "judgments":
        rows, hist = [], {}
        for label, df in (("v1", a), ("v2", b)):
            for typ, g in df.groupby("type"):
                sc = g.loc[g["parsed"] & g["score"].notna(), "score"]
                rows.append({"version": label, "type": typ, "rows": len(g),
                             "parsed": int(g["parsed"].sum()),
                             "scored": len(sc),
                             "mean_score": round(float(sc.mean()), 4) if len(sc) else None})
                for bin_, cnt in sc.round().astype(int).value_counts().items():
                    hist.setdefault((typ, int(bin_)), {"v1": 0, "v2": 0})[label] = int(cnt)
        sections["scores"] = pd.DataFrame(rows, columns=["version", "type", "rows", "parsed",
                                                         "scored", "mean_score"])
        sections["histogram"] = pd.DataFrame(
            [{"type": t, "score": s, "v1": c["v1"], "v2": c["v2"], "shift": c["v2"] - c["v1"]}
             for (t, s), c in sorted(hist.items())],
            columns=["type", "score", "v1", "v2", "shift"])
    if k1 in TEXT_COLUMNS:
        sections["lengths"] = pd.DataFrame(_lengths(a, k1, "v1") + _lengths(b, k1, "v2"))
    return sections


def cmd_diff(args) -> int:
    cat = open_catalog(args)
    with cat.read() as con:
        sections = diff_versions(con, args.v1, args.v2, cat, args.limit)
    print_sections(sections, args.fmt, vertical=("summary",))
    return 0
