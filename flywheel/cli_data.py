"""CLI commands: data (registered into `flywheel`'s parser by flywheel.cli).

`flywheel export` writes the rows of any catalog version to Parquet or JSONL, or a pairs version
as a TRL-ready conversational preference dataset; `flywheel ingest` turns a JSONL, CSV or
Parquet file of prompts (production logs, say) into a new prompts version that the next
`flywheel iterate` draws from.

An export never deletes or changes what it did not write: it writes a temporary sibling and
renames it into place, with a manifest that marks it as an export (`PATH.flywheel.json` beside a
file, `flywheel-export.json` inside an hf folder); `--force` replaces only such an earlier
export, unchanged since and holding nothing else, or an empty folder. Ingest is a writer like
`flywheel iterate`: it takes the workspace lock (runlock) and dedupes on its commit's own
connection, so two ingests at once never add a prompt twice.

Heavy imports (pandas, datasets) happen inside the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path

from flywheel.errors import FlywheelError

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
                    "datasets.load_from_disk(PATH) and hand it to trl.DPOTrainer as is. "
                    "The export is written beside PATH and renamed into place, with a "
                    "manifest (PATH.flywheel.json; flywheel-export.json inside an hf folder); "
                    "--force replaces only such an earlier export, never anything else.",
        epilog="example:\n  flywheel export pairs-r1-0123456789 --format hf -o out/pairs-r1\n"
               "  flywheel export samples-r2-0123456789 --format parquet",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("version", metavar="VERSION", help="the version id (see `flywheel versions`)")
    ex.add_argument("--format", "-f", choices=FORMATS, default="parquet",
                    help="parquet (default), jsonl, or hf (a pairs version as a datasets "
                         "folder)")
    ex.add_argument("-o", "--out", metavar="PATH",
                    help="output file (folder for hf); default VERSION.parquet / .jsonl / .hf")
    ex.add_argument("--force", action="store_true",
                    help="replace PATH if it is an earlier flywheel export (or, for hf, an "
                         "empty folder); anything else is refused")
    from flywheel.cli_inspect import add_catalog_arg

    add_catalog_arg(ex)

    ing = sub.add_parser(
        "ingest", help="add prompts from a JSONL, CSV or Parquet file as a new prompts version",
        description="Validate a file of prompts (JSONL like the seed file; CSV or Parquet with a "
                    "`prompt` column and optional `gold`, `constraints` (a JSON string) and "
                    "`category`), drop exact and near-duplicates of every prompt already in "
                    "the catalog and within the file, and commit the rest as one prompts "
                    "version (round 0, source 'ingest'). The next `flywheel iterate` puts it "
                    "in the pool after the seeds. Ingesting the same file again is a no-op. "
                    "Every prompt is checked first (prompts.max_prompt_tokens included); "
                    "nothing is written unless the whole file is valid. Ingest writes the "
                    "catalog like `flywheel iterate`: it takes the workspace lock, waiting up "
                    "to --wait seconds while another writer holds it, and adds to an existing "
                    "catalog only (--create starts a new one). Defaults come from --config.",
        epilog="example:\n  flywheel ingest logs/prod-2026-11.csv --source prod-logs\n"
               "  flywheel ingest new.jsonl --workspace ws --create --config configs/demo.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ing.add_argument("file", metavar="FILE", help="a .jsonl, .csv or .parquet file of prompts")
    ing.add_argument("--source", metavar="NAME",
                     help="provenance name, stored as the prompts' category where the file "
                          "gives none (default: the file's stem)")
    where = ing.add_mutually_exclusive_group()
    where.add_argument("--workspace", metavar="DIR",
                       help="the workspace whose catalog (DIR/flywheel.duckdb) to write")
    where.add_argument("--catalog", metavar="PATH",
                       help="the catalog file (default <workspace>/flywheel.duckdb: the "
                            "config's catalog, data/flywheel.duckdb unless the config sets "
                            "workspace or catalog)")
    ing.add_argument("--create", action="store_true",
                     help="start a new catalog (and its folders) if there is none at the path")
    ing.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                     help="how long to wait for the workspace lock while another writer (a "
                          "`flywheel iterate` run, another ingest) holds it (default 30)")
    ing.add_argument("--eval-file", metavar="PATH",
                     help="held-out eval prompts that must never enter training; copies and "
                          "near-copies are dropped (default: eval.prompts_file, "
                          "data/eval_prompts.jsonl)")
    ing.add_argument("--dedupe-threshold", type=float, metavar="T",
                     help="character 3-gram Jaccard at or above which a prompt is a "
                          "near-duplicate (default: prompts.dedupe_threshold, 0.6)")
    from flywheel.cli import _config_args

    _config_args(ing)
    return {"export": cmd_export, "ingest": cmd_ingest}


# -- export -----------------------------------------------------------------------------------
#: the manifest an hf export folder holds; a parquet / jsonl export PATH has PATH + SIDECAR
MANIFEST = "flywheel-export.json"
SIDECAR = ".flywheel.json"
TMP = ".flywheel-tmp"


def cmd_export(args) -> int:
    from flywheel.catalog import TABLES
    from flywheel.cli_inspect import open_catalog

    cat = open_catalog(args)
    v = _export_version(cat, args.version)
    if args.format == "hf" and v.kind != "pairs":
        raise FlywheelError(
            f"--format hf needs a pairs version; {v.version_id} is a {v.kind} version",
            details=["list pairs versions with `flywheel versions --kind pairs`",
                     f"or export {v.version_id} with --format parquet or --format jsonl"])
    out = Path(args.out or f"{v.version_id}{SUFFIX[args.format]}")
    earlier = check_destination(out, args.format, args.force)
    manifest = {"flywheel_export": 1, "version_id": v.version_id, "kind": v.kind,
                "format": args.format, "catalog": str(cat.path)}
    if args.format == "hf":
        ds = _preference_dataset(cat, v)
        manifest["rows"] = len(ds)
        replaced = _write_folder(out, lambda tmp: ds.save_to_disk(str(tmp)), manifest, earlier)
        print(f"wrote {len(ds)} preference pairs of {v.version_id} to {out} (a datasets folder: "
              f"datasets.load_from_disk({str(out)!r}))" + replaced)
        return 0
    rows = cat.rows(v.kind, v.version_id)
    manifest["rows"] = len(rows)
    if args.format == "parquet":
        def write(tmp):
            rows.to_parquet(tmp, index=False)
    else:
        def write(tmp):
            rows.to_json(tmp, orient="records", lines=True, force_ascii=False,
                         date_format="iso")
    replaced = _write_file(out, write, manifest)
    print(f"wrote {len(rows)} rows of {v.version_id} ({v.kind}, table {TABLES[v.kind]}) "
          f"to {out}" + replaced)
    return 0


def _export_version(cat, version_id: str):
    """The version to export; a missing one is named with the closest ids and where to look."""
    import difflib

    from flywheel.catalog import queries

    ids = queries.version_ids(cat)
    if version_id not in ids:
        close = difflib.get_close_matches(version_id, ids, n=3, cutoff=0.6)
        raise FlywheelError(
            f"no version {version_id!r} in {cat.path}",
            details=([f"did you mean {' or '.join(close)}?"] if close else [])
            + [f"list the versions with `flywheel versions --catalog {cat.path}`"])
    return cat.get(version_id)


def check_destination(out: Path, fmt: str, force: bool) -> list[str] | None:
    """Refuse, before anything is written, every destination an export must not touch.

    Returns None where nothing is there; for `--force` onto an hf folder, the files it may
    remove: [] for an empty folder, else the files an earlier export's manifest lists."""
    folder = fmt == "hf"
    _check_parent(out)
    sidecar = Path(str(out) + SIDECAR)
    if not folder and (sidecar.is_symlink() or sidecar.exists()) and \
            _read_manifest(sidecar) is None:
        raise FlywheelError(
            f"{sidecar} is in the way: an export writes its manifest there, and that file is "
            "not one flywheel wrote",
            details=["nothing was changed", "choose another path with -o, or move that file "
                                            "away yourself"])
    if not (out.is_symlink() or out.exists()):
        return None
    fix = f"choose another path with -o, or remove {out} yourself if you mean to replace it"
    if out.is_symlink():
        raise FlywheelError(f"{out} is a symbolic link: an export never writes through or "
                            "replaces a link", details=["nothing was changed", fix])
    if folder and not out.is_dir():
        raise FlywheelError(
            f"{out} is a file: --format hf writes a folder (datasets' save_to_disk), and an "
            "export never replaces a file with a folder",
            details=["nothing was changed", f"give a folder path, e.g. -o {out}.hf"])
    if not folder and out.is_dir():
        raise FlywheelError(
            f"{out} is a folder (holding {_contents(out)}): --format {fmt} writes one file, "
            "and an export never replaces a folder",
            details=["nothing was changed",
                     f"give a file path, e.g. -o {out / ('export' + SUFFIX[fmt])}"])
    if not folder and not out.is_file():
        raise FlywheelError(f"{out} is not a regular file (a device, socket or pipe)",
                            details=["nothing was changed", fix])
    what = "an earlier flywheel export or an empty folder" if folder else \
        "an earlier flywheel export"
    if not force:
        raise FlywheelError(
            f"{out} already exists",
            details=[f"pass --force to replace it (--force replaces only {what}), or choose "
                     "another path with -o"])
    return _earlier_folder(out) if folder else _earlier_file(out, sidecar)


