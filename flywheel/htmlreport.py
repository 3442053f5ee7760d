"""`flywheel report`: one self-contained HTML page (`index.html`, with a PNG per figure beside
it, linked relatively) of how the loop went, round by round: held-out pass rates with their
intervals and the gate's decisions, pass rate per constraint type, win rate against the
previous policy, the judge's consistency and length bias, the judge's score distribution, pairs
by rule, training curves, time per stage and the judge's accuracy on the canary set; then the
round summary and the gate decisions as `flywheel summary` prints them.

Read-only: every number comes from one read-only connection to the catalog (`Catalog.read`),
aggregated in DuckDB (never millions of rows in Python). A figure whose data the catalog does
not hold (a round without an LLM judge, a catalog older than per-step training metrics) is
drawn as a "no data" panel that says why. matplotlib (Agg) and pandas are imported inside the
functions, so `flywheel --help` does not load them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flywheel.catalog.report_data import (  # noqa: F401  (collect: the library's entry)
    QUERIES,
    STAGES,
    Data,
    collect,
    collect_base,
)
from flywheel.errors import FlywheelError

_RAW = argparse.RawDescriptionHelpFormatter

#: the figure files' size in inches and their resolution (pixels = inches × DPI)
DPI = 80
WIDE = (12.0, 4.0)
TEMPLATE = "report.html.j2"


# -- the command ----------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> dict:
    """Add `report` to `sub`; return {command name: function(args) -> int}."""
    rp = sub.add_parser(
        "report", help="write an HTML page of per-round figures (pass rates, win rates, the "
                       "judge's consistency and drift, pairs, training, time)",
        description="Write DIR/index.html with a PNG figure per question beside it (no network "
                    "needed to view it): held-out pass rate per round (in-distribution and "
                    "transfer, 95%% intervals, the gate's decision), pass rate per constraint "
                    "type, win rate against the previous policy with the gate threshold, judge "
                    "consistency (order flips, first-position wins, ties, parse failures), "
                    "length bias, judge score distribution, pairs by rule, training curves, "
                    "time per stage and the judge's canary accuracy; then the round summary "
                    "and the gate decisions. Read-only on the catalog.",
        epilog="example:\n  flywheel report\n  flywheel report -o /tmp/r --catalog "
               "runs/exp1/flywheel.duckdb\n  flywheel report --workspace runs/exp1",
        formatter_class=_RAW)
    rp.add_argument("-o", "--out", metavar="DIR", default=None,
                    help="folder to write index.html and the figures to (default: "
                         "<workspace>/report, or report/ beside --catalog)")
    where = rp.add_mutually_exclusive_group()
    where.add_argument("--workspace", metavar="DIR", default=None,
                       help="the workspace whose catalog (DIR/flywheel.duckdb) to read "
                            "(default: data)")
    where.add_argument("--catalog", metavar="PATH", default=None,
                       help="the catalog file (default <workspace>/flywheel.duckdb)")
    return {"report": cmd_report}


def cmd_report(args) -> int:
    from flywheel.config import catalog_path

    path = catalog_path(workspace=args.workspace or "data", catalog=args.catalog)
    out = Path(args.out) if args.out else default_dir(path)
    index = write_report(path, out)
    print(index)
    return 0


def default_dir(catalog: Path) -> Path:
    """Where the report goes by default: `report/` beside the catalog (<workspace>/report)."""
    return Path(catalog).parent / "report"


# -- the page -------------------------------------------------------------------------------
@dataclass
class Figure:
    """One figure of the page: its anchor name, title, one-line caption, file (relative to the
    page), pixel size, and why it shows no data (None when it does)."""

    name: str
    title: str
    caption: str
    file: str = ""
    width: int = 0
    height: int = 0
    no_data: str | None = None


class NoData(Exception):
    """Raised by a figure's drawing function: the catalog holds nothing it could draw."""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    empty: str = ""


