"""`flywheel report`: the HTML page of per-round figures. Each test runs the real command (or
the library function it calls) on a small catalog made through the real catalog API (the
catalog benchmark's row generator at a tiny scale, with stage events and gate versions), or on
the catalog two real rounds of a tiny model made; it checks the page's figures, captions and
tables, the numbers behind them against the catalog's own views, and bad input."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from flywheel.catalog import Catalog
from tests.conftest import ROOT, catalog_state, run_cli

PNG = b"\x89PNG\r\n\x1a\n"
ROUNDS = 3
#: the gate of round 2 rejects its model, with a reason that must reach the page escaped
REJECTED = "win rate 0.40 < 0.5 <script>alert('x')</script> & more"
#: a self-judging policy that degrades on the canary set: per round, items judged right in
#: both orders, and items whose two orders disagree (of 10 items) -> accuracy, flip rate
CANARY = {1: (9, 1), 2: (6, 2), 3: (4, 2)}
CANARY_ACCURACY = [0.95, 0.7, 0.5]
CANARY_FLIPS = [0.1, 0.2, 0.2]


def _bench():
    spec = importlib.util.spec_from_file_location("flywheel_bench_report",
                                                  ROOT / "bench" / "catalog.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_catalog(path: Path, rounds: int = ROUNDS, scale: float = 0.001) -> Path:
    """A catalog of rounds 0..`rounds` (bench/catalog.py's rows at `scale`: 50 prompts a
    round at 0.001), every version preceded by its `stage` run event, and a gate version per
    round (round 2 rejected), each with the previous round's gate among its parents."""
    bench = _bench()
    commit = bench.Builder.commit

    def with_event(self, kind, rnd, parents, tables):
        if kind == "model" and rnd >= 1:  # per-step training metrics, loss falling
            tables = {**tables, "train_steps": train_steps(rnd)}
        self.cat.event(self.run_id, "stage", round=rnd, stage=kind)
        version = commit(self, kind, rnd, parents, tables)
        if kind == "judgments" and rnd in CANARY:
            self.cat.event(self.run_id, "stage", round=rnd, stage="canary")
            commit(self, "canary", rnd, [version], {"canary_judgments": canary_rows(rnd)})
        return version

    bench.Builder.commit = with_event  # this module object only
    bench.build(path, scale=scale, rounds=rounds, log=lambda *a: None)
    cat = Catalog(path)
    evals = cat.df("SELECT v.version_id, v.round, v.run_id, e.model_version, e.win_rate "
                   "FROM versions v JOIN evals e USING (version_id) "
                   "WHERE v.round >= 1 ORDER BY v.round")
    previous = None
    for ev in evals.to_dict("records"):
        promoted = ev["round"] != 2
        row = {"model_version": ev["model_version"], "eval_version": ev["version_id"],
               "promoted": promoted,
               "reason": "eval.min_win_rate is 0: every model is promoted" if promoted
               else REJECTED, "statistic": "point", "value": ev["win_rate"],
               "threshold": 0.5, "policy_version": ev["model_version"],
               "policy_eval": ev["version_id"]}
        cat.event(ev["run_id"], "stage", round=ev["round"], stage="gate")
        v = cat.commit(kind="gate", run_id=ev["run_id"], round=ev["round"],
                       parents=[ev["version_id"], *([previous] if previous else [])],
                       params={"round": ev["round"]}, fp=f"gate{ev['round']}" * 4,
                       tables={"gates": pd.DataFrame([row])})
        previous = v.version_id
    return path


def train_steps(rnd: int) -> pd.DataFrame:
    return pd.DataFrame([{"phase": "dpo", "step": s, "epoch": s / 5, "loss": 0.7 - 0.04 * s,
                          "reward_accuracy": 0.5 + 0.08 * s, "reward_margin": 0.1 * s * rnd,
                          "learning_rate": 5e-4} for s in range(1, 6)])


def canary_rows(rnd: int) -> pd.DataFrame:
    """10 canary items judged in both orders by the round's judge (the policy it started
    from): CANARY[rnd] right in both orders and in one order only; the rest wrong."""
    both, one = CANARY[rnd]
    rows = []
    for i in range(10):
        for order_ab in (True, False):
            right = i < both or (i < both + one and order_ab)
            rows.append({"round": rnd, "judge": f"policy-r{rnd - 1}", "canary_id": f"c{i}",
                         "kind": "verifier", "order_ab": order_ab,
                         "winner": "good" if right else "bad", "parsed": True,
                         "correct": right, "rationale": None})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return synthetic_catalog(tmp_path_factory.mktemp("report-ws") / "flywheel.duckdb")


