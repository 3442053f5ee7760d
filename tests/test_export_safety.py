"""`flywheel export` never deletes or changes what it did not write.

Every export is written to a temporary sibling and renamed into place, with a manifest
(`PATH.flywheel.json` beside a Parquet / JSONL file, `flywheel-export.json` inside an hf
folder). `--force` replaces only such an earlier export (unchanged since, holding nothing
else) or an empty folder; everything else is refused with what is there and what to do. The
refusals run through the real CLI and check, file by file and byte by byte, that nothing under
the test's folder changed, and that the catalog did not change either."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from flywheel.cli import main
from tests.conftest import ROOT, catalog_state, pairs_catalog, run_cli

SEEDS = ROOT / "data" / "seed_prompts.jsonl"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, str, str]:
    """A small catalog (3 seed prompts, 3 pairs): (path, pairs version, prompts version)."""
    cat, pairs, prompts = pairs_catalog(tmp_path_factory.mktemp("src") / "flywheel.duckdb")
    return cat.path, pairs, prompts


@pytest.fixture
def data(tmp_path, source) -> Path:
    """A `data/`-like folder of its own: the catalog, prompt files and a model checkpoint."""
    d = tmp_path / "data"
    (d / "models" / "model-r1-abc").mkdir(parents=True)
    shutil.copy(source[0], d / "flywheel.duckdb")
    shutil.copy(SEEDS, d / "seed_prompts.jsonl")
    (d / "eval_prompts.jsonl").write_text('{"prompt": "What is rain?"}\n')
    (d / "models" / "model-r1-abc" / "model.safetensors").write_bytes(os.urandom(256))
    return d


def snapshot(folder: Path) -> dict[str, object]:
    """Everything under `folder` (hidden entries included): files by bytes, links by target,
    folders as such."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        key = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[key] = ("link", os.readlink(p))
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = p.read_bytes()
    return out