def write_report(catalog: str | Path, out: str | Path) -> Path:
    """Write `out/index.html` and its figures from the catalog at `catalog` (read-only);
    return the page's path. A missing catalog, or a folder that cannot be written, is a clear
    error; the catalog is never written."""
    from flywheel.catalog import Catalog

    t0 = time.perf_counter()
    catalog, out = Path(catalog), Path(out)
    cat = Catalog(catalog)
    if not catalog.is_file():
        raise FlywheelError(f"no catalog at {catalog}", details=[
            "run `flywheel iterate` first, or point --catalog PATH (or --workspace DIR) at "
            "an existing catalog"])
    if out.exists() and not out.is_dir():
        raise FlywheelError(f"{out}: a file stands there, not a folder",
                            details=["give a folder for index.html and its figures (-o DIR, "
                                     "or report.dir for the report of each round)"])
    with cat.read() as con:
        data = collect_base(con)
        out.mkdir(parents=True, exist_ok=True)
        # DuckDB reads in a second thread (it releases the GIL), one query after the other,
        # while this thread draws each figure as soon as its numbers are in
        from concurrent.futures import ThreadPoolExecutor

        worker = con.cursor()
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="report-sql") as pool:
                for key, fn in QUERIES:
                    data.extra[key] = pool.submit(fn, worker, data)
                tabled = pool.submit(tables, worker, data)
                figures = draw_all(data, out)
                summary, by_type, gates = tabled.result()
        finally:
            worker.close()
    page = render(catalog=str(catalog), figures=figures, summary=summary, by_type=by_type,
                  gates=gates, rounds=data.rounds, seconds=time.perf_counter() - t0)
    index = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, index)
    return index