def _check_parent(out: Path) -> None:
    """The nearest existing folder on the way to `out` must be a folder we can write in."""
    parent = out.parent
    while not (parent.is_symlink() or parent.exists()) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FlywheelError(
            f"{parent} is a file, but {out} needs it to be a folder",
            details=["nothing was changed", "choose another path with -o"])
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FlywheelError(
            f"cannot write in {parent}: permission denied",
            details=["nothing was changed", f"choose another path with -o, or make {parent} "
                                            f"writable (ls -ld {parent})"])


def _read_manifest(path: Path) -> dict | None:
    """A flywheel export manifest, or None when `path` is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("flywheel_export") == 1 else None


def _contents(folder: Path, only: list[str] | None = None) -> str:
    """`N files and M folders, e.g. a, b, c/` of a folder (or of the paths `only` in it)."""
    names = sorted(only) if only is not None else sorted(
        p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in folder.iterdir())
    if not names:
        return "nothing"
    dirs = sum(n.endswith("/") for n in names)
    files = len(names) - dirs
    parts = [f"{n} {w}{'' if n == 1 else 's'}" for n, w in ((files, "file"), (dirs, "folder"))
             if n]
    return " and ".join(parts) + ", e.g. " + ", ".join(names[:5]) + (
        ", ..." if len(names) > 5 else "")


def _tree(folder: Path) -> list[str]:
    """Every file (and link) under `folder`, as paths relative to it."""
    out = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        out += [(base / f).as_posix() for f in files]
        out += [(base / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(out)


def _earlier_folder(out: Path) -> list[str]:
    """The files `--force` may remove from folder `out`: none when it is empty, the files of
    an earlier flywheel export when it is one and holds nothing else; else a refusal."""
    files = _tree(out)
    if not files and not any(out.iterdir()):
        return []
    fix = f"choose another path with -o, or remove {out} yourself if you mean to replace it"
    rule = ("--force replaces only an earlier flywheel export (a folder holding " + MANIFEST
            + " and the files it lists) or an empty folder; nothing was changed")
    manifest = _read_manifest(out / MANIFEST)
    if manifest is None:
        raise FlywheelError(f"{out} holds what flywheel did not write: {_contents(out)}",
                            details=[rule, fix])
    listed = set(manifest.get("files") or [])
    holders = {p.as_posix() for f in listed for p in Path(f).parents} - {"."}
    foreign = [f for f in files if f not in listed and f != MANIFEST] + [
        d.relative_to(out).as_posix() + "/" for d in out.rglob("*")
        if d.is_dir() and not d.is_symlink() and d.relative_to(out).as_posix() not in holders]
    if foreign:
        raise FlywheelError(
            f"{out} is an earlier flywheel export of {manifest.get('version_id')}, but it also "
            f"holds what flywheel did not write: {_contents(out, foreign)}",
            details=[rule, f"move those files away, {fix}"])
    return [f for f in files if f in listed or f == MANIFEST]


def _earlier_file(out: Path, sidecar: Path) -> None:
    """Refuse unless `out` is an earlier flywheel export, unchanged since (its sidecar
    manifest names it, its size and its SHA-256)."""
    manifest = _read_manifest(sidecar)
    fix = f"choose another path with -o, or remove {out} yourself if you mean to replace it"
    if manifest is None or manifest.get("file") != out.name:
        raise FlywheelError(
            f"{out} is a file that flywheel did not write (no export manifest {sidecar.name} "
            "beside it)",
            details=["--force replaces only an earlier flywheel export; nothing was changed",
                     fix])
    if out.stat().st_size != manifest.get("bytes") or _sha256(out) != manifest.get("sha256"):
        raise FlywheelError(
            f"{out} was changed since flywheel exported {manifest.get('version_id')} there "
            f"(its content no longer matches {sidecar.name})",
            details=["--force replaces only an earlier flywheel export as it was written; "
                     "nothing was changed", fix])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; the folders it created, deepest first."""
    made = []
    p = folder
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def _undo(paths: list[Path], made: list[Path]) -> None:
    """Remove the temporaries `paths` and the (then empty) folders `made`."""
    import shutil

    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink(missing_ok=True)
    for d in made:
        with contextlib.suppress(OSError):
            d.rmdir()


