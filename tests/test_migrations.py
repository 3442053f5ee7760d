"""Named migrations: a catalog made by an earlier flywheel (tests/fixtures/catalog_e58b77c, made
by commit e58b77c; and the same made older still: no run_events, no gates, judgments indexed
per sample column) is brought up to date by its first write or by `flywheel migrate`, keeping
every row; readers work on it before and after, or name the command that migrates it; a
failing migration changes nothing; a catalog of a newer flywheel is refused for writing."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
from collections import Counter
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from flywheel import __version__
from flywheel.catalog import Catalog, migrations, refingerprint, schema
from flywheel.cli import main
from flywheel.errors import FlywheelError
from tests.conftest import ROOT, catalog_state, prompt_rows, run_cli

FIXTURE = ROOT / "tests" / "fixtures" / "catalog_e58b77c"
NAMES = ["0001_base", "0002_run_events_and_gates", "0003_lookup_indexes",
         "0004_judgments_prompt_index", "0005_eval_fingerprint_names_its_judge",
         "0006_train_steps_and_canary"]
#: the one migration that changes stored values (the fixture's evals compare with a judge of
#: non-default settings): the params and fingerprint of those evals and of the gates after them
REFP = "0005_eval_fingerprint_names_its_judge"
OLD_TABLES = {"versions", "runs", "run_events", "gates", "prompts", "samples", "judgments",
              "pairs", "models", "evals", "eval_items"}
#: the tables 0006_train_steps_and_canary adds (empty in a migrated catalog)
NEW_TABLES = {"train_steps", "canary_judgments"}


# -- catalogs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def e58b77c(tmp_path_factory) -> Path:
    """The fixture, imported into a DuckDB file (copy it before writing)."""
    path = tmp_path_factory.mktemp("e58b77c") / "flywheel.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(f"IMPORT DATABASE '{FIXTURE}'")
    return path


@pytest.fixture
def old(e58b77c, tmp_path) -> Path:
    """A copy of the catalog made by e58b77c, in a workspace of its own."""
    dest = tmp_path / "ws" / "flywheel.duckdb"
    dest.parent.mkdir()
    shutil.copyfile(e58b77c, dest)
    return dest


@pytest.fixture
def older(old) -> Path:
    """The same catalog as flywheel made it before run events, gates and the lookup indexes
    (before 5bd344e): no run_events, no gates, judgments indexed by sample_id, sample_a and
    sample_b as the releases between had them."""
    with duckdb.connect(str(old)) as con:
        for (name,) in con.execute("SELECT index_name FROM duckdb_indexes()").fetchall():
            con.execute(f"DROP INDEX {name}")
        for col in ("sample_id", "sample_a", "sample_b"):
            con.execute(f"CREATE INDEX judgments_{col} ON judgments ({col})")
        con.execute("DROP TABLE run_events")
        con.execute("DROP TABLE gates")
    return old


def describe(path: Path) -> dict:
    with duckdb.connect(str(path), read_only=True) as con:
        return schema.describe(con)


def new_schema(tmp_path: Path) -> dict:
    """The schema of a new catalog, without its `migrations` table."""
    path = tmp_path / "new" / "flywheel.duckdb"
    Catalog(path).init()
    d = describe(path)
    del d["tables"]["migrations"]
    d["constraints"] = [c for c in d["constraints"] if c[0] != "migrations"]
    return d


def rows(path: Path) -> dict[str, Counter]:
    """Every row of every table but `migrations`, as a multiset per table."""
    with duckdb.connect(str(path), read_only=True) as con:
        tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() "
                                            "WHERE table_name <> 'migrations'").fetchall()]
        return {t: Counter(_frozen(r) for r in con.execute(f"SELECT * FROM {t}").fetchall())
                for t in tables}


def _frozen(value):
    """A row (or value) with its lists as tuples, so it can be counted."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


def digest(path: Path) -> dict[str, tuple[int, str]]:
    """Every table's row count and a hash of its rows (but `migrations`)."""
    return {t: (sum(c.values()), hashlib.sha256(repr(sorted(map(repr, c.elements())))
                                                .encode()).hexdigest())
            for t, c in rows(path).items()}