def render(*, catalog: str, figures: list[Figure], summary: Table, by_type: Table,
           gates: Table, rounds: list[int], seconds: float) -> str:
    """The page's HTML (jinja2, every value escaped)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("flywheel", "report_templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    rounds_text = f"{rounds[0]}–{rounds[-1]}" if rounds else "none"
    return env.get_template(TEMPLATE).render(
        title=Path(catalog).name, catalog=catalog, figures=figures, summary=summary,
        by_type=by_type, gates=gates, rounds_text=rounds_text,
        made_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        seconds=f"{seconds:.1f}s")


def tables(con, data: Data) -> tuple[Table, Table, Table]:
    """The round summary (and its per-type table) as `flywheel summary` prints them, and the
    gate decisions, as strings for the page."""
    from flywheel import report

    evals = [v for v, r in zip(data.evals.version_id, data.evals["round"]) if r >= 1]
    rows = report.rows_of(con, evals)
    headers, cells = report.table_cells(rows)
    summary = Table(headers, cells, "no finished round yet (no eval of round 1 or later)")
    th, tc = report.by_type_cells(rows[-1]) if rows else ([], [])
    by_type = Table(th, tc)
    gh = ["round", "eval version", "gate", "statistic", "value", "threshold", "reason"]
    gr = []
    for r in data.evals.to_dict("records"):
        if r["round"] < 1 or r.get("promoted") is None or _nan(r.get("promoted")):
            continue
        gr.append([str(r["round"]), r["version_id"],
                   "promoted" if r["promoted"] else "rejected", str(r.get("statistic") or "–"),
                   _fmt(r.get("gate_value"), "{:.3f}"), _fmt(r.get("threshold"), "{:.3f}"),
                   str(r.get("reason") or "")])
    gates = Table(gh, gr, "no gate decisions in this catalog (rounds made before the "
                          "promotion gate existed, or no round yet)")
    return summary, by_type, gates


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(v, spec: str) -> str:
    return "–" if _nan(v) else spec.format(v)


# -- the figures ----------------------------------------------------------------------------
def draw_all(data: Data, out: Path) -> list[Figure]:
    """Draw every figure to `out/NN-name.png`; a figure without data is a panel saying so."""
    # Figure objects without pyplot: no global state, no GUI backend, a faster import; a
    # PNG is drawn by Agg
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    figures = []
    for i, (fn, name, title, caption, size) in enumerate(FIGURES, 1):
        f = Figure(name=name, title=title, caption=caption, file=f"{i:02d}-{name}.png")
        # fixed margins: a layout engine would double the drawing time
        fig = MplFigure(figsize=size, dpi=DPI)
        FigureCanvasAgg(fig)
        fig.subplots_adjust(left=0.07, right=0.97, top=0.9, bottom=0.14, wspace=0.25)
        try:
            f.no_data = fn(fig, data)  # a figure drawn from a fallback says why
        except NoData as exc:
            f.no_data = str(exc)
            fig.clf()
            fig.text(0.5, 0.5, f"{title}\n\nno data: {exc}", ha="center", va="center",
                     fontsize=12, color="#a15c00", wrap=True)
        fig.savefig(out / f.file, dpi=DPI)
        w, h = fig.canvas.get_width_height()
        f.width, f.height = int(w), int(h)
        figures.append(f)
    return figures


def wilson(p: float, n: int) -> tuple[float, float]:
    from flywheel.stages.evaluate import wilson as _wilson

    return _wilson(p, int(n))


def _split(params: dict, split: str, key: str):
    return (((params or {}).get("splits") or {}).get(split) or {}).get(key)


def _xrounds(ax, rounds: list[int]) -> None:
    ax.set_xticks(rounds)
    ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)


def _need_rounds(data: Data) -> list[int]:
    if not data.rounds:
        raise NoData("the catalog holds no versions yet (`flywheel iterate` makes them)")
    return data.rounds


def fig_pass_rate(fig, data: Data) -> None:
    rounds = _need_rounds(data)
    ev = data.evals
    if not len(ev):
        raise NoData("no eval versions (round 0's eval measures the base model)")
    ax = fig.add_subplot(1, 1, 1)
    from flywheel.report import IN_DISTRIBUTION, TRANSFER

    drawn = False
    for split, label, color, dx in ((IN_DISTRIBUTION, "in-distribution", "C0", -0.06),
                                    (TRANSFER, "transfer", "C1", 0.06)):
        xs, ys, lo, hi = [], [], [], []
        for r in ev.to_dict("records"):
            p, n = _split(r["params"], split, "pass_rate"), _split(r["params"], split, "prompts")
            if p is None and split == IN_DISTRIBUTION and not _nan(r["pass_rate"]):
                p, n = r["pass_rate"], r["n_prompts"]  # an eval made before splits
            if p is None or not n:
                continue
            a, b = wilson(p, n)
            xs.append(r["round"] + dx)
            ys.append(p)
            lo.append(p - a)
            hi.append(b - p)
        if xs:
            drawn = True
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="-o", color=color, capsize=4, label=label)
    if not drawn:
        raise NoData("the evals hold no pass rate (their prompts carry no constraints)")
    for r in ev.to_dict("records"):
        if r["round"] < 1 or _nan(r.get("promoted")):
            continue
        ok = bool(r["promoted"])
        ax.axvspan(r["round"] - 0.5, r["round"] + 0.5, color="green" if ok else "red",
                   alpha=0.06)
        ax.annotate("promoted" if ok else "rejected", (r["round"], 1.02),
                    xycoords=("data", "axes fraction"), ha="center", fontsize=9,
                    color="green" if ok else "red")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of constraints passed")
    _xrounds(ax, rounds)
    ax.legend(loc="lower right")


def fig_by_type(fig, data: Data) -> None:
    import numpy as np

    rounds = _need_rounds(data)
    from flywheel.report import IN_DISTRIBUTION, TRANSFER

    panels = []
    for split, label in ((IN_DISTRIBUTION, "in-distribution"), (TRANSFER, "transfer")):
        cells: dict[tuple[str, int], float] = {}
        for r in data.evals.to_dict("records"):
            by_type = _split(r["params"], split, "by_type")
            if by_type is None and split == IN_DISTRIBUTION:
                raw = r.get("pass_by_type")
                old = json.loads(raw) if isinstance(raw, str) else (raw or {})
                by_type = {t: {"pass_rate": v} for t, v in old.items()
                           if isinstance(v, int | float)}
            for t, v in (by_type or {}).items():
                if v.get("pass_rate") is not None:
                    cells[(t, int(r["round"]))] = float(v["pass_rate"])
        if cells:
            panels.append((label, cells))
    if not panels:
        raise NoData("no eval holds pass rates per constraint type")
    fig.subplots_adjust(left=0.1, right=0.88, wspace=0.45)
    for i, (label, cells) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        types = sorted({t for t, _ in cells})
        grid = np.full((len(types), len(rounds)), np.nan)
        for (t, r), v in cells.items():
            if r in rounds:
                grid[types.index(t), rounds.index(r)] = v
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(types)), types, fontsize=8)
        ax.set_xticks(range(len(rounds)), [str(r) for r in rounds])
        ax.set_xlabel("round")
        ax.set_title(label)
        if len(rounds) * len(types) <= 120:
            for (yi, xi), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(xi, yi, f"{v:.0%}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 else "black")
    fig.colorbar(im, cax=fig.add_axes((0.91, 0.14, 0.015, 0.76)), label="pass rate")


def fig_win_rate(fig, data: Data) -> None:
    rounds = _need_rounds(data)
    ev = data.evals[(data.evals["round"] >= 1) & data.evals.win_rate.notna()]
    if not len(ev):
        raise NoData("no round with a win rate against the previous policy yet")
    ax = fig.add_subplot(1, 1, 1)
    rows = ev.to_dict("records")
    xs = [r["round"] for r in rows]
    ys = [r["win_rate"] for r in rows]
    lo, hi = [], []
    for r in rows:
        a, b = r["ci_low"], r["ci_high"]
        if _nan(a):
            a, b = wilson(r["win_rate"], r["n_prompts"])
        lo.append(max(0.0, r["win_rate"] - a))
        hi.append(max(0.0, b - r["win_rate"]))
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color="C0", capsize=4,
                label="win rate (95% interval)")
    for r in rows:
        if not _nan(r.get("promoted")):
            ok = bool(r["promoted"])
            ax.plot(r["round"], r["win_rate"], marker="^" if ok else "x", markersize=11,
                    color="green" if ok else "red", linestyle="none")
    ths = [(r["round"], r["threshold"] if not _nan(r.get("threshold"))
            else r.get("config_min_win_rate")) for r in rows]
    ths = [(x, t) for x, t in ths if not _nan(t)]
    if ths:
        ax.step([x for x, _ in ths], [t for _, t in ths], where="mid", color="red",
                linestyle="--", label="gate threshold (eval.min_win_rate)")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs previous policy (ties ½)")
    _xrounds(ax, rounds)
    ax.legend(loc="lower right", fontsize=9)


def fig_judge(fig, data: Data) -> None:
    rounds = _need_rounds(data)
    j = data.get("judge")
    if not len(j):
        raise NoData("no LLM judgments (every round's pairs were decided by verifiers only, "
                     "or no round yet)")
    ax = fig.add_subplot(1, 1, 1)
    for col, label, color in (("flip_rate", "order-flip rate", "C3"),
                              ("first_win_share", "first-position win share", "C0"),
                              ("tie_rate", "tie rate", "C2"),
                              ("parse_failure_rate", "parse failures", "C7")):
        d = j[j[col].notna()]
        if len(d):
            ax.plot(d["round"], d[col], "-o", color=color, label=label)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share")
    _xrounds(ax, rounds)
    ax.legend(loc="best", fontsize=9)


def fig_length(fig, data: Data) -> None:
    rounds = _need_rounds(data)
    (bins, longer), lengths = data.get("length_bias"), data.get("lengths")
    evals = data.evals
    ev_chars = [(r["round"], _split(r["params"], "in_distribution", "mean_chars"))
                for r in evals.to_dict("records")]
    ev_chars = [(x, c) for x, c in ev_chars if c is not None]
    if not len(bins) and not len(longer) and not len(lengths) and not ev_chars:
        raise NoData("no judged or sampled answers yet")
    import matplotlib as mpl

    fig.subplots_adjust(left=0.06, right=0.99, wspace=0.3, top=0.9)
    a1, a2, a3 = fig.subplots(1, 3)
    if len(bins):
        cmap = mpl.colormaps["viridis"]
        last = max(rounds) or 1
        for r, d in bins.groupby("round"):
            width = float(d.width.iloc[0])
            a1.plot((d.bin + 0.5) * width, d.mean_score, "-o", markersize=3,
                    color=cmap(0.85 * r / last), label=f"round {r}")
        a1.set_xlabel("answer length (tokens, binned)")
        a1.set_ylabel("mean pointwise score")
        a1.legend(fontsize=7, ncol=2)
    else:
        a1.text(0.5, 0.5, "no data: no pointwise scores", ha="center", va="center",
                transform=a1.transAxes, color="#a15c00")
    a1.set_title("score vs answer length", fontsize=10)
    a1.grid(alpha=0.3)
    if len(longer):
        a2.plot(longer["round"], longer.longer_win_share, "-o", color="C4")
        a2.axhline(0.5, color="grey", linestyle=":")
        a2.set_ylim(0, 1)
        a2.set_ylabel("share won by the longer answer")
    else:
        a2.text(0.5, 0.5, "no data: no pairwise verdicts", ha="center", va="center",
                transform=a2.transAxes, color="#a15c00")
    a2.set_title("pairwise: longer answer wins", fontsize=10)
    _xrounds(a2, rounds)
    if len(lengths):
        a3.plot(lengths["round"], lengths.mean_chars, "-o", label="sampled answers")
    if ev_chars:
        a3.plot([x for x, _ in ev_chars], [c for _, c in ev_chars], "-s",
                label="eval answers (in-distribution)")
    a3.set_ylabel("mean answer length (characters)")
    a3.set_title("answer length per round", fontsize=10)
    a3.legend(fontsize=8)
    _xrounds(a3, rounds)


def fig_scores(fig, data: Data) -> None:
    import numpy as np

    rounds = _need_rounds(data)
    s = data.get("scores")
    if not len(s):
        raise NoData("no pointwise judge scores (pairwise judging, or verifiers only)")
    lo, hi = float(s.score.min()), float(s.score.max())
    integer = bool((s.score == s.score.round()).all()) and hi - lo <= 20
    if integer:
        edges = np.arange(lo - 0.5, hi + 1.5)
        labels = [f"{v:g}" for v in np.arange(lo, hi + 1)]
    else:
        edges = np.linspace(lo, hi + 1e-9, 11)
        step = (edges[1] - edges[0]) or 1.0
        digits = max(1, 1 - math.floor(math.log10(step)))
        labels = [f"{a:.{digits}f}–{b:.{digits}f}" for a, b in zip(edges[:-1], edges[1:])]
    grid = np.zeros((len(labels), len(rounds)))
    for r, d in s.groupby("round"):
        counts, _ = np.histogram(d.score, bins=edges, weights=d.n)
        total = counts.sum()
        if total and r in rounds:
            grid[:, rounds.index(r)] = counts / total
    fig.subplots_adjust(left=0.1, right=1.0)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="Blues", vmin=0)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(len(rounds)), [str(r) for r in rounds])
    ax.set_xlabel("round")
    ax.set_ylabel("pointwise score")
    if grid.size <= 200:
        for (yi, xi), v in np.ndenumerate(grid):
            if v > 0:
                ax.text(xi, yi, f"{v:.0%}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="share of the round's scores", pad=0.02)


def fig_pairs(fig, data: Data) -> None:
    rounds = _need_rounds(data)
    p = data.get("pairs")
    if not len(p):
        raise NoData("no pairs yet")
    ax = fig.add_subplot(1, 1, 1)
    table = p.pivot_table(index="round", columns="rule", values="n", aggfunc="sum",
                          fill_value=0).reindex(rounds, fill_value=0)
    bottom = [0] * len(rounds)
    for i, rule in enumerate(table.columns):
        ax.bar(rounds, table[rule], bottom=bottom, label=rule, color=f"C{i}")
        bottom = [b + v for b, v in zip(bottom, table[rule])]
    ax.set_ylabel("pairs")
    _xrounds(ax, rounds)
    ax.legend(title="decided by", fontsize=9)


def fig_train(fig, data: Data) -> None:
    rounds = _need_rounds(data)
    t = data.get("train")
    if t is None or not len(t):
        m = data.get("train_metrics")
        m = m[m.loss.notna()]
        why = ("this catalog has no train_steps table (made before per-step training "
               "metrics were stored; `flywheel migrate` adds it)" if t is None else
               "train_steps holds no per-step training metrics for these rounds")
        if not len(m):
            raise NoData(why)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(m["round"], m.loss, "-o", label="final train loss (models.metrics)")
        ax.set_ylabel("loss")
        ax.set_title("final train loss per round", fontsize=10)
        _xrounds(ax, rounds)
        ax.legend(fontsize=9)
        return f"{why}; drawn instead: each round's final train loss"
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis"]
    last = max(rounds) or 1
    models = set(data.lineage.model_version)
    if models & set(t.version_id):  # the lineage's models (a round may have several)
        t = t[t.version_id.isin(models)]
    fig.subplots_adjust(left=0.05, right=0.99, wspace=0.2)
    axes = fig.subplots(1, 3)
    for ax, col, label in zip(axes, ("loss", "reward_accuracy", "reward_margin"),
                              ("loss", "reward accuracy", "reward margin")):
        d = t[t[col].notna()] if col in t else t.iloc[0:0]
        for (r, phase, _), g in d.groupby(["round", "phase", "version_id"]):
            g = g.sort_values("step")
            sft = str(phase) == "sft"
            ax.plot(g.step, g[col], "--" if sft else "-", color=cmap(0.85 * int(r) / last),
                    marker="." if len(g) <= 40 else None,
                    label=f"round {r}" + (" (sft)" if sft else ""))
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not len(d):
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes,
                    color="#a15c00")
    axes[0].legend(fontsize=7)


def fig_stages(fig, data: Data) -> None:
    rounds = _need_rounds(data)
    s = data.get("stages")
    if not len(s):
        raise NoData("no stage events (run_events) for the lineage's versions: rounds made "
                     "before run events were recorded, or reused from another catalog")
    ax = fig.add_subplot(1, 1, 1)
    table = s.pivot_table(index="round", columns="stage", values="seconds", aggfunc="sum",
                          fill_value=0).reindex(rounds, fill_value=0)
    cols = [c for c in STAGES if c in table.columns] + \
        [c for c in table.columns if c not in STAGES]
    bottom = [0.0] * len(rounds)
    for i, stage in enumerate(cols):
        ax.bar(rounds, table[stage], bottom=bottom, label=stage, color=f"C{i}")
        bottom = [b + v for b, v in zip(bottom, table[stage])]
    ax.set_ylabel("seconds")
    _xrounds(ax, rounds)
    ax.legend(fontsize=8, ncol=2)


def fig_canary(fig, data: Data) -> None:
    rounds = _need_rounds(data)
    c = data.get("canary")
    if c is None:
        raise NoData("this catalog has no canary_judgments table (made before canary sets "
                     "were judged; `flywheel migrate` adds it)")
    if not len(c):
        raise NoData("no canary set was judged in any round")
    ax = fig.add_subplot(1, 1, 1)
    if c.groupby("round").judge.nunique().max() == 1:
        # one judge a round (pinned, or the policy judging itself): one line through the
        # rounds, so a judge that changes with the policy shows as drift
        series = [("the round's judge", c)]
        judges = list(dict.fromkeys(c.sort_values("round").judge))
        if len(judges) > 1:
            ax.set_title(f"judges: {_short(judges[0])} … {_short(judges[-1])} "
                         f"({len(judges)} in all)", fontsize=9)
        else:
            ax.set_title(f"judge: {_short(judges[0])}", fontsize=9)
    else:
        series = [(_short(j), d) for j, d in c.groupby("judge")]
    for i, (name, d) in enumerate(series):
        d = d.sort_values("round")
        ax.plot(d["round"], d.canary_accuracy, "-o", color=f"C{i}",
                label=f"accuracy · {name}")
        ax.plot(d["round"], d.canary_flip_rate, "--s", color=f"C{i}", alpha=0.7,
                label=f"flip rate · {name}")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of canary items")
    _xrounds(ax, rounds)
    ax.legend(fontsize=8)


def _short(name, width: int = 28) -> str:
    name = str(name)
    return name if len(name) <= width else name[:width - 1] + "…"


#: (draw function, anchor name, title, caption, size in inches)
FIGURES = [
    (fig_pass_rate, "pass-rate", "Held-out pass rate per round",
     "Share of the held-out prompts' constraints the model passes, per round (0 = the base "
     "model), in-distribution and transfer, with 95% Wilson intervals over prompts; shaded "
     "rounds: the gate promoted (green) or rejected (red) that round's model.", WIDE),
    (fig_by_type, "by-type", "Pass rate per constraint type × round",
     "Each cell: the share of one constraint type's checks passed in that round's eval; read a "
     "row left to right to see a type improve (in-distribution left, transfer right).",
     (12.0, 4.5)),
    (fig_win_rate, "win-rate", "Win rate against the previous policy",
     "Each round's model against the policy it started from on the held-out prompts (ties "
     "count half), with its 95% interval; dashed: the gate threshold; ▲ promoted, ✕ rejected; "
     "dotted: 0.5, a tie with the previous policy.", WIDE),
    (fig_judge, "judge", "Judge consistency per round",
     "Order-flip rate: comparisons whose two orders name different winners (0 = consistent); "
     "first-position win share: 0.5 = no position bias; tie rate; parse failures: judge "
     "outputs with no verdict.", WIDE),
    (fig_length, "length", "Length bias and answer length",
     "Left: mean pointwise score by answer length (a rising line = the judge rewards length); "
     "middle: share of pairwise verdicts won by the longer answer (0.5 = no bias); right: mean "
     "answer length per round.", WIDE),
    (fig_scores, "scores", "Judge score distribution per round",
     "Each column: how a round's pointwise scores spread over the scale (shares sum to 1); a "
     "column creeping upward while pass rates stay flat suggests a lenient judge.", WIDE),
    (fig_pairs, "pairs", "Pairs per round by rule",
     "Preference pairs each round produced, by what decided them: verifier (constraint "
     "checks), llm (the judge) or spin (gold answer vs the model's).", WIDE),
    (fig_train, "training", "Training curves per round",
     "Per-step DPO loss, reward accuracy (share of pairs whose chosen answer gets the higher "
     "implicit reward) and reward margin, one line per round: a converging round ends with "
     "loss down and accuracy up.", WIDE),
    (fig_stages, "time", "Time per stage per round",
     "Seconds from each stage's start to its version's commit, stacked per round; a stage "
     "reused from the catalog takes no time.", WIDE),
    (fig_canary, "canary", "Judge accuracy and flip rate on the canary set",
     "The round's judge on a fixed set of comparisons with known answers, judged in both "
     "orders: accuracy (solid) should stay flat; a falling line means the judge is drifting; "
     "flip rate (dashed) is the share whose two orders disagree.", WIDE),
]
