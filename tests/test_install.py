"""A non-editable install runs a round with the templates it ships.

flywheel is installed (`pip install --no-deps --no-build-isolation`, not editable) into a fresh
virtualenv that sees this environment's installed dependencies through a .pth file (nothing is
downloaded), then `flywheel iterate --rounds 1` runs from a directory outside the repository
that has no prompts/ folder: the default templates must come from the installed package.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import duckdb
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

ROUND_KINDS = {"prompts", "samples", "judgments", "canary", "pairs", "model", "eval", "gate"}


def sh(*cmd: str | Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `cmd` with no PYTHONPATH (so nothing points back at the checkout); fail loudly."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONUNBUFFERED="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with flywheel installed from a copy of the source (non-editable)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("flywheel", "flows"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    site = Path(sh(venv / "bin" / "python", "-c",
                   "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp
                   ).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "flywheel_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    sh(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-build-isolation",
       "--ignore-installed", "--quiet", src, cwd=tmp)
    shutil.rmtree(src)  # the installed copy must not need its sources
    return venv


def test_the_install_is_a_copy_with_the_templates(installed, tmp_path):
    python = installed / "bin" / "python"
    out = sh(python, "-c", "import flywheel.templates as t; print(t.__file__); "
             "print(t.find_template('pointwise.j2')); print(t.available_templates())",
             cwd=tmp_path).stdout.splitlines()
    site = str(installed / "lib")
    assert out[0].startswith(site) and not out[0].startswith(str(ROOT))
    assert out[1] == str(Path(out[0]).parent / "default_prompts" / "pointwise.j2")
    assert out[2] == str(sorted(p.name for p in (ROOT / "prompts").glob("*.j2")))
    shipped = Path(out[0]).parent / "default_prompts"
    for template in (ROOT / "prompts").glob("*.j2"):
        assert (shipped / template.name).read_bytes() == template.read_bytes()
    assert (installed / "bin" / "flywheel").is_file()


def test_an_installed_flywheel_runs_a_round_outside_the_repository(installed, tiny_model,
                                                                   tmp_path):
    work = tmp_path / "elsewhere"
    (work / "data").mkdir(parents=True)
    shutil.copy2(ROOT / "configs" / "tiny.yaml", work / "tiny.yaml")
    for name in ("seed_prompts.jsonl", "eval_prompts.jsonl", "canary.jsonl"):
        shutil.copy2(ROOT / "data" / name, work / "data" / name)
    assert not (work / "prompts").exists()
    proc = sh(installed / "bin" / "flywheel", "iterate", "--rounds", "1", "--no-prefect",
              "--config", "tiny.yaml", "--set", f"models.policy={tiny_model}",
              "--set", "workspace=ws", "--set", "judge.verdict=logprobs",
              "--set", "pairs.min_margin=0", "--set", "pairs.require_agreement=false",
              cwd=work)
    assert "done: round 1" in proc.stderr

    con = duckdb.connect(str(work / "ws" / "flywheel.duckdb"), read_only=True)
    kinds = {k for (k,) in con.execute("SELECT kind FROM versions WHERE round = 1").fetchall()}
    assert kinds == ROUND_KINDS
    method = con.execute("SELECT method FROM models JOIN versions USING (version_id) "
                         "WHERE round = 1").fetchone()[0]
    assert method == "dpo"
    hashes = dict(con.execute("SELECT type, list(DISTINCT template_hash) FROM judgments "
                              "WHERE template_hash IS NOT NULL GROUP BY type").fetchall())

    def digest(name: str) -> str:
        return hashlib.sha256((ROOT / "prompts" / name).read_bytes()).hexdigest()[:16]

    assert hashes == {"pointwise": [digest("pointwise.j2")],
                      "pairwise": [digest("pairwise.j2")]}