def refingerprinted(path: Path) -> dict[str, tuple[dict, str]]:
    """version id -> (params, fingerprint) that 0005 gives the versions of the file."""
    with duckdb.connect(str(path), read_only=True) as con:
        return {vid: (json.loads(params), fp)
                for vid, params, fp in refingerprint.changes(con)}


def assert_kept(before: dict[str, Counter], after: dict[str, Counter],
                changed: dict[str, tuple[dict, str]]) -> dict[str, Counter]:
    """Every row of `before` is in `after`, but the versions rows that `changed` names, which
    are there with only their params and fingerprint changed to those; returns the rows
    added."""
    added = {}
    for table, was in before.items():
        lost, new = was - after[table], after[table] - was
        if table == "versions":
            assert sorted(r[0] for r in lost) == sorted(changed), "versions lost or changed"
            for r in lost:
                params, fp = changed[r[0]]
                match = [n for n in new if n[0] == r[0]]
                assert len(match) == 1, r[0]
                (m,) = match  # all as it was but params (index 5) and fingerprint (6)
                assert m[:5] + m[7:] == r[:5] + r[7:], r[0]
                assert json.loads(m[5]) == params and m[6] == fp, r[0]
                new = new - Counter(match)
        else:
            assert not lost, f"{table}: rows lost or changed"
        added[table] = new
    return added


def recorded(path: Path) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT name, applied_at, flywheel_version FROM migrations "
                           "ORDER BY applied_at, name").fetchall()


def a_pair(path: Path) -> str:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT min(pair_id) FROM pairs").fetchone()[0]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`flywheel ARGS` in this process: (exit code, stdout, stderr)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- the fixture --------------------------------------------------------------------------------
def test_the_fixture_is_a_catalog_of_e58b77c_with_the_tables_of_this_release(e58b77c,
                                                                             tmp_path):
    d = describe(e58b77c)
    assert set(d["tables"]) == OLD_TABLES  # no migrations table
    assert set(d["indexes"]) == {"judgments_prompt_id", "pairs_pair_id", "prompts_prompt_id",
                                 "samples_sample_id"}
    assert set(d["views"]) == set(schema.VIEW_NAMES) and len(schema.VIEW_NAMES) == 6
    counts = {t: n for t, (n, _) in digest(e58b77c).items()}
    assert counts["versions"] == 17 and counts["runs"] == 1 and counts["gates"] == 2
    assert counts["pairs"] == 8 and counts["judgments"] == 48
    # this release creates the same tables (and those of later migrations): columns, order,
    # types, constraints
    new = new_schema(tmp_path)
    assert set(new["tables"]) == OLD_TABLES | NEW_TABLES
    assert d["tables"] == {t: c for t, c in new["tables"].items() if t in OLD_TABLES}
    assert d["constraints"] == [c for c in new["constraints"] if c[0] in OLD_TABLES]


def test_migrations_are_named_and_numbered_in_order():
    assert [m.name for m in migrations.MIGRATIONS] == NAMES
    assert list(migrations.NAMES) == NAMES
    for i, m in enumerate(migrations.MIGRATIONS, 1):
        assert re.fullmatch(rf"{i:04d}_[a-z0-9_]+", m.name), m.name
        assert m.doc and "\n" not in m.doc


def test_a_view_change_comes_with_a_migration():
    """Every run of migrations recreates the views; a view changed without a migration would
    never reach an existing catalog. Comments and layout do not count."""
    assert migrations.views_sha256() == migrations.VIEWS_SHA256, (
        "schema.VIEWS changed: add a migration (`views_changed`, see "
        "flywheel/catalog/migrations.py) and set VIEWS_SHA256 to "
        f"{migrations.views_sha256()!r}")


