"""Migration 0005_eval_fingerprint_names_its_judge: evals that compare name their judge.

An eval that compares a round's model with the current policy asks the LLM judge (pairwise,
in both orders) where the verifiers tie. Before this migration the eval's fingerprint did not
hold the judge's settings, so changing `judge.verdict` (say) reused evals judged the other
way. Now an eval that compares holds, in its params, the judge settings its comparison uses
that differ from their defaults (`judge_settings`; `pipeline.eval_judge_params`).

This migration gives the evals already stored the fingerprint the pipeline now computes for
them, so a catalog is continued without judging its evals again: for each comparing eval, the
settings are read from the config of the run that made it (`runs.config`), added to its
params, and its fingerprint recomputed; a gate rests on its eval and the previous gate, and a
later eval on the earlier one, so their fingerprints follow. Version ids are names and do not
change. A version whose stored fingerprint is not the one this release's predecessor computed
(made by an older flywheel still) is left as it is: it is not reused either way.

Everything here is frozen as of the migration (the settings, their defaults, the stages' code
version): later changes of the pipeline come with migrations of their own.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb

from flywheel.hashing import fingerprint

NAME = "0005_eval_fingerprint_names_its_judge"
DOC = ("evals that compare against the policy hold the judge settings they use in their "
       "fingerprint; stored evals and gates are re-fingerprinted (ids unchanged)")

#: the judge settings an eval's comparison uses, with their defaults (as of this migration)
JUDGE_DEFAULTS: dict[str, Any] = {"verdict": "text", "samples": 3, "temperature": 0.7,
                                  "max_new_tokens": 160, "pairwise_template": "pairwise.j2"}
#: the code version of the eval and gate stages (as of this migration)
CODE = "0.1.0+1"
#: params a stage stores beside those it fingerprints (the gate's decision; the eval's report
#: of its splits, which evals of the previous release do not have)
EXTRA = {"gate": ("promoted",), "eval": ("splits",)}


def changes(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str]]:
    """(version_id, new params JSON, new fingerprint) of every eval and gate to update."""
    rows = con.execute(
        "SELECT v.version_id, v.kind, v.parents, v.params, v.fingerprint, r.config "
        "FROM versions v LEFT JOIN runs r ON r.run_id = v.run_id "
        "ORDER BY v.created_at, v.version_id").fetchall()
    old_fp = {r[0]: r[4] for r in rows}
    new_fp = dict(old_fp)
    out = []
    for vid, kind, parents, params, fp, config in rows:
        if kind not in ("eval", "gate"):
            continue
        params = params if isinstance(params, dict) else json.loads(params)
        kept = {k: v for k, v in params.items() if k not in EXTRA.get(kind, ())}
        if fingerprint(kind, kept, [old_fp.get(p, "") for p in parents], CODE) != fp:
            continue  # not made by the previous release: left alone
        settings = _judge_settings(kind, parents, config) if "judge_settings" not in kept \
            else {}
        if settings:
            params = {**params, "judge_settings": settings}
            kept = {**kept, "judge_settings": settings}
        fp2 = fingerprint(kind, kept, [new_fp.get(p, "") for p in parents], CODE)
        if fp2 != fp:
            new_fp[vid] = fp2
            out.append((vid, json.dumps(params, sort_keys=True, default=str), fp2))
    return out


def _judge_settings(kind: str, parents: list[str], config: str | dict | None) -> dict:
    """The changed judge settings of the run that made a comparing eval, else {}."""
    if kind != "eval" or len(parents) < 2 or not config:  # round 0 compares nothing
        return {}
    cfg = config if isinstance(config, dict) else json.loads(config)
    if not (cfg.get("eval") or {}).get("judge", True):
        return {}
    judge = cfg.get("judge") or {}
    return {k: judge[k] for k in JUDGE_DEFAULTS if k in judge and judge[k] != JUDGE_DEFAULTS[k]}


def apply(con: duckdb.DuckDBPyConnection) -> None:
    """Update the params and fingerprints `changes` lists (inside the caller's transaction)."""
    for vid, params, fp in changes(con):
        con.execute("UPDATE versions SET params = ?, fingerprint = ? WHERE version_id = ?",
                    [params, fp, vid])


def present(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the file needs nothing of this migration (a new catalog, or one whose evals
    compare with default judge settings)."""
    return not changes(con)
