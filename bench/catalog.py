"""Catalog benchmark: fill a fresh DuckDB catalog with synthetic, schema-true rows and time the
write path and the read commands people wait on.

    python bench/catalog.py [--scale 1.0] [--out DIR] [--rounds 10]

At --scale 1.0 it writes 10 rounds of 50k prompts, 100k samples, 300k judgments and 50k pairs
(1M samples, 3M judgments, 500k pairs in all) plus round 0 (seed prompts, base model, base
eval), one model and one eval per round, every version with the parents `flywheel/pipeline.py`
gives it, each committed through `Catalog.commit` (DataFrame -> one transaction). Rows are
generated vectorised with numpy / pyarrow. Then it prints a markdown table:

- bulk ingest rows/s: all rows / the summed wall time of the `Catalog.commit` calls,
- `flywheel versions`: in-process via `flywheel.cli.main` (stdout captured) and as a subprocess
  (interpreter start included),
- one pair's lineage: `flywheel lineage <pair_id>` in-process (its default example depth, and
  `--depth all`), and the single SQL query on the `pair_lineage` view for that pair,
- `SELECT * FROM round_summary`.

Timings are the median of 5 runs after one warm-up. Where a target is missed, the component
queries behind it are timed and printed underneath the table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from flywheel.catalog import Catalog, fingerprint, new_run_id

# per round, at --scale 1.0
PROMPTS_PER_ROUND = 50_000
CANDIDATES = 2            # samples per new prompt  -> 100k samples / round
JUDGMENTS_PER_PROMPT = 6  # 2 pointwise + 2 verifier + 1 pairwise comparison in both orders
FEW_SHOT = 8              # the config default `prompts.few_shot`
EVAL_ITEMS = 100

TARGETS = {"ingest": 1_000_000.0, "lineage": 0.050, "round_summary": 0.500}

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_WORDS = np.array(("the of and a to in is you that it he was for on are as with his they I at "
                   "be this have from or one had by word but not what all were we when your can "
                   "said there use an each which she do how their if will up other about out "
                   "many then them these so some her would make like him into time has look two "
                   "more write go see number no way could people my than first water been call "
                   "who oil its now find long down day did get come made may part").split())


# -- vectorised row material ---------------------------------------------------------------
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64, so distinct keys give distinct ids."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def hex_ids(prefix: str, tag: int, rnd: int, n: int, start: int = 0) -> np.ndarray:
    """n unique ids like `s_0123456789abcdef` (object array), stable for (tag, round, index)."""
    keys = (np.uint64(tag) << np.uint64(56)) | (np.uint64(rnd) << np.uint64(40)) | \
        np.arange(start, start + n, dtype=np.uint64)
    b = _mix(keys).view(np.uint8).reshape(n, 8)
    p = len(prefix)
    buf = np.empty((n, p + 16), dtype=np.uint8)
    buf[:, :p] = np.frombuffer(prefix.encode(), dtype=np.uint8)
    buf[:, p::2] = _HEX[b >> 4]
    buf[:, p + 1::2] = _HEX[b & 15]
    return buf.view(f"S{p + 16}").ravel().astype(f"U{p + 16}").astype(object)


def _phrases(rng: np.random.Generator, n: int, lo: int, hi: int) -> np.ndarray:
    """n distinct-ish word salads of lo..hi words (a small pool that texts are built from)."""
    lens = rng.integers(lo, hi, n)
    return np.array([" ".join(rng.choice(_WORDS, k)) for k in lens], dtype=object)


def join(*parts, sep: str = " ") -> np.ndarray:
    """Element-wise string concatenation (pyarrow, no Python loop) -> object array."""
    arrs = [pa.array(p) if not isinstance(p, str) else p for p in parts]
    return pc.binary_join_element_wise(*arrs, sep).to_numpy(zero_copy_only=False)


def lists(flat: np.ndarray, width: int) -> pd.Series:
    """An object Series of Python lists, `width` consecutive items of `flat` each."""
    return pd.Series(flat.reshape(-1, width).tolist(), dtype=object)


class Material:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.texts = _phrases(self.rng, 1024, 30, 90)       # answers
        self.tasks = _phrases(self.rng, 1024, 8, 30)        # prompts
        self.rationales = _phrases(self.rng, 512, 15, 45)   # judge rationales

    def pick(self, pool: np.ndarray, n: int) -> np.ndarray:
        return pool[self.rng.integers(0, len(pool), n)]


# -- one kind's rows -----------------------------------------------------------------------
def prompt_rows(m: Material, rnd: int, n: int, pool_ids: np.ndarray, source_ref: str):
    ids = hex_ids("p_", 1, rnd, n)
    cats = np.array(["writing", "math", "code", "qa", "rewrite"], dtype=object)
    constraints = np.array(['[]', '[{"type": "max_words", "n": 50}]',
                            '[{"type": "no_commas"}]',
                            '[{"type": "num_bullets", "n": 3}, {"type": "lowercase"}]'],
                           dtype=object)
    if rnd == 0 or len(pool_ids) == 0:
        examples = pd.Series([[]] * n, dtype=object)
        source, ref, raw = "seed", join("seeds.jsonl", np.arange(1, n + 1).astype(str),
                                        sep=":"), None
    else:
        shots = pool_ids[m.rng.integers(0, len(pool_ids), n * FEW_SHOT)]
        examples = lists(shots, FEW_SHOT)
        source, ref = "self-instruct", source_ref
        raw = join("Task:", m.pick(m.tasks, n), ids)
    return pd.DataFrame({
        "prompt_id": ids,
        "text": join(m.pick(m.tasks, n), ids),
        "gold": None,
        "constraints": m.pick(constraints, n),
        "category": m.pick(cats, n),
        "source": source,
        "source_ref": ref,
        "examples": examples,
        "raw": raw,
    })


def sample_rows(m: Material, rnd: int, prompt_ids: np.ndarray, policy: str):
    n = len(prompt_ids) * CANDIDATES
    ids = hex_ids("s_", 2, rnd, n)
    comp = m.rng.integers(20, 400, n).astype(np.int32)
    return pd.DataFrame({
        "sample_id": ids,
        "prompt_id": np.repeat(prompt_ids, CANDIDATES),
        "model_version": policy,
        "idx": np.tile(np.arange(CANDIDATES, dtype=np.int32), len(prompt_ids)),
        "greedy": False,
        "text": join(m.pick(m.texts, n), ids),
        "finish_reason": np.where(comp >= 384, "length", "stop").astype(object),
        "prompt_tokens": m.rng.integers(30, 200, n).astype(np.int32),
        "completion_tokens": comp,
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": np.int32(384),
        "seed": np.arange(n, dtype=np.int64) + rnd * 1_000_000,
    })


def judgment_rows(m: Material, rnd: int, samples: pd.DataFrame, judge: str):
    """Per prompt (2 samples s0, s1): pointwise s0, s1; verifier s0, s1; pairwise (s0, s1) and
    (s1, s0)."""
    s = samples["sample_id"].to_numpy(dtype=object).reshape(-1, CANDIDATES)
    prompts = samples["prompt_id"].to_numpy(dtype=object)[::CANDIDATES]
    n_p = len(prompts)
    n = n_p * JUDGMENTS_PER_PROMPT
    s0, s1 = s[:, 0], s[:, 1]
    none = np.full(n_p, None, dtype=object)

    def six(a, b, c, d, e, f):
        return np.stack([a, b, c, d, e, f], axis=1).ravel()

    typ = six(*(np.full(n_p, t, dtype=object) for t in
                ("pointwise", "pointwise", "verifier", "verifier", "pairwise", "pairwise")))
    parsed = m.rng.random(n) > 0.03
    parsed[typ == "verifier"] = True
    point = m.rng.integers(1, 6, n).astype(float)
    passed = (m.rng.random(n) < 0.6).astype(float)
    score = np.where(typ == "pointwise", point, np.where(typ == "verifier", passed, np.nan))
    score[~parsed] = np.nan
    # pairwise: the first order's verdict, and the second flipped in 15% of comparisons
    win_first = m.rng.random(n_p) < 0.5
    flip = m.rng.random(n_p) < 0.15
    tie = m.rng.random(n_p) < 0.05
    w_ab = np.where(tie, None, np.where(win_first, s0, s1))
    w_ba = np.where(tie, None, np.where(win_first ^ flip, s0, s1))
    winner = six(none, none, none, none, w_ab, w_ba)
    verdict_ab = np.where(tie, "C", np.where(win_first, "A", "B"))
    verdict_ba = np.where(tie, "C", np.where(win_first ^ flip, "B", "A"))
    verdict = six(none, none, np.where(passed[2::6] > 0, "pass", "fail").astype(object),
                  np.where(passed[3::6] > 0, "pass", "fail").astype(object),
                  verdict_ab.astype(object), verdict_ba.astype(object))
    verifier = typ == "verifier"
    ids = hex_ids("j_", 3, rnd, n)
    rationale = m.pick(m.rationales, n)
    raw = join(rationale, "Score:", np.nan_to_num(score, nan=0).astype(int).astype(str), ids)
    rationale[verifier] = None
    winner[~parsed] = None
    verdict[~parsed & ~verifier] = None
    return pd.DataFrame({
        "judgment_id": ids,
        "type": typ,
        "prompt_id": np.repeat(prompts, JUDGMENTS_PER_PROMPT),
        "sample_id": six(s0, s1, s0, s1, none, none),
        "sample_a": six(none, none, none, none, s0, s1),
        "sample_b": six(none, none, none, none, s1, s0),
        "comparison_id": six(none, none, none, none,
                             *(2 * [hex_ids("c_", 4, rnd, n_p)])),
        "swapped": six(none, none, none, none, np.full(n_p, False, dtype=object),
                       np.full(n_p, True, dtype=object)),
        "k": np.int32(0),
        "judge": np.where(verifier, "constraints@1", judge).astype(object),
        "judge_path": np.where(verifier, None, f"data/models/{judge}").astype(object),
        "judge_hash": np.where(verifier, None, "9f2c1e0d4b7a6c35").astype(object),
        "template_hash": np.where(verifier, None, "a1b2c3d4e5f60718").astype(object),
        "method": np.where(verifier, "verifier", "text").astype(object),
        "raw": raw,
        "rationale": rationale,
        "parsed": parsed,
        "error": np.where(parsed, None, "no verdict found").astype(object),
        "score": score,
        "verdict": verdict,
        "winner": winner,
        "probs": None,
    })


def pair_rows(m: Material, rnd: int, samples: pd.DataFrame, judgments: pd.DataFrame):
    """One pair per prompt: chosen = the sample with the better pointwise score."""
    s = samples["sample_id"].to_numpy(dtype=object).reshape(-1, CANDIDATES)
    t = samples["text"].to_numpy(dtype=object).reshape(-1, CANDIDATES)
    sc = np.nan_to_num(judgments["score"].to_numpy().reshape(-1, JUDGMENTS_PER_PROMPT)[:, :2],
                       nan=0.0)
    first = sc[:, 0] >= sc[:, 1]
    n = len(s)
    pick = lambda a, c: np.where(c, a[:, 0], a[:, 1])  # noqa: E731
    chosen_score = np.maximum(sc[:, 0], sc[:, 1]) + 1.0
    rejected_score = np.minimum(sc[:, 0], sc[:, 1])
    return pd.DataFrame({
        "pair_id": hex_ids("pr_", 5, rnd, n),
        "prompt_id": samples["prompt_id"].to_numpy(dtype=object)[::CANDIDATES],
        "chosen_id": pick(s, first),
        "rejected_id": pick(s, ~first),
        "chosen_text": pick(t, first),
        "rejected_text": pick(t, ~first),
        "chosen_score": chosen_score,
        "rejected_score": rejected_score,
        "margin": chosen_score - rejected_score,
        "rule": np.where(m.rng.random(n) < 0.5, "verifier", "llm").astype(object),
        "min_margin": 1.0,
        "judgment_ids": lists(judgments["judgment_id"].to_numpy(dtype=object),
                              JUDGMENTS_PER_PROMPT),
    })


def model_rows(rnd: int, start: str | None, train_pairs: int):
    return pd.DataFrame([{
        "path": f"data/models/round-{rnd}", "content_hash": f"{rnd:016x}",
        "base_version": start, "method": "base" if start is None else "dpo",
        "train_pairs": train_pairs,
        "metrics": json.dumps({} if start is None else {"train_loss": 0.69 - 0.02 * rnd}),
    }])


def eval_rows(m: Material, rnd: int, model: str, baseline: str | None, n_items: int):
    wins = int(m.rng.integers(0, n_items))
    evals = pd.DataFrame([{
        "model_version": model, "baseline_version": baseline, "n_prompts": n_items,
        "wins": None if baseline is None else wins,
        "losses": None if baseline is None else n_items - wins, "ties": None if baseline is None
        else 0, "win_rate": None if baseline is None else wins / n_items,
        "ci_low": None, "ci_high": None, "llm_flip_rate": None,
        "pass_rate": 0.4 + 0.01 * rnd, "pass_by_type": json.dumps({"max_words": 0.5}),
    }])
    items = pd.DataFrame({
        "prompt_id": hex_ids("p_", 6, 0, n_items),
        "model_version": model,
        "text": m.pick(m.texts, n_items),
        "finish_reason": "stop",
        "checks": '[{"type": "max_words", "passed": true}]',
        "pass_fraction": m.rng.random(n_items),
        "baseline_text": None if baseline is None else m.pick(m.texts, n_items),
        "verdict_ab": None, "verdict_ba": None,
        "outcome": None if baseline is None else m.pick(
            np.array(["win", "loss", "tie"], dtype=object), n_items),
    })
    return {"evals": evals, "eval_items": items}


# -- building the catalog ------------------------------------------------------------------
class Builder:
    def __init__(self, path: Path):
        self.cat = Catalog(path)
        self.cat.init()
        self.run_id = new_run_id()
        self.fps: dict[str, str] = {}
        self.rows = 0
        self.seconds = 0.0
        self.commits = 0
        self.by_kind: dict[str, list] = {}  # kind -> [commits, rows, seconds]

    def commit(self, kind: str, rnd: int, parents: list[str], tables: dict) -> str:
        params = {"round": rnd, "bench": True}
        fp = fingerprint(kind, params, [self.fps[p] for p in parents])
        n = sum(len(df) for df in tables.values())
        t0 = time.perf_counter()
        v = self.cat.commit(kind=kind, run_id=self.run_id, round=rnd, parents=parents,
                            params=params, fp=fp, tables=tables)
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.rows += n + 1  # + its `versions` row
        self.commits += 1
        k = self.by_kind.setdefault(kind, [0, 0, 0.0])
        k[0], k[1], k[2] = k[0] + 1, k[1] + n + 1, k[2] + dt
        self.fps[v.version_id] = v.fingerprint
        return v.version_id


def build(path: Path, scale: float = 1.0, rounds: int = 10, seed: int = 0,
          log=print) -> dict:
    """Fill a fresh catalog at `path`; return counts, commit time and a pair id to look up."""
    m = Material(seed)
    b = Builder(path)
    n_prompts = max(int(PROMPTS_PER_ROUND * scale), 2)
    t_start = time.perf_counter()
    # round 0: seed prompts, base model, base eval
    seeds = prompt_rows(m, 0, n_prompts, np.array([], dtype=object), "")
    pool = [b.commit("prompts", 0, [], {"prompts": seeds})]
    pool_ids = seeds["prompt_id"].to_numpy(dtype=object)
    policy = b.commit("model", 0, [], {"models": model_rows(0, None, 0)})
    n_items = max(int(EVAL_ITEMS * min(scale, 1.0)), 2)
    base_eval = b.commit("eval", 0, [policy], eval_rows(m, 0, policy, None, n_items))
    counts = {"prompts": len(seeds), "samples": 0, "judgments": 0, "pairs": 0}
    pair_id = first_pair_id = None
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        prompts = prompt_rows(m, rnd, n_prompts, pool_ids, policy)
        new = b.commit("prompts", rnd, [*pool, policy], {"prompts": prompts})
        samples = sample_rows(m, rnd, prompts["prompt_id"].to_numpy(dtype=object), policy)
        sv = b.commit("samples", rnd, [new, *pool, policy], {"samples": samples})
        prompt_versions = [*pool, new]
        judgments = judgment_rows(m, rnd, samples, policy)
        jv = b.commit("judgments", rnd, [sv, *prompt_versions, policy],
                      {"judgments": judgments})
        pairs = pair_rows(m, rnd, samples, judgments)
        pv = b.commit("pairs", rnd, [jv, sv, *prompt_versions], {"pairs": pairs})
        model = b.commit("model", rnd, [pv, *prompt_versions, policy],
                         {"models": model_rows(rnd, policy, len(pairs))})
        ev = b.commit("eval", rnd, [model, policy, base_eval],
                      eval_rows(m, rnd, model, policy, n_items))
        for k, df in (("prompts", prompts), ("samples", samples), ("judgments", judgments),
                      ("pairs", pairs)):
            counts[k] += len(df)
        if rnd == 1:
            first_pair_id = pairs["pair_id"].iloc[len(pairs) // 2]
        pair_id = pairs["pair_id"].iloc[len(pairs) // 2]
        pool_ids = np.concatenate([pool_ids, prompts["prompt_id"].to_numpy(dtype=object)])
        pool.append(new)
        policy, base_eval = model, ev
        log(f"round {rnd:>2}: {sum(len(d) for d in (prompts, samples, judgments, pairs)):,} "
            f"rows in {time.perf_counter() - t0:.1f}s (commits so far {b.seconds:.1f}s)")
    return {"path": path, "scale": scale, "rows": b.rows, "commit_s": b.seconds,
            "commits": b.commits,
            "by_kind": b.by_kind,
            "build_s": time.perf_counter() - t_start, "counts": counts, "pair_id": pair_id,
            "first_pair_id": first_pair_id}


# -- measuring -----------------------------------------------------------------------------
def timed(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cli(argv: list[str]) -> str:
    """Run the real CLI in-process with stdout captured; fail loudly on a non-zero exit."""
    from flywheel.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"flywheel {' '.join(argv)} exited {rc}")
    return buf.getvalue()


def sql(path: Path, query: str, params=()):
    cat = Catalog(path)
    with cat.read() as con:
        return con.execute(query, list(params)).df()


def measure(info: dict, repeats: int = 5) -> list[dict]:
    path = str(info["path"])
    pid = info["pair_id"]
    rows = []
    rate = info["rows"] / info["commit_s"]
    rows.append({"name": "bulk ingest (rows / commit wall time)",
                 "value": f"{rate:,.0f} rows/s ({info['rows']:,} rows, {info['commits']} "
                          f"commits, {info['commit_s']:.1f} s)",
                 "target": "≥ 1,000,000 rows/s", "key": "ingest", "measured": rate})
    out = cli(["versions", "--catalog", path])
    assert "pairs-r1-" in out, "flywheel versions printed no pairs version"
    t = timed(lambda: cli(["versions", "--catalog", path]), repeats)
    rows.append({"name": "`flywheel versions` (in-process)", "value": f"{t * 1e3:.1f} ms",
                 "target": "—", "key": None, "measured": t})
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "flywheel.cli", "versions", "--catalog", path]
    t = timed(lambda: subprocess.run(cmd, check=True, capture_output=True, env=env),
              max(repeats // 2, 1))
    rows.append({"name": "`flywheel versions` (subprocess, interpreter start)",
                 "value": f"{t * 1e3:.0f} ms", "target": "—", "key": None, "measured": t})
    out = cli(["lineage", pid, "--catalog", path])
    assert pid in out, "flywheel lineage did not print the pair"
    t = timed(lambda: cli(["lineage", pid, "--catalog", path]), repeats)
    rows.append({"name": "one pair's lineage: `flywheel lineage <pair_id>` (in-process)",
                 "value": f"{t * 1e3:.1f} ms", "target": "≤ 50 ms", "key": "lineage",
                 "measured": t})
    argv = ["lineage", pid, "--depth", "all", "--catalog", path]
    t = timed(lambda: cli(argv), max(repeats // 2, 1))
    rows.append({"name": "the same with every example level (`--depth all`, "
                         f"{cli(argv).count(chr(10)):,} lines)",
                 "value": f"{t * 1e3:.1f} ms", "target": "—", "key": None, "measured": t})
    q = "SELECT * FROM pair_lineage WHERE pair_id = ?"
    assert len(sql(info["path"], q, [pid])) >= 1
    t = timed(lambda: sql(info["path"], q, [pid]), repeats)
    rows.append({"name": "one pair's lineage: `pair_lineage` view, one SQL query",
                 "value": f"{t * 1e3:.1f} ms", "target": "≤ 50 ms", "key": "lineage",
                 "measured": t})
    q = "SELECT * FROM round_summary"
    n = len(sql(info["path"], q))
    t = timed(lambda: sql(info["path"], q), repeats)
    rows.append({"name": f"`SELECT * FROM round_summary` ({n} rows)",
                 "value": f"{t * 1e3:.1f} ms", "target": "≤ 500 ms", "key": "round_summary",
                 "measured": t})
    for r in rows:
        r["met"] = _verdict(r)
    return rows


def _verdict(r: dict) -> str:
    key = r["key"]
    if key is None:
        return "—"
    target, value = TARGETS[key], r["measured"]
    if key == "ingest":
        return "yes" if value >= target else f"**no**: {target / value:.1f}× too slow " \
            f"({target - value:,.0f} rows/s short)"
    return "yes" if value <= target else f"**no**: {value / target:.1f}× the target " \
        f"(+{(value - target) * 1e3:,.0f} ms)"


def render(rows: list[dict]) -> str:
    lines = ["| measurement | value | target | met? |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['value']} | {r['target']} | {r['met']} |" for r in rows]
    return "\n".join(lines)


# -- investigating a miss ------------------------------------------------------------------
def lineage_breakdown(path: Path, pair_id: str, repeats: int = 3
                      ) -> list[tuple[str, float, float]]:
    """Time what `flywheel lineage <pair_id>` does, step by step (cli_inspect): each query as
    the first one on a fresh read-only connection (as the CLI runs them: index and column
    blocks are read and decompressed on first use) and again on a warm one; and the fixed
    costs around them (open, close, argparse, printing). Rows: (name, fresh s, warm s)."""
    from flywheel import cli_inspect as ci
    from flywheel.catalog import queries
    from flywheel.cli import _parser

    cat = Catalog(path)
    with cat.read() as con:
        pr = con.execute("SELECT * FROM pairs WHERE pair_id = ?", [pair_id]).df().iloc[0]
        sample_ids = [pr["chosen_id"], pr["rejected_id"]]
        judgment_ids = list(pr["judgment_ids"])
        cond, params = queries.in_list("prompt_id", [pr["prompt_id"]])
        prompt = con.execute(f"SELECT {queries.PROMPT_COLS} FROM prompts WHERE {cond}",
                             params).df()
        sections, _ = ci._row_lineage(con, pair_id)
        n_ex = len(sections["example prompts"])
        n_all = len(queries.example_prompts(con, prompt, None)[0])
    steps = {
        "pairs WHERE pair_id = ?": lambda con: con.execute(
            "SELECT * FROM pairs WHERE pair_id = ?", [pair_id]).df(),
        "prompts WHERE prompt_id IN": lambda con: con.execute(
            f"SELECT {queries.PROMPT_COLS} FROM prompts WHERE {cond}", params).df(),
        f"example prompts (depth {ci.EXAMPLE_DEPTH})": lambda con: queries.example_prompts(
            con, prompt, ci.EXAMPLE_DEPTH),
        "samples WHERE sample_id IN": lambda con: con.execute(
            "SELECT * FROM samples WHERE " + queries.in_list("sample_id", sample_ids)[0],
            sample_ids).df(),
        "judgments (prompt_id index, filtered)": lambda con: queries.judgments_of_samples(
            con, [pr["prompt_id"]], sample_ids, judgment_ids),
        "models trained on": lambda con: queries.models_trained_on(con, [pr["version_id"]]),
        "all of the above, concurrently (_row_lineage)": lambda con: ci._row_lineage(
            con, pair_id),
    }

    def fresh(fn):
        with cat.read() as con:
            t0 = time.perf_counter()
            fn(con)
            return time.perf_counter() - t0

    def first_only(fn, n):
        return statistics.median(fresh(fn) for _ in range(n))

    def open_close():
        with cat.read():
            pass

    def close_after_lineage():
        with cat.read() as con:
            ci._row_lineage(con, pair_id)
            t0 = time.perf_counter()
        return time.perf_counter() - t0

    vertical = ("pair", "prompt", "samples", "judgments")
    out = [("open + close the catalog (read-only)", timed(open_close, repeats), float("nan")),
           ("close after the lineage queries",
            statistics.median(close_after_lineage() for _ in range(repeats)), float("nan")),
           ("argparse (the whole CLI)", timed(_parser, repeats), float("nan")),
           ("printing the sections", timed(lambda: ci.print_sections(
               sections, "table", vertical=vertical, file=io.StringIO()), repeats),
            float("nan"))]
    # no other connection may be open meanwhile: DuckDB would share its (warm) instance
    first = {name: first_only(fn, repeats) for name, fn in steps.items()}
    with cat.read() as con:
        for name, fn in steps.items():
            out.append((name, first[name], timed(lambda fn=fn: fn(con), repeats)))
        out.append(("example prompts (--depth all, recursive)", float("nan"),
                    timed(lambda: queries.example_prompts(con, prompt, None), 1)))
    out.append((f"(example prompts: {n_ex} rows at depth {ci.EXAMPLE_DEPTH}, {n_all} in all)",
                float("nan"), float("nan")))
    return out


def ingest_floors(scale: float = 1.0, repeats: int = 3) -> list[tuple[str, float]]:
    """What the write path could reach at best on this machine, on one round's judgments
    (the bulk of the rows): rows/s of Catalog.commit into a fresh catalog, of DuckDB itself
    (the same Arrow rows into an empty table without indexes, one transaction, default and
    uncompressed storage), and of writing them to a Parquet file with pyarrow (no catalog, no
    index, no transaction). Each the median of `repeats`."""
    import duckdb
    import pyarrow.parquet as pq

    from flywheel.catalog import SCHEMA, _arrow

    m = Material(1)
    n = max(int(PROMPTS_PER_ROUND * scale), 2)
    samples = sample_rows(m, 1, hex_ids("p_", 1, 1, n), "model-r0-bench")
    judgments = judgment_rows(m, 1, samples, "model-r0-bench")
    table = _arrow(judgments)
    cols = ", ".join(f'"{c}"' for c in judgments.columns)
    tables_only = SCHEMA.split("CREATE OR REPLACE VIEW")[0]
    out = []
    with tempfile.TemporaryDirectory(prefix="flywheel-floor-") as tmp:
        def catalog_commit(i):
            cat = Catalog(Path(tmp) / f"c{i}.duckdb")
            cat.init()
            t0 = time.perf_counter()
            cat.commit(kind="judgments", run_id="r", round=1, parents=[], params={},
                       fp=f"{i:020d}", tables={"judgments": judgments})
            return time.perf_counter() - t0

        def duck(i, config):
            path = str(Path(tmp) / f"d{i}.duckdb")
            with duckdb.connect(path) as con:
                con.execute(tables_only)
            t0 = time.perf_counter()
            with duckdb.connect(path, config=config) as con:
                con.register("_rows", table)
                con.execute("BEGIN")
                con.execute(f'INSERT INTO judgments ("version_id", {cols}) '
                            f"SELECT 'v', {cols} FROM _rows")
                con.execute("COMMIT")
                con.execute("CHECKPOINT")
            return time.perf_counter() - t0

        def rate(fn) -> float:
            times = []
            for i in range(repeats):
                t0 = time.perf_counter()
                dt = fn(i)
                times.append(time.perf_counter() - t0 if dt is None else dt)
            return len(table) / statistics.median(times)

        out.append(("Catalog.commit, fresh catalog (indexes, one transaction)",
                    rate(catalog_commit)))
        out.append(("DuckDB alone: empty table, no index", rate(lambda i: duck(i, {}))))
        out.append(("DuckDB alone, uncompressed storage",
                    rate(lambda i: duck(100 + i, {"force_compression": "uncompressed"}))))
        for comp in ("snappy", "none"):
            out.append((f"pyarrow Parquet file ({comp}; no catalog, no index)",
                        rate(lambda i, c=comp: pq.write_table(
                            table, Path(tmp) / f"j{i}.{c}.parquet", compression=c))))
    return [(f"{name} [{len(table):,} judgments]", r) for name, r in out]


def instance_floor(repeats: int = 7) -> float:
    """Seconds to start and close a DuckDB instance on an empty in-memory database: the part
    of every CLI call that no query shape changes."""
    import duckdb

    return timed(lambda: duckdb.connect().close(), repeats)


def investigate(info: dict, rows: list[dict]) -> str:
    lines = []
    missed = {r["key"] for r in rows if r["met"].startswith("**no")}
    if "ingest" in missed and info.get("by_kind"):
        lines.append("\ningest by kind (Catalog.commit wall time):")
        for kind, (n, nrows, secs) in info["by_kind"].items():
            lines.append(f"  {kind:<10} {n:>3} commits {nrows:>11,} rows {secs:7.2f} s "
                         f"{secs / n * 1e3:8.1f} ms/commit {nrows / secs:>12,.0f} rows/s")
        lines.append("\nthe floor: one round's judgments written each way (median rows/s):")
        for name, r in ingest_floors(info.get("scale", 1.0)):
            lines.append(f"  {name:<78} {r:>12,.0f}")
    if "lineage" in missed:
        lines.append(f"\nlineage of {info['pair_id']}, step by step (median ms; fresh: first "
                     "query on a new read-only connection, as the CLI runs it):")
        lines.append(f"  {'':<48} {'fresh':>8} {'warm':>8}")
        for name, fresh, warm in lineage_breakdown(info["path"], info["pair_id"]):
            cells = "".join(f" {t * 1e3:8.1f}" if t == t else f" {'':>8}" for t in (fresh, warm))
            lines.append(f"  {name:<48}{cells}")
        lines.append(f"  {'floor: DuckDB start + close, empty :memory:':<48}"
                     f" {instance_floor() * 1e3:8.1f}")
    if "round_summary" in missed:
        lines.append("\nround_summary parts (median ms):")
        for name, q in (("round_lineage", "SELECT * FROM round_lineage"),
                        ("judgments of the lineage", "SELECT count(*) FROM round_lineage l "
                         "JOIN judgments j ON j.version_id = l.judgments_version")):
            lines.append(f"  {name:<34} {timed(lambda q=q: sql(info['path'], q), 3) * 1e3:8.1f}")
    return "\n".join(lines)


def machine() -> str:
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GB RAM"
    import duckdb

    return (f"{os.cpu_count()} CPU cores{mem}, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, DuckDB {duckdb.__version__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="row counts × this (default 1.0)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=None, help="directory for the catalog (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
        else:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flywheel-bench-")))
        path = out / "bench.duckdb"
        for p in (path, Path(f"{path}.wal")):
            p.unlink(missing_ok=True)
        info = build(path, args.scale, args.rounds)
        c = info["counts"]
        print(f"\ncatalog {path}: {c['prompts']:,} prompts, {c['samples']:,} samples, "
              f"{c['judgments']:,} judgments, {c['pairs']:,} pairs "
              f"({path.stat().st_size / 2**20:,.0f} MiB; built in {info['build_s']:.1f}s)")
        print(f"machine: {machine()}\n")
        rows = measure(info, args.repeats)
        print(render(rows))
        extra = investigate(info, rows)
        if extra:
            print(extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