def test_a_new_catalog_records_every_migration(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb")
    out = cat.migrate()
    assert out.applied == ["0001_base"] and out.recorded == NAMES[1:]
    got = recorded(cat.path)
    assert [r[0] for r in got] == NAMES
    assert {r[2] for r in got} == {__version__} and len({r[1] for r in got}) == 1
    assert not Catalog(cat.path).migrate().changed


# -- the first write migrates -------------------------------------------------------------------
def test_the_first_commit_migrates_the_old_catalog_and_keeps_every_row(old, tmp_path):
    before = rows(old)
    changed = refingerprinted(old)
    assert sorted(changed) == ["eval-r1-4eb7002ca3", "eval-r2-e105555b23",
                               "gate-r1-a3b5f40ac5", "gate-r2-f4f439dde2"]
    cat = Catalog(old)
    v = cat.commit(kind="prompts", run_id="r-new", round=0, parents=[], params={"new": 1},
                   fp="n" * 20, tables={"prompts": prompt_rows(["a new prompt"])})
    got = recorded(old)
    assert [r[0] for r in got] == NAMES  # in order, all in one transaction
    assert {r[2] for r in got} == {__version__} and len({r[1] for r in got}) == 1
    added = assert_kept(before, rows(old), changed)
    assert [r[0] for r in added.pop("versions")] == [v.version_id]
    assert [(r[0], r[2]) for r in added.pop("prompts")] == [(v.version_id, "a new prompt")]
    assert not any(added.values()), added
    assert describe(old)["views"] == new_schema(tmp_path)["views"]


def test_ingest_migrates_the_old_catalog(old, tmp_path):
    before = digest(old)
    src = tmp_path / "new.jsonl"
    src.write_text(json.dumps({"prompt": "Name three colours of a rainbow, one per line."})
                   + "\n")
    proc = run_cli("ingest", str(src), "--catalog", str(old))
    assert proc.returncode == 0, proc.stderr
    assert "added 1 prompts" in proc.stdout
    assert [r[0] for r in recorded(old)] == NAMES
    after = digest(old)
    assert {t: after[t][0] for t in NEW_TABLES} == dict.fromkeys(NEW_TABLES, 0)  # new, empty
    assert {t: d for t, d in after.items() if t not in ("versions", "prompts", *NEW_TABLES)} \
        == {t: d for t, d in before.items() if t not in ("versions", "prompts")}
    with duckdb.connect(str(old), read_only=True) as con:  # 0005 is in
        assert not refingerprint.changes(con)
    assert after["versions"][0] == before["versions"][0] + 1
    assert after["prompts"][0] == before["prompts"][0] + 1


def test_migrate_keeps_every_row_and_gives_the_schema_of_a_new_catalog(old, tmp_path, capsys):
    before, changed = rows(old), refingerprinted(old)
    code, out, err = cli(capsys, "migrate", "--catalog", str(old))
    assert code == 0, err
    assert f"migrated {old}: 2 applied, 4 recorded" in out
    for name in NAMES[:4]:
        assert re.search(rf"{name} +recorded \(the file had it\)", out), name
    for name in (REFP, NAMES[5]):
        assert re.search(rf"{name} +applied", out), name
    after = rows(old)
    assert not any(after.pop(t) for t in NEW_TABLES)  # new, empty
    assert not any(assert_kept(before, after, changed).values())
    d = describe(old)
    assert set(d["tables"]) == OLD_TABLES | NEW_TABLES | {"migrations"}
    del d["tables"]["migrations"]
    d["constraints"] = [c for c in d["constraints"] if c[0] != "migrations"]
    assert d == new_schema(tmp_path)


def test_an_older_catalog_gets_the_tables_and_indexes_it_lacks(older, tmp_path, capsys):
    before, changed = rows(older), refingerprinted(older)
    code, out, err = cli(capsys, "migrate", "--catalog", str(older))
    assert code == 0, err
    assert f"migrated {older}: 5 applied, 1 recorded" in out
    assert re.search(r"0001_base +recorded", out)
    for name in NAMES[1:]:
        assert re.search(rf"{name} +applied", out), name
    after = rows(older)
    assert not any(after.pop(t) for t in ("run_events", "gates", *NEW_TABLES))  # new, empty
    assert not any(assert_kept(before, after, changed).values())
    d = describe(older)
    del d["tables"]["migrations"]
    d["constraints"] = [c for c in d["constraints"] if c[0] != "migrations"]
    assert d == new_schema(tmp_path)  # the per-sample judgment indexes are gone


def test_a_second_writer_applies_nothing(old, capsys, monkeypatch):
    out = Catalog(old).migrate()
    assert out.recorded == NAMES[:4] and out.applied == [REFP, NAMES[5]]
    first = recorded(old)
    state = catalog_state(old)
    assert not Catalog(old).migrate().changed
    code, out, _ = cli(capsys, "migrate", "--catalog", str(old))
    assert code == 0 and out == f"{old} is up to date (6 migrations): nothing to do\n"
    assert recorded(old) == first
    assert catalog_state(old) == state  # not a byte changed
    # one read of the migrations table per Catalog object, whatever it writes after
    reads = []
    real = migrations.recorded
    monkeypatch.setattr(migrations, "recorded", lambda con: reads.append(1) or real(con))
    cat = Catalog(old)
    cat.init()
    cat.event("r", "stage", round=3, stage="samples")
    cat.commit(kind="prompts", run_id="r", round=0, parents=[], params={}, fp="m" * 20,
               tables={"prompts": prompt_rows(["once"])})
    assert len(reads) == 1
    assert recorded(old) == first


# -- readers --------------------------------------------------------------------------------------
READS = [("status", "--json"), ("summary", "--json"), ("lineage", "PAIR", "--json"),
         ("sql", "SELECT * FROM round_summary ORDER BY round", "--json")]


def test_readers_work_on_the_old_catalog_before_and_after_migrating(old, capsys):
    pair = a_pair(old)
    state = catalog_state(old)
    before = {}
    for args in READS:
        args = [pair if a == "PAIR" else a for a in args]
        code, out, err = cli(capsys, *args, "--catalog", str(old))
        assert code == 0, (args, err)
        before[args[0]] = json.loads(out)
    assert catalog_state(old) == state  # readers never migrate
    assert [r["round"] for r in before["summary"]] == [1, 2]
    assert [r["gate"] for r in before["summary"]] == ["promoted", "promoted"]
    assert [r["round"] for r in before["sql"]] == [1, 2]
    assert [r["decision"] for r in before["status"]["rounds"]] == ["promoted", "promoted"]
    assert before["status"]["runs"][0]["state"] == "finished"
    assert pair in json.dumps(before["lineage"])
    assert cli(capsys, "migrate", "--catalog", str(old))[0] == 0
    for args in READS:
        args = [pair if a == "PAIR" else a for a in args]
        code, out, err = cli(capsys, *args, "--catalog", str(old))
        assert code == 0, (args, err)
        assert json.loads(out) == before[args[0]], args[0]


def test_readers_of_an_older_catalog_name_the_command_that_migrates_it(older, capsys):
    state = catalog_state(older)
    pair = a_pair(older)
    for command, missing in (("status", "run_events"), ("summary", "gates")):
        code, out, err = cli(capsys, command, "--catalog", str(older))
        assert code == 2 and out == ""
        assert err.splitlines()[0] == (
            f"error: the catalog {older} was made by an older flywheel (it has no {missing} "
            f"table): run `flywheel migrate --catalog {older}`")
    # what needs no newer table works: the views, the lineage of a pair
    code, out, err = cli(capsys, "sql", "SELECT round FROM round_summary ORDER BY round",
                         "--catalog", str(older), "--json")
    assert code == 0 and [r["round"] for r in json.loads(out)] == [1, 2]
    code, out, err = cli(capsys, "lineage", pair, "--catalog", str(older), "--json")
    assert code == 0 and pair in out
    assert catalog_state(older) == state
    assert cli(capsys, "migrate", "--catalog", str(older))[0] == 0
    code, out, err = cli(capsys, "status", "--catalog", str(older), "--json")
    assert code == 0, err
    code, out, err = cli(capsys, "summary", "--catalog", str(older), "--json")
    assert code == 0, err
    # rounds without gate versions: the lineage follows each eval's parent eval
    assert [(r["round"], r["gate"]) for r in json.loads(out)] == [(1, ""), (2, "")]


def test_a_missing_table_that_is_not_flywheels_is_the_query_error(old):
    with pytest.raises(duckdb.CatalogException, match="nosuch"):
        Catalog(old).df("SELECT * FROM nosuch")


# -- failures change nothing ----------------------------------------------------------------------
def test_a_migration_killed_half_way_leaves_the_file_unchanged(older):
    state = catalog_state(older)
    proc = run_cli("migrate", "--catalog", str(older),
                   env={"FLYWHEEL_FAULT": "migrate:0003_lookup_indexes"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "FLYWHEEL_FAULT=migrate:0003_lookup_indexes" in proc.stderr
    assert catalog_state(older) == state  # 0002's tables were not kept: one transaction
    assert Catalog(older).migrate().applied == NAMES[1:]


def test_a_failing_migration_leaves_the_file_unchanged_and_writes_nothing(older, monkeypatch):
    def boom(con):
        con.execute("CREATE TABLE half_done (x INTEGER)")
        con.execute("SELECT error('the disk said no')")

    failing = migrations.Migration("0007_boom", "fails", boom, lambda con: False)
    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, failing))
    monkeypatch.setattr(migrations, "NAMES", (*migrations.NAMES, "0007_boom"))
    state = catalog_state(older)
    cat = Catalog(older)
    with pytest.raises(FlywheelError) as err:
        cat.commit(kind="prompts", run_id="r", round=0, parents=[], params={}, fp="b" * 20,
                   tables={"prompts": prompt_rows(["never stored"])})
    msg = str(err.value)
    assert msg.startswith(f"cannot bring the catalog {older} up to date: 0007_boom failed: ")
    assert "the disk said no" in msg
    assert "nothing was changed: the catalog is as it was" in msg
    assert catalog_state(older) == state
    with pytest.raises(FlywheelError, match="0007_boom failed"):
        cat.init()
    assert catalog_state(older) == state


def test_dry_run_lists_the_pending_migrations_and_changes_nothing(older, capsys):
    state = catalog_state(older)
    code, out, err = cli(capsys, "migrate", "--dry-run", "--catalog", str(older))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{older}: 6 pending migration(s); nothing was changed"
    assert [ln.split()[:2] for ln in lines[1:7]] == [[NAMES[0], "record"]] + [
        [n, "apply"] for n in NAMES[1:]]
    assert lines[7] == (f"run `flywheel migrate --catalog {older}` to apply them (in one "
                        "transaction)")
    assert catalog_state(older) == state


def test_dry_run_on_the_e58b77c_catalog_records_everything(e58b77c, tmp_path, capsys):
    path = tmp_path / "flywheel.duckdb"
    shutil.copyfile(e58b77c, path)
    state = catalog_state(path)
    code, out, _ = cli(capsys, "migrate", "--dry-run", "--workspace", str(tmp_path))
    assert code == 0
    assert [ln.split()[:2] for ln in out.splitlines()[1:7]] == \
        [[n, "record"] for n in NAMES[:4]] + [[REFP, "apply"], [NAMES[5], "apply"]]
    assert catalog_state(path) == state
    assert Catalog(path).migrate().recorded == NAMES[:4]
    code, out, _ = cli(capsys, "migrate", "--dry-run", "--catalog", str(path))
    assert out == f"{path} is up to date (6 migrations): nothing to do\n"


# -- a newer flywheel's catalog -------------------------------------------------------------------
def test_a_catalog_from_a_newer_flywheel_is_refused_for_writing(old, capsys):
    Catalog(old).migrate()
    with duckdb.connect(str(old)) as con:
        con.execute("INSERT INTO migrations VALUES ('0099_from_the_future', now(), '9.0.0')")
    state = catalog_state(old)
    refusal = (f"the catalog {old} was written by a newer flywheel (9.0.0): it has "
               f"migration(s) 0099_from_the_future that flywheel {__version__} does not know; "
               "nothing was written to it")
    with pytest.raises(FlywheelError) as err:
        Catalog(old).commit(kind="prompts", run_id="r", round=0, parents=[], params={},
                            fp="f" * 20, tables={"prompts": prompt_rows(["x"])})
    assert str(err.value).startswith(refusal)
    assert "upgrade flywheel" in str(err.value)
    for args in (["migrate", "--catalog", str(old)],
                 ["migrate", "--dry-run", "--catalog", str(old)]):
        code, out, err = cli(capsys, *args)
        assert code == 2 and err.startswith(f"error: {refusal}"), (args, err)
    assert catalog_state(old) == state
    # reading works
    code, out, err = cli(capsys, "summary", "--catalog", str(old), "--json")
    assert code == 0 and [r["round"] for r in json.loads(out)] == [1, 2]


# -- the command ----------------------------------------------------------------------------------
def test_migrate_refuses_what_is_not_a_catalog(tmp_path, capsys):
    code, _, err = cli(capsys, "migrate", "--catalog", str(tmp_path / "none.duckdb"))
    assert code == 2 and f"error: no catalog at {tmp_path / 'none.duckdb'}: nothing to migrate" \
        in err
    assert not (tmp_path / "none.duckdb").exists()
    code, _, err = cli(capsys, "migrate", "--catalog", str(tmp_path))
    assert code == 2 and f"{tmp_path} is a folder, not a catalog file" in err
    assert f"--workspace {tmp_path}" in err
    code, _, err = cli(capsys, "migrate", "--catalog", str(tmp_path / "x"), "--wait", "-1")
    assert code == 2 and "--wait -1.0: give the seconds to wait" in err


def test_migrate_takes_the_workspace_lock(old, capsys):
    from flywheel import runlock

    state = catalog_state(old)
    runlock.acquire(old, "run-holding-it", "flywheel iterate")
    try:  # another process: this one holds the lock
        proc = run_cli("migrate", "--catalog", str(old), "--wait", "0")
    finally:
        runlock.release(old)
    assert proc.returncode == 2
    assert f"the workspace is in use: {old} is locked by run run-holding-it" in proc.stderr
    assert "run the migration again later (--wait SECONDS waits longer)" in proc.stderr
    assert catalog_state(old) == state
    assert cli(capsys, "migrate", "--catalog", str(old))[0] == 0


def test_a_catalog_in_a_folder_where_its_wal_cannot_be_made_is_refused_before_any_write(
        old):
    """DuckDB writes a small commit straight into the file but needs `<file>.wal` for a
    change of the schema: init() checks the folder first, so a run stores nothing there."""
    import subprocess

    Catalog(old).migrate()
    state = catalog_state(old)
    if subprocess.run(["chattr", "+i", str(old.parent)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(FlywheelError) as err:
            Catalog(old).init()
    finally:
        subprocess.run(["chattr", "-i", str(old.parent)], check=True)
    assert str(err.value).startswith(
        f"cannot write the catalog {old}: cannot create flywheel.duckdb.wal beside it "
        "(Operation not permitted); nothing was written")
    assert "check their permissions" in str(err.value)
    assert catalog_state(old) == state
    assert sorted(p.name for p in old.parent.iterdir()) == ["flywheel.duckdb"]


def test_pending_reads_only(old):
    state = catalog_state(old)
    todo = Catalog(old).pending()
    assert [(m.name, present) for m, present in todo] == \
        [(n, True) for n in NAMES[:4]] + [(REFP, False), (NAMES[5], False)]
    assert catalog_state(old) == state


def test_frames_written_after_migrating_read_back(old):
    """The migrated catalog takes every kind of write of this release."""
    cat = Catalog(old)
    cat.init()
    cat.record_run("r-after", {"x": 1}, "flywheel iterate")
    cat.event("r-after", "start", detail={"pid": 1})
    v = cat.commit(kind="gate", run_id="r-after", round=3, parents=[], params={}, fp="g" * 20,
                   tables={"gates": pd.DataFrame([{
                       "model_version": "m", "eval_version": "e", "promoted": False,
                       "reason": "r", "statistic": "point", "value": 0.4, "threshold": 0.5,
                       "policy_version": "p", "policy_eval": "pe"}])})
    assert cat.df("SELECT count(*) AS n FROM gates WHERE version_id = ?",
                  [v.version_id]).n.iloc[0] == 1
    assert cat.df("SELECT count(*) AS n FROM run_events WHERE run_id = 'r-after'").n.iloc[0] == 1