def export(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return run_cli("export", *args, cwd=cwd, timeout=300)


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made unwritable for this process: mode 555, or as root (whom modes do not
    stop) the immutable attribute; skips the test where neither takes effect."""
    immutable = os.geteuid() == 0
    if immutable:
        made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if made.returncode != 0:
            pytest.skip("running as root without chattr +i: cannot make a folder unwritable")
    else:
        folder.chmod(0o555)
    try:
        probe = folder / ".probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip(f"{folder} stays writable here")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


# -- the refusals, through the real CLI --------------------------------------------------------
def _foreign_folder(tmp: Path, d: Path, v: str) -> list[str]:
    out = tmp / "results"
    (out / "plots").mkdir(parents=True)
    (out / "old-runs").mkdir()
    for i in range(12):
        (out / f"notes-{i:02d}.txt").write_text(f"my notes {i}\n")
    return ["-f", "hf", "-o", str(out), "--force"]


def _data_folder(tmp: Path, d: Path, v: str) -> list[str]:
    return ["-f", "hf", "-o", str(d), "--force"]


def _foreign_parquet(tmp: Path, d: Path, v: str) -> list[str]:
    pd.DataFrame({"x": [1, 2]}).to_parquet(tmp / "results.parquet")
    return ["-f", "parquet", "-o", str(tmp / "results.parquet"), "--force"]


def _foreign_jsonl(tmp: Path, d: Path, v: str) -> list[str]:
    (tmp / "notes.jsonl").write_text('{"mine": true}\n')
    return ["-f", "jsonl", "-o", str(tmp / "notes.jsonl"), "--force"]


def _catalog_as_output(tmp: Path, d: Path, v: str) -> list[str]:
    return ["-f", "parquet", "-o", str(d / "flywheel.duckdb"), "--force"]


def _parquet_folder(tmp: Path, d: Path, v: str) -> list[str]:
    (tmp / "exports").mkdir()
    for name in ("a.parquet", "b.parquet"):
        pd.DataFrame({"x": [1]}).to_parquet(tmp / "exports" / name)
    return ["-f", "parquet", "-o", str(tmp / "exports"), "--force"]


def _jsonl_onto_folder(tmp: Path, d: Path, v: str) -> list[str]:
    return ["-f", "jsonl", "-o", str(d)]


def _hf_onto_file(tmp: Path, d: Path, v: str) -> list[str]:
    (tmp / "pairs.hf").write_text("not a folder\n")
    return ["-f", "hf", "-o", str(tmp / "pairs.hf"), "--force"]


def _file_as_folder(tmp: Path, d: Path, v: str) -> list[str]:
    (tmp / "notes.txt").write_text("a file\n")
    return ["-f", "parquet", "-o", str(tmp / "notes.txt" / "out.parquet")]


def _file_as_folder_hf(tmp: Path, d: Path, v: str) -> list[str]:
    (tmp / "notes.txt").write_text("a file\n")
    return ["-f", "hf", "-o", str(tmp / "notes.txt" / "sub" / "pairs.hf")]


def _exists_no_force(tmp: Path, d: Path, v: str) -> list[str]:
    (tmp / "p.parquet").write_bytes(b"PAR1 not really")
    return ["-f", "parquet", "-o", str(tmp / "p.parquet")]


def _earlier_changed(tmp: Path, d: Path, v: str) -> list[str]:
    out = tmp / "p.jsonl"
    assert main(["export", v, "-f", "jsonl", "-o", str(out), "--catalog",
                 str(d / "flywheel.duckdb")]) == 0
    with open(out, "a") as f:
        f.write('{"added": "by hand"}\n')
    return ["-f", "jsonl", "-o", str(out), "--force"]


def _earlier_hf_plus_file(tmp: Path, d: Path, v: str) -> list[str]:
    out = tmp / "pairs.hf"
    assert main(["export", v, "-f", "hf", "-o", str(out), "--catalog",
                 str(d / "flywheel.duckdb")]) == 0
    (out / "README.md").write_text("my notes about this dataset\n")
    return ["-f", "hf", "-o", str(out), "--force"]


def _earlier_hf_plus_folder(tmp: Path, d: Path, v: str) -> list[str]:
    out = tmp / "pairs.hf"
    assert main(["export", v, "-f", "hf", "-o", str(out), "--catalog",
                 str(d / "flywheel.duckdb")]) == 0
    (out / "extra").mkdir()
    return ["-f", "hf", "-o", str(out), "--force"]


def _symlink(tmp: Path, d: Path, v: str) -> list[str]:
    (tmp / "real.parquet").write_bytes(b"mine")
    (tmp / "link.parquet").symlink_to(tmp / "real.parquet")
    return ["-f", "parquet", "-o", str(tmp / "link.parquet"), "--force"]


def _sidecar_in_the_way(tmp: Path, d: Path, v: str) -> list[str]:
    (tmp / "x.parquet.flywheel.json").write_text('{"mine": 1}\n')
    return ["-f", "parquet", "-o", str(tmp / "x.parquet")]


def _hf_of_prompts(tmp: Path, d: Path, v: str) -> list[str]:
    return ["{pv}", "-f", "hf", "-o", str(tmp / "prompts.hf")]


def _unknown_version(tmp: Path, d: Path, v: str) -> list[str]:
    return ["pairs-r7-nothere", "-o", str(tmp / "x.parquet")]


def _typo_version(tmp: Path, d: Path, v: str) -> list[str]:
    return [v[:-1] + "X", "-o", str(tmp / "x.parquet")]


def _missing_catalog(tmp: Path, d: Path, v: str) -> list[str]:
    return ["-o", str(tmp / "x.parquet"), "--catalog", str(tmp / "none" / "flywheel.duckdb")]


REFUSALS = [
    # (case, setup, expected parts of the message: the path, what is there, the fix)
    ("foreign folder", _foreign_folder,
     ["results holds what flywheel did not write: 12 files and 2 folders, e.g. notes-00.txt",
      "choose another path with -o", "remove", "yourself"]),
    ("data folder with the catalog", _data_folder,
     ["data holds what flywheel did not write", "flywheel.duckdb", "models/",
      "seed_prompts.jsonl", "choose another path with -o"]),
    ("foreign parquet file", _foreign_parquet,
     ["results.parquet is a file that flywheel did not write", "choose another path with -o"]),
    ("foreign jsonl file", _foreign_jsonl,
     ["notes.jsonl is a file that flywheel did not write", "choose another path with -o"]),
    ("the catalog file itself", _catalog_as_output,
     ["flywheel.duckdb is a file that flywheel did not write", "choose another path with -o"]),
    ("--force parquet onto a folder", _parquet_folder,
     ["exports is a folder (holding 2 files, e.g. a.parquet, b.parquet)",
      "--format parquet writes one file", "give a file path, e.g. -o"]),
    ("jsonl onto a folder", _jsonl_onto_folder,
     ["data is a folder", "flywheel.duckdb", "give a file path, e.g. -o"]),
    ("hf onto a file", _hf_onto_file,
     ["pairs.hf is a file: --format hf writes a folder", "give a folder path"]),
    ("a file where a folder is needed", _file_as_folder,
     ["notes.txt is a file, but", "out.parquet needs it to be a folder",
      "choose another path with -o"]),
    ("a file where a folder is needed (hf)", _file_as_folder_hf,
     ["notes.txt is a file, but", "needs it to be a folder", "choose another path with -o"]),
    ("exists, no --force", _exists_no_force,
     ["p.parquet already exists", "pass --force to replace it", "choose another path"]),
    ("earlier export changed since", _earlier_changed,
     ["p.jsonl was changed since flywheel exported", "p.jsonl.flywheel.json",
      "choose another path with -o"]),
    ("earlier hf export plus a file", _earlier_hf_plus_file,
     ["pairs.hf is an earlier flywheel export of", "1 file, e.g. README.md",
      "move those files away"]),
    ("earlier hf export plus a folder", _earlier_hf_plus_folder,
     ["pairs.hf is an earlier flywheel export of", "1 folder, e.g. extra/",
      "move those files away"]),
    ("a symbolic link", _symlink,
     ["link.parquet is a symbolic link", "choose another path with -o"]),
    ("a foreign file where the manifest goes", _sidecar_in_the_way,
     ["x.parquet.flywheel.json is in the way", "choose another path with -o"]),
    ("hf of a prompts version", _hf_of_prompts,
     ["{pv} is a prompts version", "--format hf needs a pairs version",
      "--format parquet"]),
    ("unknown version", _unknown_version,
     ["no version 'pairs-r7-nothere'", "flywheel versions --catalog"]),
    ("mistyped version", _typo_version,
     ["did you mean {v}?", "flywheel versions --catalog"]),
    ("missing catalog", _missing_catalog,
     ["no catalog at", "none/flywheel.duckdb", "--catalog PATH"]),
]


@pytest.mark.badinput
@pytest.mark.parametrize("case,setup,expect", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_export_refusal_changes_nothing(tmp_path, data, source, case, setup, expect):
    _, v, pv = source
    args = [a.replace("{pv}", pv) for a in setup(tmp_path, data, v)]
    if args[0].startswith("-"):
        args = [v, *args]
    if "--catalog" not in args:
        args += ["--catalog", str(data / "flywheel.duckdb")]
    before, state = snapshot(tmp_path), catalog_state(data / "flywheel.duckdb")
    proc = export(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for part in expect:
        assert part.replace("{v}", v).replace("{pv}", pv) in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before  # nothing deleted, changed or left behind
    assert catalog_state(data / "flywheel.duckdb") == state


@pytest.mark.badinput
@pytest.mark.parametrize("fmt,name", [("parquet", "out.parquet"), ("hf", "pairs.hf")])
def test_export_into_an_unwritable_folder_is_one_clear_line(tmp_path, data, source, fmt,
                                                            name):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "keep.txt").write_text("mine\n")
    before, state = snapshot(tmp_path), catalog_state(data / "flywheel.duckdb")
    with read_only(locked):
        proc = export(source[1], "-f", fmt, "-o", str(locked / "sub" / name), "--catalog",
                      str(data / "flywheel.duckdb"))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert f"cannot write in {locked}: permission denied" in proc.stderr
    assert "choose another path with -o" in proc.stderr and f"ls -ld {locked}" in proc.stderr
    assert snapshot(tmp_path) == before
    assert catalog_state(data / "flywheel.duckdb") == state


# -- what --force may replace, and what a failure leaves -----------------------------------------
def _export(source, *args: str) -> int:
    return main(["export", source[1], *args, "--catalog", str(source[0])])


def _manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def test_hf_force_replaces_only_an_earlier_export(tmp_path, source, capsys):
    from datasets import load_from_disk

    out = tmp_path / "pairs.hf"
    (tmp_path / "neighbour.txt").write_text("beside it\n")
    assert _export(source, "-f", "hf", "-o", str(out)) == 0
    m = _manifest(out / "flywheel-export.json")
    assert (m["version_id"], m["kind"], m["format"], m["rows"]) == (source[1], "pairs", "hf", 3)
    assert m["created_at"].endswith("UTC")
    assert sorted(m["files"]) == sorted(p.name for p in out.iterdir()
                                        if p.name != "flywheel-export.json")
    first = snapshot(out)
    capsys.readouterr()
    assert _export(source, "-f", "hf", "-o", str(out), "--force") == 0
    assert f"replacing the earlier export of {source[1]}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neighbour.txt", "pairs.hf"]
    assert set(snapshot(out)) == set(first)  # the same files, written anew
    assert len(load_from_disk(str(out))) == 3
    assert (tmp_path / "neighbour.txt").read_text() == "beside it\n"


def test_hf_force_fills_an_empty_folder(tmp_path, source):
    from datasets import load_from_disk

    (tmp_path / "empty").mkdir()
    assert _export(source, "-f", "hf", "-o", str(tmp_path / "empty")) == 2
    assert _export(source, "-f", "hf", "-o", str(tmp_path / "empty"), "--force") == 0
    assert len(load_from_disk(str(tmp_path / "empty"))) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_file_force_replaces_an_earlier_export_and_its_manifest(tmp_path, source, fmt):
    out = tmp_path / "deep" / "er" / f"pairs.{fmt}"
    assert _export(source, "-f", fmt, "-o", str(out)) == 0  # creates the folders
    side = Path(str(out) + ".flywheel.json")
    m = _manifest(side)
    assert (m["version_id"], m["format"], m["rows"], m["file"]) == (source[1], fmt, 3, out.name)
    assert m["bytes"] == out.stat().st_size
    prompts_v = source[2]
    assert main(["export", prompts_v, "-f", fmt, "-o", str(out), "--force", "--catalog",
                 str(source[0])]) == 0
    assert _manifest(side)["version_id"] == prompts_v
    back = pd.read_parquet(out) if fmt == "parquet" else pd.read_json(out, lines=True)
    assert len(back) == 3 and "prompt_id" in back.columns
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, side.name]


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_failed_file_export_keeps_the_old_one_and_leaves_no_temporary(tmp_path, source, fmt,
                                                                       monkeypatch, capsys):
    out = tmp_path / f"pairs.{fmt}"
    assert _export(source, "-f", fmt, "-o", str(out)) == 0
    before = snapshot(tmp_path)

    def half_written(self, path, *a, **k):
        Path(path).write_bytes(b"half a file")
        raise _enospc(path)

    monkeypatch.setattr(pd.DataFrame, "to_parquet" if fmt == "parquet" else "to_json",
                        half_written)
    assert _export(source, "-f", fmt, "-o", str(out), "--force") == 2
    err = capsys.readouterr().err
    assert f"export failed: {out}: No space left on device" in err and "free space" in err
    assert f"{out} is as it was" in err
    assert snapshot(tmp_path) == before


def test_failed_hf_export_keeps_the_old_one_and_leaves_no_temporary(tmp_path, source,
                                                                     monkeypatch, capsys):
    import datasets

    out = tmp_path / "nested" / "pairs.hf"
    assert _export(source, "-f", "hf", "-o", str(out)) == 0
    before = snapshot(tmp_path)

    def half_saved(self, path, *a, **k):
        Path(path).mkdir()
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"half")
        raise _enospc(Path(path) / "data-00000-of-00001.arrow")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", half_saved)
    assert _export(source, "-f", "hf", "-o", str(out), "--force") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    # a failed first export into new folders removes the folders it made
    assert _export(source, "-f", "hf", "-o", str(tmp_path / "new" / "sub" / "p.hf")) == 2
    assert snapshot(tmp_path) == before