def _write_failed(out: Path, exc: OSError) -> FlywheelError:
    from flywheel.cli import os_error_message

    return FlywheelError(
        "export failed: " + os_error_message(OSError(exc.errno, exc.strerror or str(exc),
                                                     str(out))),
        details=[f"{out} is as it was, and no temporary file was left behind"])


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _write_file(out: Path, write, manifest: dict) -> str:
    """Write a one-file export to a temporary sibling, then rename it over `out` (its sidecar
    manifest beside it). A failure leaves `out` as it was and no temporary behind."""
    sidecar = Path(str(out) + SIDECAR)
    replaced = _read_manifest(sidecar) if out.is_file() else None
    made = _make_parents(out.parent)
    token = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.{token}{TMP}"
    tmp_side = out.parent / f".{sidecar.name}.{token}{TMP}"
    try:
        write(tmp)
        tmp_side.write_text(json.dumps(
            {**manifest, "file": out.name, "bytes": tmp.stat().st_size, "sha256": _sha256(tmp),
             "created_at": _now()}, indent=1) + "\n")
        os.replace(tmp, out)
        os.replace(tmp_side, sidecar)
    except OSError as exc:
        _undo([tmp, tmp_side], made)
        raise _write_failed(out, exc) from exc
    except BaseException:
        _undo([tmp, tmp_side], made)
        raise
    return (f" (replacing the earlier export of {replaced.get('version_id')})" if replaced
            else "") + f"; manifest {sidecar.name}"


