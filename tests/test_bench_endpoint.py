"""Smoke test of the endpoint benchmark (bench/endpoint.py) at a tiny scale: one run in a
subprocess against a real llama.cpp server; the tables' shape and values, and the JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import BUNDLED, ROOT

SCRIPT = ROOT / "bench" / "endpoint.py"
KEY = "bench-key-not-secret-4711"
CALLS = 4  # judge calls: 2 answer pairs × 2 orders
ARGS = ["--comparisons", str(CALLS), "--max-new-tokens", "8", "--replicas", "1",
        "--dtypes", "float32", "--answer-tokens", "8", "--extra", '{"repeat_penalty": 1.0}']
AGREEMENT_ROWS = [
    "judge calls (n)", "argmax verdict agreement", "agreement ≥ 90%",
    "mean abs difference of P(A), P(B), P(C)", "max abs difference of P(A), P(B), P(C)",
    "mean abs difference where the rationales are identical / differ",
    "identical rationales", "agreement where the rationales are identical",
    "agreement where the rationales differ", "verdicts in-process (A / B / C / none)",
    "verdicts through the endpoint (A / B / C / none)"]
THROUGHPUT_COLUMNS = ["backend", "setting", "requests", "wall s", "requests/s",
                      "completion tokens/s", "where the time goes"]


def tables(out: str) -> list[list[dict]]:
    """The markdown tables of `out`, each a list of {column: cell} rows."""
    found, current = [], []
    for line in out.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            head, rule, *rows = current
            assert set("".join(rule)) == {"-"}, rule
            found.append([dict(zip(head, r, strict=True)) for r in rows])
            current = []
    return found


def fraction(cell: str) -> tuple[int, int, float | None]:
    """"3/4 = 75.0%" -> (3, 4, 75.0); "0/0" -> (0, 0, None)."""
    m = re.fullmatch(r"(\d+)/(\d+)(?: = ([\d.]+)%)?", cell)
    assert m, cell
    return int(m[1]), int(m[2]), float(m[3]) if m[3] else None


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    if importlib.util.find_spec("llama_cpp") is None:
        reason = "llama-cpp-python is not installed: run `make setup`"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the endpoint tests must run on CI)")
        pytest.skip(reason)
    if not (BUNDLED / "config.json").is_file():
        pytest.skip("bundled model not converted: run `make setup`")
    out = tmp_path_factory.mktemp("bench-endpoint") / "numbers.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FLYWHEEL_API_KEY": KEY})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text()), out.read_text()


def test_agreement_table_is_computed_over_the_stated_n(bench):
    proc, data, _ = bench
    agreement, _ = tables(proc.stdout)
    rows = {r["measurement"]: r["value"] for r in agreement}
    assert [r["measurement"] for r in agreement] == AGREEMENT_ROWS
    assert rows["judge calls (n)"] == f"{CALLS} ({CALLS // 2} answer pairs × 2 orders)"
    agree, n, pct = fraction(rows["argmax verdict agreement"])
    assert n == CALLS and 0 <= agree <= n
    assert 0.0 <= pct <= 100.0 and pct == round(100 * agree / n, 1)
    assert rows["agreement ≥ 90%"] == ("yes" if pct >= 90 else "**no**")
    same, n_same, _ = fraction(rows["identical rationales"])
    assert n_same == CALLS
    agree_same, of_same, _ = fraction(rows["agreement where the rationales are identical"])
    agree_diff, of_diff, _ = fraction(rows["agreement where the rationales differ"])
    assert (of_same, of_diff) == (same, CALLS - same) and agree_same + agree_diff == agree
    for key in ("verdicts in-process (A / B / C / none)",
                "verdicts through the endpoint (A / B / C / none)"):
        counts = re.fullmatch(r"A (\d+) / B (\d+) / C (\d+) / none (\d+)", rows[key])
        assert counts and sum(map(int, counts.groups())) == CALLS, rows[key]
    mean = float(rows["mean abs difference of P(A), P(B), P(C)"])
    assert 0.0 <= mean <= float(rows["max abs difference of P(A), P(B), P(C)"]) <= 1.0

    # the JSON holds the same numbers, and each call they are counted from
    a = data["agreement"]
    assert (a["n"], a["agree"], a["identical_rationales"]) == (n, agree, same)
    assert (a["agree_differ"], a["differ"]) == (agree_diff, of_diff)
    assert f"{a['agreement_pct']:.1f}" == f"{pct:.1f}"
    assert f"{a['mean_abs_diff']:.4f}" == rows["mean abs difference of P(A), P(B), P(C)"]
    parts = [None if v is None else f"{v:.4f}" for v in (a["mean_abs_diff_identical"],
                                                         a["mean_abs_diff_differ"])]
    assert rows["mean abs difference where the rationales are identical / differ"] == \
        " / ".join(p or "n/a" for p in parts)
    assert (parts[0] is None) == (same == 0) and (parts[1] is None) == (same == CALLS)
    calls = a["calls"]
    assert len(calls) == CALLS and sum(c["agree"] for c in calls) == agree
    assert [c["order"] for c in calls] == ["own answer as A"] * 2 + ["own answer as B"] * 2
    for c in calls:
        assert c["agree"] == (c["verdict_inprocess"] is not None
                              and c["verdict_inprocess"] == c["verdict_endpoint"])
        assert c["same_rationale"] == (c["rationale_inprocess"] == c["rationale_endpoint"])
        assert set(c["probs_inprocess"]) == set(c["probs_endpoint"]) == {"A", "B", "C"}
    diffs = [d for c in calls for d in c["abs_diff"].values()]
    assert sum(diffs) / len(diffs) == pytest.approx(a["mean_abs_diff"])


def test_throughput_table_counts_the_workload_and_matches_the_json(bench):
    proc, data, _ = bench
    _, throughput = tables(proc.stdout)
    assert list(throughput[0]) == THROUGHPUT_COLUMNS
    assert [(r["backend"], r["setting"]) for r in throughput] == [
        ("transformers (in-process)", f"float32, batch 16, {data['machine']['torch_threads']} "
                                      "torch threads"),
        ("openai → llama.cpp server (Q4_1 GGUF)",
         "1 replica (llama.cpp default threads), concurrency 1")]
    assert len(data["throughput"]) == len(throughput)
    for row, num in zip(throughput, data["throughput"]):
        assert int(row["requests"]) == num["requests"] == CALLS
        assert row["wall s"] == f"{num['wall_s']:.2f}" and num["wall_s"] > 0
        assert row["requests/s"] == f"{num['requests_per_s']:.2f}"
        assert num["requests_per_s"] == pytest.approx(CALLS / num["wall_s"])
        assert row["completion tokens/s"] == f"{num['completion_tokens_per_s']:.1f}"
        assert 0 < num["completion_tokens"] <= CALLS * 8  # at most max_new_tokens each
        assert num["completion_tokens_per_s"] == pytest.approx(
            num["completion_tokens"] / num["wall_s"])
        assert row["where the time goes"] == num["where"]
    local, remote = data["throughput"]
    assert local["where"] == f"load {local['load_s']:.1f} s; generation {local['wall_s']:.1f} s"
    assert remote["where"] == (f"server start {remote['server_start_s']:.1f} s; first request "
                               f"{remote['first_request_s']:.2f} s; mean latency "
                               f"{remote['mean_latency_s']:.2f} s")
    # every judge call reached the server once: one request each, none retried
    assert (remote["sent"], remote["retried"]) == (CALLS, 0)
    # the verdict path: a rationale and a forced verdict per call
    assert data["agreement_endpoint_requests"] == 2 * CALLS
    local_s, remote_s = data["agreement_inprocess_s"], data["agreement_endpoint_s"]
    assert (f"verdict probabilities (the agreement's {CALLS} calls, rationale then forced "
            f"verdict): in-process float32 {local_s:.1f} s ({CALLS / local_s:.2f} calls/s); "
            f"endpoint {remote_s:.1f} s ({CALLS / remote_s:.2f} calls/s, {2 * CALLS} requests, "
            "1 replica(s))\n") in proc.stdout


def test_header_names_the_machine_and_versions_and_the_key_is_never_shown(bench):
    proc, data, text = bench
    m = data["machine"]
    assert proc.stdout.startswith(f"machine: {os.cpu_count()} CPU cores ({m['cpu']}), ")
    assert f"torch {m['torch']}, transformers {m['transformers']}, llama-cpp-python " \
        f"{m['llama_cpp_python']}" in proc.stdout
    assert f"workload: {CALLS} pairwise judge calls" in proc.stdout
    assert 'requests to the endpoint: {"repeat_penalty": 1.0} added to every request, from ' \
        "--extra\n" in proc.stdout
    assert (data["extra"], data["extra_source"]) == ({"repeat_penalty": 1.0}, "--extra")
    assert m["llama_cpp_python"] != "not installed"
    assert KEY not in proc.stdout + proc.stderr + text


@pytest.mark.parametrize("args, message", [
    (["--comparisons", "3"], "--comparisons 3: give an even number from 2 to"),
    (["--replicas", "0,2"], "'0,2': give replica counts >= 1"),
    (["--dtypes", "float64"], "'float64': give dtypes among float32, bfloat16, float16"),
    (["--extra", "[1]"], "'[1]': give a JSON object"),
])
def test_bad_arguments_exit_2_before_loading_anything(args, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stdout == ""