def page_parts(index: Path) -> dict:
    """The page's figures (img src, width, caption), links and tables, read from its HTML."""
    html = index.read_text()
    figures = re.findall(r'<figure>\s*<img src="([^"]+)" alt="([^"]*)" width="(\d+)" '
                         r'height="(\d+)">\s*<figcaption>(.*?)</figcaption>', html, re.S)
    return {"html": html, "figures": figures,
            "refs": re.findall(r'(?:src|href)="([^"]*)"', html),
            "tables": re.findall(r"<table>(.*?)</table>", html, re.S)}


def test_report_draws_every_figure_captioned_for_rounds_0_to_n(synthetic, tmp_path):
    before = catalog_state(synthetic)
    out = tmp_path / "r"
    proc = run_cli("report", "--catalog", str(synthetic), "-o", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    index = out / "index.html"
    assert proc.stdout.strip() == str(index)
    parts = page_parts(index)
    figures = parts["figures"]
    assert len(figures) == 10 >= 8
    names = [f[0] for f in figures]
    assert names == sorted(names) and len(set(names)) == 10
    for src, alt, width, height, caption in figures:
        data = (out / src).read_bytes()
        assert data[:8] == PNG, src
        assert (int(width), int(height)) == (int.from_bytes(data[16:20], "big"),
                                             int.from_bytes(data[20:24], "big"))
        assert alt and len(re.sub(r"<[^>]+>", "", caption).strip()) > 40, (src, caption)
    # nothing reaches the network: every src / href is a file beside the page or an anchor
    assert parts["refs"] and not [r for r in parts["refs"]
                                  if re.match(r"(https?:)?//", r, re.I)]
    assert [r for r in parts["refs"] if r.endswith(".png")] == names
    assert "rounds 0–3" in parts["html"]
    # what this catalog has no data for says so, and why
    captions = {src.split("-", 1)[1].removesuffix(".png"): c for src, *_, c in figures}
    for drawn in ("pass-rate", "by-type", "win-rate", "judge", "length", "scores", "pairs",
                  "training", "time", "canary"):
        assert "no data" not in captions[drawn], drawn
    # the tables: the round summary (rounds 1..3) and the gate decisions, escaped
    summary, gates = parts["tables"][0], parts["tables"][-1]
    assert [re.sub(r"<[^>]+>", "", r).strip() for r in
            re.findall(r"<tr><td>(\d+)</td>", summary)] == ["1", "2", "3"]
    assert "<script>" not in parts["html"]
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more" in gates
    assert re.findall(r"<td[^>]*>(promoted|rejected)</td>", gates) == [
        "promoted", "rejected", "promoted"]
    assert catalog_state(synthetic) == before  # read-only


def test_figure_numbers_match_the_catalog(synthetic):
    """The judge's consistency per round equals the `judge_stats` view's (computed there by
    other SQL), pairs per rule equal a plain count, and the lineage covers rounds 0..3 with
    the gates' decisions."""
    from flywheel import htmlreport

    with Catalog(synthetic).read() as con:
        data = htmlreport.collect(con)
        stats = con.execute("SELECT round, order_flip_rate, tie_rate, parse_failure_rate "
                            "FROM judge_stats WHERE judge IN (SELECT judge FROM judgments "
                            "WHERE type <> 'verifier') ORDER BY round"
                            ).df()
        rules = con.execute("SELECT v.round, p.rule, count(*) AS n FROM pairs p "
                            "JOIN versions v USING (version_id) GROUP BY ALL ORDER BY ALL"
                            ).df()
    assert data.rounds == [0, 1, 2, 3]
    assert list(data.evals["round"]) == [0, 1, 2, 3]
    assert [None if pd.isna(p) else bool(p) for p in data.evals.promoted] == [
        None, True, False, True]
    judge = data.get("judge").reset_index(drop=True)
    assert list(judge["round"]) == [1, 2, 3]
    for col, view in (("flip_rate", "order_flip_rate"), ("tie_rate", "tie_rate"),
                      ("parse_failure_rate", "parse_failure_rate")):
        assert judge[col].round(12).tolist() == stats[view].round(12).tolist(), col
    assert 0.05 < judge.flip_rate.mean() < 0.3  # the bench flips 15% of comparisons
    pairs = data.get("pairs").sort_values(["round", "rule"])
    assert pairs[["round", "rule", "n"]].values.tolist() == rules.values.tolist()
    bins, longer = data.get("length_bias")
    assert sorted(set(bins["round"])) == [1, 2, 3] and (bins.n > 0).all()
    assert list(longer["round"]) == [1, 2, 3] and longer.longer_win_share.between(0, 1).all()
    stages = data.get("stages")
    assert {"prompts", "samples", "judgments", "canary", "pairs", "model", "eval",
            "gate"} <= set(stages.stage)
    assert (stages.seconds >= 0).all()


def test_a_degrading_judge_shows_as_drift_in_the_canary_figure(synthetic):
    """A policy that judges itself and gets worse on the canary set: one line through the
    rounds (a new judge each round), accuracy falling, flips rising; the training figure
    draws each round's per-step curves."""
    from matplotlib.figure import Figure

    from flywheel import htmlreport

    with Catalog(synthetic).read() as con:
        data = htmlreport.collect(con)
    canary = data.get("canary")
    assert canary.canary_accuracy.round(6).tolist() == CANARY_ACCURACY
    assert canary.canary_flip_rate.round(6).tolist() == CANARY_FLIPS
    fig = Figure()
    assert htmlreport.fig_canary(fig, data) is None
    ax = fig.axes[0]
    accuracy, flips = ax.lines[0], ax.lines[1]
    assert list(accuracy.get_xdata()) == [1, 2, 3]
    assert [round(y, 6) for y in accuracy.get_ydata()] == CANARY_ACCURACY
    assert [round(y, 6) for y in flips.get_ydata()] == CANARY_FLIPS
    assert "accuracy · the round's judge" in accuracy.get_label()
    assert ax.get_title() == "judges: policy-r0 … policy-r2 (3 in all)"
    fig = Figure()
    assert htmlreport.fig_train(fig, data) is None  # drawn from train_steps, no fallback
    loss = fig.axes[0]
    assert len(loss.lines) == 3  # one per round
    assert [round(y, 6) for y in loss.lines[0].get_ydata()] == [0.66, 0.62, 0.58, 0.54, 0.5]


def test_a_catalog_of_round_0_only_draws_no_data_panels(tmp_path):
    """Rounds without a judge, pairs or training show each figure with "no data", no crash."""
    bench = _bench()
    path = tmp_path / "flywheel.duckdb"
    bench.build(path, scale=0.001, rounds=0, log=lambda *a: None)
    out = tmp_path / "r"
    proc = run_cli("report", "--catalog", str(path), "-o", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    figures = page_parts(out / "index.html")["figures"]
    assert len(figures) == 10
    no_data = [src for src, *_, caption in figures if "no data:" in caption]
    assert no_data == ["03-win-rate.png", "04-judge.png", "05-length.png", "06-scores.png",
                       "07-pairs.png", "08-training.png", "09-time.png", "10-canary.png"]
    assert "no finished round yet" in (out / "index.html").read_text()


def test_workspace_default_folder_and_bad_input(synthetic, tmp_path):
    ws = synthetic.parent
    proc = run_cli("report", "--workspace", str(ws), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(ws / "report" / "index.html")
    assert (ws / "report" / "01-pass-rate.png").is_file()
    # no catalog: the path and what to do, exit 2, nothing created
    missing = tmp_path / "nope" / "flywheel.duckdb"
    proc = run_cli("report", "--catalog", str(missing), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"no catalog at {missing}" in proc.stderr and "flywheel iterate" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = run_cli("report", "--workspace", str(tmp_path / "empty-ws"))
    assert proc.returncode == 2 and str(tmp_path / "empty-ws" / "flywheel.duckdb") in proc.stderr
    # -o names a file
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_cli("report", "--catalog", str(synthetic), "-o", str(blocker))
    assert proc.returncode == 2
    assert f"{blocker}: a file stands there" in proc.stderr and "-o DIR" in proc.stderr
    assert blocker.read_text() == "x"
    # a file that is not a catalog
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"not a database" * 100)
    proc = run_cli("report", "--catalog", str(junk), "-o", str(tmp_path / "o2"))
    assert proc.returncode == 2 and f"cannot open the catalog {junk}" in proc.stderr
    assert not (tmp_path / "o2").exists()
    # one of --workspace / --catalog
    proc = run_cli("report", "--workspace", str(ws), "--catalog", str(synthetic))
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


def test_help_does_not_import_plotting_or_pandas():
    code = ("import sys, contextlib, io\n"
            "from flywheel.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    for argv in (['--help'], ['report', '--help']):\n"
            "        try: main(argv)\n"
            "        except SystemExit: pass\n"
            "print([m for m in ('matplotlib', 'pandas', 'jinja2') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_the_report_setting_is_operational_and_has_a_folder():
    from flywheel.config import config_reference, load_config

    keys = {k: d for k, _, d, _ in config_reference() if k.startswith("report.")}
    assert keys == {"report.enabled": "True", "report.dir": "''"}
    cfg = load_config(None, ["workspace=/tmp/ws-x"])
    assert cfg.report_dir() == Path("/tmp/ws-x/report")
    cfg = load_config(None, ["report.dir=/tmp/elsewhere"])
    assert cfg.report_dir() == Path("/tmp/elsewhere")


def test_iterate_writes_the_report_after_each_round(tiny_catalog):
    """The catalog of two real rounds (`flywheel iterate --no-prefect`, report.enabled by
    default): the report beside it covers rounds 0..2 with the real run's stage times,
    judge and pairs."""
    index = tiny_catalog.parent / "report" / "index.html"
    assert index.is_file()
    parts = page_parts(index)
    assert "rounds 0–2" in parts["html"]
    captions = {src.split("-", 1)[1].removesuffix(".png"): c
                for src, *_, c in parts["figures"]}
    assert len(captions) == 10
    for drawn in ("pass-rate", "win-rate", "pairs", "time"):
        assert "no data" not in captions[drawn], (drawn, captions[drawn])
    gates = parts["tables"][-1]
    assert len(re.findall(r"<td[^>]*>(promoted|rejected)</td>", gates)) == 2
    # written after the last round's gate was committed
    with Catalog(tiny_catalog).read() as con:
        gate_at = con.execute("SELECT max(created_at) FROM versions WHERE kind = 'gate'"
                              ).fetchone()[0]
    written = datetime.fromtimestamp(index.stat().st_mtime, timezone.utc).replace(tzinfo=None)
    assert written >= gate_at


def test_the_report_bench_prints_its_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("flywheel_bench_report_cmd",
                                                  ROOT / "bench" / "report.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--scale", "0.001", "--rounds", "2", "--repeats", "1",
                       "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0] == "| measurement | seconds | CPU seconds | target | met? |"
    assert re.fullmatch(r"\| `flywheel report` \(subprocess, median of 1\) \| [\d.]+ \| "
                        r"[\d.]+ \| < 10 \| (yes|\*\*no\*\*) \|", table[1]), table[1]
    parts = [line.split(" | ")[0].removeprefix("| · ") for line in table[3:]]
    assert parts[0].startswith("base reads") and parts[-1].startswith("drawing 10 figures")
    assert [p.removeprefix("query: ") for p in parts if p.startswith("query: ")] == [
        "judge", "lengths", "length_bias", "scores", "pairs", "train", "train_metrics",
        "stages", "canary"]
    assert "rounds 0–2" in out
    assert bench.main(["--catalog", str(tmp_path / "none.duckdb")]) == 2
    assert "no catalog at" in capsys.readouterr().err


def test_the_round_hook_writes_logs_or_skips_the_report(synthetic, tmp_path):
    """pipeline.write_report, what each round of `flywheel iterate` ends with: the page at
    report.dir (logged); nothing with report.enabled=false; a folder it cannot write is
    logged and the round goes on."""
    from flywheel import pipeline
    from flywheel.config import load_config

    def ctx(*overrides):
        logged = []
        cfg = load_config(None, [f"catalog={synthetic}", *overrides])
        return pipeline.Context(cfg=cfg, run_id="r", catalog=Catalog(synthetic),
                                log=logged.append), logged

    c, logged = ctx("report.enabled=false", f"report.dir={tmp_path / 'off'}")
    assert pipeline.write_report(c, 3) == "" and logged == []
    assert not (tmp_path / "off").exists()
    c, logged = ctx(f"report.dir={tmp_path / 'on'}")
    index = tmp_path / "on" / "index.html"
    assert pipeline.write_report(c, 3) == str(index) and index.is_file()
    assert logged == [f"round 3 · report    {index}"]
    (tmp_path / "blocked").write_text("a file")
    c, logged = ctx(f"report.dir={tmp_path / 'blocked'}")
    assert pipeline.write_report(c, 3) == ""
    assert len(logged) == 1 and logged[0].startswith("round 3 · report    not written: ")
    assert "a file stands there" in logged[0] and "`flywheel report`" in logged[0]