def _write_folder(out: Path, write, manifest: dict, earlier: list[str] | None) -> str:
    """Write a folder export into a temporary sibling, add its manifest, then swap it in.
    `earlier`: see check_destination; an earlier export is removed (only the files its
    manifest lists) after the new one is complete and in place."""
    made = _make_parents(out.parent)
    token = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.{token}{TMP}"
    old = out.parent / f".{out.name}.{token}.flywheel-old"
    previous = _read_manifest(out / MANIFEST) if earlier else None
    try:
        write(tmp)
        files = _tree(tmp)
        (tmp / MANIFEST).write_text(json.dumps(
            {**manifest, "files": files, "created_at": _now()}, indent=1) + "\n")
        if earlier is None:
            os.rename(tmp, out)  # fails, changing nothing, if something appeared there since
        elif not earlier:
            out.rmdir()          # fails, changing nothing, unless it is still empty
            os.rename(tmp, out)
        else:
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
    except OSError as exc:
        _undo([tmp], made)
        raise _write_failed(out, exc) from exc
    except BaseException:
        _undo([tmp], made)
        raise
    if not earlier:
        return ""
    left = _remove_listed(old, earlier)
    note = f" (replacing the earlier export of {previous.get('version_id')})"
    if left:
        print(f"warning: {old} (the earlier export) was kept: it holds what appeared there "
              f"while exporting ({_contents(old, left)}); look at it and remove it yourself",
              file=sys.stderr)
    return note


