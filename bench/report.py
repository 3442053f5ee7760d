"""Report benchmark: time `flywheel report` on the catalog benchmark's catalog.

    python bench/report.py [--scale 1.0] [--rounds 10] [--catalog PATH] [--repeats 3]

Builds the catalog as bench/catalog.py does (at --scale 1.0: 10 rounds, 1M samples, 3M
judgments, 500k pairs; about 2.5 minutes on 2 cores) unless --catalog names one already built
(`python bench/catalog.py --out DIR` leaves DIR/bench.duckdb), then prints a markdown table:

- `flywheel report` as a subprocess (interpreter start and imports included): the figure the
  target (10 s) is about,
- the same in-process (`flywheel.cli.main`),
- its parts, one after the other on one connection: the base reads (rounds, lineage, evals,
  gates), each query behind the figures, the summary tables, and drawing the ten figures.

The subprocess and in-process rows are the median of --repeats runs after --warmup; the
parts are one run each (the command runs the queries in a second thread while it draws, so
its wall time is less than their sum).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 10.0


def _catalog_bench():
    spec = importlib.util.spec_from_file_location("flywheel_bench_catalog",
                                                  ROOT / "bench" / "catalog.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: CPU seconds (user + system) of the runs timed, by measurement: on a loaded machine the wall
#: time grows with the load while this does not
CPU: dict[str, list[float]] = {}


def _cpu(children: bool) -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def subprocess_run(catalog: Path, out: Path) -> float:
    t0, c0 = time.perf_counter(), _cpu(True)
    proc = subprocess.run([sys.executable, "-m", "flywheel.cli", "report", "--catalog",
                           str(catalog), "-o", str(out)], capture_output=True, text=True,
                          cwd=ROOT)
    dt = time.perf_counter() - t0
    CPU.setdefault("subprocess", []).append(_cpu(True) - c0)
    if proc.returncode != 0:
        raise RuntimeError(f"flywheel report exited {proc.returncode}: {proc.stderr[-2000:]}")
    return dt


def in_process_run(catalog: Path, out: Path) -> float:
    from flywheel.cli import main

    t0, c0 = time.perf_counter(), _cpu(False)
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["report", "--catalog", str(catalog), "-o", str(out)])
    CPU.setdefault("in-process", []).append(_cpu(False) - c0)
    if rc != 0:
        raise RuntimeError(f"flywheel report exited {rc}")
    return time.perf_counter() - t0


def median_of(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):  # the file in the page cache, imports done
        fn()
    return statistics.median(fn() for _ in range(repeats))


def parts(catalog: Path, out: Path) -> list[tuple[str, float]]:
    """Each part of the command once, one after the other."""
    from flywheel import htmlreport
    from flywheel.catalog import Catalog

    rows = []
    with Catalog(catalog).read() as con:
        t0 = time.perf_counter()
        data = htmlreport.collect_base(con)
        rows.append(("base reads (rounds, lineage, evals, gates)", time.perf_counter() - t0))
        for key, fn in htmlreport.QUERIES:
            t0 = time.perf_counter()
            data.extra[key] = fn(con, data)
            rows.append((f"query: {key}", time.perf_counter() - t0))
        t0 = time.perf_counter()
        htmlreport.tables(con, data)
        rows.append(("summary and gate tables (round_summary view)",
                     time.perf_counter() - t0))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    htmlreport.draw_all(data, out)
    rows.append((f"drawing {len(htmlreport.FIGURES)} figures (matplotlib, Agg)",
                 time.perf_counter() - t0))
    return rows


def machine() -> str:
    import platform

    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}{load}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="row counts × this (default 1.0)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--catalog", default=None,
                    help="time this catalog instead of building one")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-report-") as tmp:
        if args.catalog:
            catalog = Path(args.catalog)
            if not catalog.is_file():
                print(f"error: no catalog at {catalog}: build one with `python "
                      "bench/catalog.py --out DIR` (DIR/bench.duckdb), or leave --catalog "
                      "out", file=sys.stderr)
                return 2
        else:
            catalog = Path(tmp) / "bench.duckdb"
            info = _catalog_bench().build(catalog, args.scale, args.rounds)
            print(f"built in {info['build_s']:.1f}s")
        from flywheel.catalog import Catalog

        with Catalog(catalog).read() as con:
            counts = con.execute(
                "SELECT (SELECT count(*) FROM judgments), (SELECT count(*) FROM samples), "
                "(SELECT count(*) FROM pairs), (SELECT max(round) FROM versions)").fetchone()
        print(f"\ncatalog {catalog}: {counts[0]:,} judgments, {counts[1]:,} samples, "
              f"{counts[2]:,} pairs, rounds 0–{counts[3]} "
              f"({catalog.stat().st_size / 2**20:,.0f} MiB)")
        print(f"machine: {machine()}\n")
        out = Path(tmp) / "report"
        sub = median_of(lambda: subprocess_run(catalog, out), args.repeats, args.warmup)
        inproc = median_of(lambda: in_process_run(catalog, out), args.repeats, args.warmup)
        met = "yes" if sub < TARGET_S else "**no**"
        cpu = {k: statistics.median(v[args.warmup:]) for k, v in CPU.items()}
        print("| measurement | seconds | CPU seconds | target | met? |")
        print("|---|---:|---:|---:|---|")
        print(f"| `flywheel report` (subprocess, median of {args.repeats}) | {sub:.2f} | "
              f"{cpu['subprocess']:.2f} | < {TARGET_S:.0f} | {met} |")
        print(f"| `flywheel report` (in-process, median of {args.repeats}) | {inproc:.2f} | "
              f"{cpu['in-process']:.2f} | | |")
        for name, seconds in parts(catalog, Path(tmp) / "parts"):
            print(f"| · {name} | {seconds:.2f} | | | |")
        print(f"\nafter: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