def _remove_listed(folder: Path, files: list[str]) -> list[str]:
    """Remove the files `files` (relative paths) of `folder`, then its emptied folders; what
    is left."""
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            (folder / f).unlink()
    for root, _dirs, _files in sorted(os.walk(folder), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            Path(root).rmdir()
    return _tree(folder) if folder.exists() else []


def _preference_dataset(cat, v):
    """The TRL-ready conversational preference dataset of pairs version `v`."""
    from flywheel.stages.train import preference_dataset

    pairs = cat.rows("pairs", v.version_id)
    if pairs.empty:
        raise FlywheelError(f"{v.version_id} has no pairs: nothing to train on",
                            details=["export it with --format parquet or jsonl to inspect it"])
    from flywheel.catalog import queries

    sources = [p for p in v.parents if cat.get(p).kind == "prompts"]
    texts = queries.prompt_texts(cat, sorted(set(pairs.prompt_id)), sources
                                 ).drop_duplicates("prompt_id")
    text = dict(zip(texts.prompt_id, texts.text))
    missing = sorted(set(pairs.prompt_id) - set(text))
    if missing:
        raise FlywheelError(f"{v.version_id}: no prompt text in the catalog for "
                            f"{len(missing)} prompt id(s), e.g. {missing[0]}")
    return preference_dataset(pairs, text)


# -- ingest -----------------------------------------------------------------------------------
def cmd_ingest(args) -> int:
    from flywheel import runlock
    from flywheel.catalog import Catalog, fingerprint, new_run_id, queries
    from flywheel.config import catalog_path, load_config

    cfg = load_config(args.config, args.overrides)
    path = Path(args.file)
    threshold = args.dedupe_threshold
    if threshold is None:
        threshold = cfg.prompts.dedupe_threshold
    if not 0.0 < threshold <= 1.0:
        raise FlywheelError(f"--dedupe-threshold {threshold}: give a value in (0, 1]")
    if not args.wait >= 0:
        raise FlywheelError(f"--wait {args.wait}: give the seconds to wait for the workspace "
                            "lock, 0 or more")
    # --catalog, else --workspace's catalog, else the config's (its workspace, or `catalog`)
    catalog = (catalog_path(args.workspace, args.catalog) if args.catalog or args.workspace
               else cfg.catalog_path())
    _check_catalog(catalog, args.create)
    records = load_ingest_file(path)  # validates everything before anything is written
    from flywheel.promptfile import refuse_transfer

    refuse_transfer(path, records, "a file to ingest into the prompt pool",
                    "row" if INGEST_TYPES.get(path.suffix.lower()) == "parquet" else "line")
    _check_lengths(records, path, cfg)
    held_out = _held_out(args.eval_file, cfg)
    cat = Catalog(catalog)
    name = args.source or path.stem
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    params = {"source": "ingest", "file": str(path), "sha256": digest, "name": name,
              "dedupe_threshold": threshold}
    # the content, not the path, identifies the input: the same file again is a no-op
    fp = fingerprint("prompts", {k: params[k] for k in ("source", "sha256", "name",
                                                        "dedupe_threshold")}, [])
    run_id = new_run_id()
    if runlock.is_locked(catalog):
        holder = runlock.read_holder(catalog)
        print(f"waiting up to {args.wait:g} s for the workspace lock of {catalog} (held by "
              f"{holder.describe() if holder else 'another process'})", file=sys.stderr)
    runlock.acquire(catalog, run_id, f"flywheel ingest {path}", wait=args.wait,
                    retry="run the ingest again later (--wait SECONDS waits longer)")
    try:
        hit = cat.find(fp)
        if hit is not None:
            print(f"{path} was already ingested as {hit.version_id} ({hit.row_count} prompts): "
                  "nothing to do")
            return 0
        params.update(records=len(records), dropped={})

        def rows(con):
            # read on the commit's own connection: what it dedupes against is what is there
            existing = queries.catalog_prompts(con)
            new, dropped = dedupe_rows(records, existing, threshold, str(path), name,
                                       held_out=held_out)
            params["dropped"] = dropped
            return {"prompts": new}

        cat.init()
        v = cat.commit(kind="prompts", run_id=run_id, round=0, parents=[], params=params,
                       fp=fp, tables=rows)
    finally:
        runlock.release(catalog)
    dropped = params["dropped"]
    detail = ", ".join(f"{n} {why}" for why, n in dropped.items() if n)
    print(f"added {v.row_count} prompts from {path} as {v.version_id}; dropped "
          f"{sum(dropped.values())} as duplicates" + (f" ({detail})" if detail else ""))
    return 0


def _check_catalog(catalog: Path, create: bool) -> None:
    """Ingest adds to an existing catalog; a new one only with --create."""
    if catalog.is_dir():
        raise FlywheelError(
            f"{catalog} is a folder, not a catalog file",
            details=[f"give the DuckDB file (--catalog {catalog / 'flywheel.duckdb'}) or the "
                     f"workspace (--workspace {catalog})"])
    if catalog.exists():
        return
    parent = catalog.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FlywheelError(f"{parent} is a file, but the catalog {catalog} needs it to be a "
                            "folder", details=["check the path (--catalog / --workspace)"])
    if not create:
        new = "" if catalog.parent.is_dir() else f" and the folder {catalog.parent}"
        raise FlywheelError(
            f"no catalog at {catalog}: ingest adds prompts to an existing catalog",
            details=["check the path (--catalog FILE or --workspace DIR; `flywheel iterate` "
                     "makes the catalog of its workspace)",
                     f"or pass --create to start a new catalog there (creating {catalog}"
                     f"{new})"])


def _check_lengths(records: list[dict], path: Path, cfg) -> None:
    """Refuse prompts over prompts.max_prompt_tokens (of the policy's tokenizer), naming
    each one's file and line."""
    limit = getattr(cfg.prompts, "max_prompt_tokens", None)
    if not limit:
        return
    from flywheel.limits import too_long

    unit = "row" if INGEST_TYPES.get(path.suffix.lower()) == "parquet" else "line"
    # the policy's tokenizer counts; without its folder, UTF-8 bytes (never fewer) stand in
    policy = cfg.models.policy.path if Path(cfg.models.policy.path).is_dir() else None
    errors = too_long([(f"{path} {unit} {r['line']}", r["prompt"]) for r in records], limit,
                      policy)
    if errors:
        shown = errors[:MAX_SHOWN] + ([f"and {len(errors) - MAX_SHOWN} more"]
                                      if len(errors) > MAX_SHOWN else [])
        noun = "prompt is" if len(errors) == 1 else "prompts are"
        raise FlywheelError(f"prompt file {path}: {len(errors)} {noun} over "
                            f"prompts.max_prompt_tokens ({limit} tokens); nothing was written",
                            details=shown)


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
        errors.append(f"{where}: prompt is empty — give the prompt's text, or remove the row")
    for key in TABULAR_COLUMNS:
        if rec[key] is not None and not isinstance(rec[key], str):
            errors.append(f"{where}: {key}: expected a string, got {type(rec[key]).__name__} "
                          "— store the column as text")
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
    if _cell(row.get("split")) is not None:  # an eval file's split: refused by ingest
        rec["split"] = _cell(row.get("split"))
    return rec, errors


def _held_out(eval_file: str | None, cfg):
    """The held-out eval prompts: --eval-file, else the config's eval.prompts_file (an empty
    frame when that is the default file and it is absent)."""
    import pandas as pd

    from flywheel.config import EvalConfig
    from flywheel.promptfile import load_prompt_file
    from flywheel.stages.prompts import seed_rows

    path = Path(eval_file or cfg.eval.prompts_file)
    if not path.is_file():
        if eval_file is None and cfg.eval.prompts_file == EvalConfig().prompts_file:
            return pd.DataFrame(columns=["prompt_id", "text", "constraints"])
        given = "--eval-file" if eval_file else "eval.prompts_file"
        raise FlywheelError(
            f"held-out eval file not found: {path} (from {given})",
            details=["its prompts must never enter training, so ingest will not go on "
                     "without it: check the path, or give the right one with --eval-file"])
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

