"""The round, as plain Python: one function per stage, each returning a catalog version id.

Every stage computes its fingerprint (kind + params + parents' fingerprints + code version)
first; a committed version with that fingerprint is reused, otherwise the stage runs and
commits its rows and version in one transaction. `flows/` wraps these functions as Prefect
tasks; `iterate` runs them without Prefect.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from flywheel import faults, interrupt, runlock
from flywheel.backends import Backend
from flywheel.catalog import Catalog, new_run_id, queries
from flywheel.config import Config, changed, shaping
from flywheel.errors import FlywheelError, Interrupted
from flywheel.hashing import fingerprint
from flywheel.modelprep import model_hash
from flywheel.promptfile import load_prompt_file, refuse_transfer
from flywheel.stages.train import CODE_VERSION as MODEL_CODE_VERSION


# -- context ----------------------------------------------------------------------------------
@dataclass
class Context:
    """What every stage needs: the config, the catalog, the run id and a lazy backend."""

    cfg: Config
    run_id: str
    catalog: Catalog
    log: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr, flush=True))
    _backend: Backend | None = None
    made: int = 0  # versions this process computed (not reused)
    stage: tuple[int, str] | None = None  # (round, kind) of the stage computing now

    _served: dict[str, Backend] = field(default_factory=dict)

    @property
    def backend(self) -> Backend:
        """The in-process backend of the local roles."""
        if self._backend is None:
            from flywheel.backends import get_backend

            m = self.cfg.models
            extra = {}
            if m.backend == "vllm":  # a managed server: its settings, its log in the workspace
                extra = {"settings": m.vllm, "log": self.log,
                         "log_path": Path(self.cfg.workspace) / ".flywheel" / "vllm-server.log"}
            self._backend = get_backend(m.backend, device=m.device, dtype=m.dtype,
                                        batch_size=m.batch_size, progress=self.cfg.progress,
                                        **extra)
        return self._backend

    def close(self) -> None:
        """Let go of what the run started: a managed inference server is stopped."""
        backend, self._backend = self._backend, None
        close = getattr(backend, "close", None)
        if close is not None:
            close()

    def served(self, role: str) -> Backend:
        """The backend of a role behind an endpoint (one per role, with the workspace's
        request cache)."""
        if role not in self._served:
            from flywheel.backends import get_backend
            from flywheel.backends.cache import RequestCache
            from flywheel.roles import endpoint, identity

            backend = get_backend(
                getattr(self.cfg.models, role).backend, endpoint=endpoint(self.cfg, role),
                cache=RequestCache(self.cfg.request_cache_path()), progress=self.cfg.progress)
            backend.known(identity(self.cfg, role))  # asked once, at preflight
            self._served[role] = backend
        return self._served[role]


_CONTEXTS: dict[str, Context] = {}


def context(cfg: Config, run_id: str | None = None) -> Context:
    """The context of a run (cached per run id, so Prefect tasks share one backend)."""
    run_id = run_id or new_run_id()
    if run_id not in _CONTEXTS:
        _CONTEXTS[run_id] = Context(cfg=cfg, run_id=run_id, catalog=Catalog(cfg.catalog_path()))
    return _CONTEXTS[run_id]


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def preflight(cfg: Config) -> None:
    """Check every input before anything is written, loading what the run will use: each
    model's config.json, tokenizer and weight-file headers (the weights themselves are not
    loaded), and each prompt file in full, with every prompt's length in tokens of the
    policy's tokenizer. All problems in one error; nothing is written, not even a cache."""
    from flywheel.limits import counter
    from flywheel.modelprep import config_problems, folder_problem, weight_problems
    from flywheel.promptfile import length_problems
    from flywheel.roles import check_endpoints

    problems: list[str] = []
    tokenizer_ok: dict[str, bool] = {}
    local = []
    for role in ("policy", "judge", "generator"):
        r = getattr(cfg.models, role)
        if r.endpoint:
            if r.tokenizer:
                local.append((f"models.{role}.tokenizer", r.tokenizer))
        else:
            local.append((f"models.{role}", r.path))
    for key, path in local:
        if not path or path in tokenizer_ok:
            continue
        bad = folder_problem(path, key)
        found = [bad] if bad else config_problems(path, key)
        tokenizer_ok[path] = False
        if not found:
            try:
                # the tokenizer, loaded once and kept for the length checks
                tokenizer_ok[path] = bool(counter(path).tokenizer)
            except FlywheelError as exc:
                found.append(f"{key}: {exc}".replace("\n  - ", " — "))
            if tokenizer_ok[path] and not getattr(counter(path).tokenizer, "chat_template",
                                                  None):
                found.append(f"{key}: the tokenizer of {path} has no chat template, and every "
                             "stage talks to the model through it — copy chat_template.jinja "
                             "(or the chat_template of tokenizer_config.json) from the "
                             "checkpoint it was made from")
        if not bad:
            found += weight_problems(path, key)
        problems += found
    problems += _placement_and_template_problems(cfg)
    files = {}
    for path in dict.fromkeys((cfg.prompts.seed_file, cfg.eval.prompts_file)):
        try:
            files[path] = load_prompt_file(path)
            if path == cfg.prompts.seed_file:
                refuse_transfer(path, files[path], "the seed file (prompts.seed_file)")
        except FlywheelError as exc:
            problems.append(str(exc))
    if tokenizer_ok.get(cfg.models.policy.path):  # in tokens of the model reading the prompts
        for path, records in files.items():
            problems += length_problems(path, records, cfg.prompts.max_prompt_tokens,
                                        cfg.models.policy.path)
    problems += check_endpoints(cfg)
    if cfg.judge.canary_file:
        from flywheel.stages.canary import load_canary

        try:
            load_canary(cfg.judge.canary_file)
        except FlywheelError as exc:
            problems.append(str(exc).replace("\n  - ", " — "))
    if cfg.models.backend == "vllm":
        from flywheel.backends.vllm import vllm_missing

        missing = vllm_missing(cfg.models.vllm.python)
        if missing:
            problems.append(f"models.backend is vllm, but {missing}")
    if problems:
        raise FlywheelError("cannot start: nothing was written", details=problems)


def _placement_and_template_problems(cfg: Config) -> list[str]:
    """A device or dtype this machine cannot train with, and templates that are nowhere."""
    from flywheel.stages.train import training_placement
    from flywheel.templates import find_template

    problems = []
    try:
        training_placement(cfg.models.device, training_dtype(cfg))
    except FlywheelError as exc:
        text = str(exc).replace("\n  - ", " — ")
        problems.append(text.replace("models.dtype", "train.dtype", 1)
                        if cfg.train.dtype != "auto" else text)
    for key, name in (("prompts.template", cfg.prompts.template),
                      ("judge.pointwise_template", cfg.judge.pointwise_template),
                      ("judge.pairwise_template", cfg.judge.pairwise_template)):
        try:
            find_template(name)
        except FlywheelError as exc:
            problems.append(f"{key}: {exc}".replace("\n  - ", " — "))
    return problems


# -- the stage wrapper ------------------------------------------------------------------------
def _stage(ctx: Context, kind: str, round_: int, params: dict, parents: list[str],
           compute: Callable[[str], tuple[dict[str, pd.DataFrame], dict]], *, code: str) -> str:
    """Reuse the version with this fingerprint, or compute and commit it atomically.

    A stop (SIGINT/SIGTERM, see flywheel.interrupt) requested before the stage or during its
    computation raises `Interrupted` with nothing of the stage committed."""
    cat = ctx.catalog
    ctx.stage = (round_, kind)
    interrupt.check()
    fp = fingerprint(kind, params, [cat.get(p).fingerprint for p in parents], code)
    hit = cat.find(fp)
    if hit is not None:
        ctx.stage = None
        ctx.log(f"round {round_} · {kind:<9} reused  {hit.version_id} ({hit.row_count} rows)")
        return hit.version_id
    t0 = time.perf_counter()
    cat.event(ctx.run_id, "stage", round=round_, stage=kind)
    with interrupt.computing():
        faults.point(f"{kind}:compute")
        tables, extra = compute(fp)
    with interrupt.committing():  # refuses once a stop was requested; else finishes
        v = cat.commit(kind=kind, run_id=ctx.run_id, round=round_, parents=parents,
                       params={**params, **extra}, fp=fp, tables=tables)
        ctx.made += 1
        ctx.stage = None
    ctx.log(f"round {round_} · {kind:<9} made    {v.version_id} ({v.row_count} rows, "
            f"{time.perf_counter() - t0:.1f}s)")
    return v.version_id


def _model(ctx: Context, version_id: str) -> dict:
    """A model version's row; its checkpoint must still be where the catalog says (a base
    model found at the configured `models.policy` with the same content hash counts)."""
    row = ctx.catalog.rows("model", version_id).iloc[0].to_dict()
    if Path(row["path"]).is_dir():
        return row
    policy = ctx.cfg.models.policy.path
    if row["method"] == "base" and Path(policy).is_dir() \
            and model_hash(policy, ctx.cfg.hash_cache_path()) == row["content_hash"]:
        return {**row, "path": policy}  # the same base model, moved
    raise FlywheelError(
        f"the checkpoint of model version {version_id} (round "
        f"{ctx.catalog.get(version_id).round}) is missing: {row['path']}",
        details=["it was deleted or moved after the catalog recorded it; no version was made "
                 "from it",
                 "restore the folder from a backup (or move it back), then run again",
                 "`flywheel check --catalog PATH` lists every missing or changed checkpoint",
                 "or go on without it in a new workspace: --set workspace=DIR"])


def _prompts(ctx: Context, versions: list[str]) -> pd.DataFrame:
    return ctx.catalog.rows("prompts", versions).drop_duplicates("prompt_id")


def _eval_prompts(cfg: Config, *, limit: bool = True) -> pd.DataFrame:
    """The eval file's prompts with their `split`; with `limit`, the first
    `eval.max_prompts` of each split (0 = all), in the file's order."""
    from flywheel.stages.prompts import eval_rows

    rows = eval_rows(load_prompt_file(cfg.eval.prompts_file), cfg.eval.prompts_file)
    if not (limit and cfg.eval.max_prompts):
        return rows
    return rows[rows.groupby("split").cumcount() < cfg.eval.max_prompts].reset_index(drop=True)


def _gen_params(cfg: Config) -> dict:
    """The model settings that shape what any generating stage makes (backend, dtype,
    batch size: see the `models` section's declarations; with the vllm backend, the server's
    settings that shape outputs)."""
    params = shaping(cfg.models)
    if cfg.models.backend == "vllm":
        params["vllm"] = shaping(cfg.models.vllm)
    return params


# -- round 0: seeds, base model, base eval ----------------------------------------------------
def seed_prompts(ctx: Context) -> str:
    """The seed pool as a prompts version (round 0)."""
    from flywheel.stages.prompts import SEED_CODE_VERSION, seed_rows

    path = ctx.cfg.prompts.seed_file
    params = {"seed_file": path, "sha256": file_hash(path)}
    return _stage(ctx, "prompts", 0, params, [], lambda fp: (
        {"prompts": seed_rows(_seed_records(path), path)}, {}), code=SEED_CODE_VERSION)


def _seed_records(path: str) -> list[dict]:
    """The seed file's records, refused when a line is marked for the transfer split."""
    records = load_prompt_file(path)
    refuse_transfer(path, records, "the seed file (prompts.seed_file)")
    return records


def base_model(ctx: Context) -> str:
    """The base policy as a model version (round 0)."""
    path = ctx.cfg.models.policy.path
    digest = model_hash(path, ctx.cfg.hash_cache_path())
    params = {"content_hash": digest}  # not the path: a moved checkpoint is the same model
    row = pd.DataFrame([{"path": path, "content_hash": digest, "base_version": None,
                         "method": "base", "train_pairs": 0, "metrics": "{}"}])
    return _stage(ctx, "model", 0, params, [], lambda fp: ({"models": row}, {}),
                  code=MODEL_CODE_VERSION)


# -- the stages of a round --------------------------------------------------------------------
# Each stage's params are what shapes its output: the settings its config sections declare
# SHAPES (ADDED ones when changed; see flywheel.config), the round and the seed, and the ids or
# content hashes of what it reads. Everything else (paths, devices, progress) stays out, so
# changing it reuses what is stored.


def generate_prompts(ctx: Context, round_: int, pool: list[str], policy: str) -> str:
    """Self-instruct: new prompts from few-shot examples of the pool, with provenance."""
    from flywheel.limits import counter
    from flywheel.stages import prompts as stage

    cfg = ctx.cfg
    gen = cfg.models.generator
    params = {"round": round_, "seed": cfg.seed, **shaping(cfg.prompts)}
    if gen.endpoint:
        from flywheel.roles import fingerprint_params

        gen_path = gen.model
        params.update(generator=f"endpoint:{gen.model}",
                      generator_endpoint=fingerprint_params(cfg, "generator"))
    else:
        gen_path = gen.path or _model(ctx, policy)["path"]
        params.update(**_gen_params(cfg), generator=gen.path and "fixed" or policy,
                      generator_hash=model_hash(gen_path, cfg.hash_cache_path()))
    params["constraint_types"] = list(cfg.prompts.constraint_types)

    def compute(fp):
        if cfg.prompts.num_new == 0:
            return {"prompts": stage.seed_rows([], "")}, {"stats": {}}
        pool_df = _prompts(ctx, pool)
        rng = random.Random(cfg.seed * 7919 + round_)
        requests = stage.self_instruct_requests(pool_df, cfg.prompts, rng)
        backend = ctx.served("generator") if gen.endpoint else ctx.backend
        raw = backend.generate(gen_path, [c for c, _ in requests], n=1,
                                   temperature=cfg.prompts.temperature, top_p=cfg.prompts.top_p,
                                   max_new_tokens=cfg.prompts.max_new_tokens,
                                   seed=cfg.seed + round_, desc="self-instruct")
        # lengths count in the tokens of the model that will answer the prompts
        fits = counter(_model(ctx, policy)["path"]).fits(cfg.prompts.max_prompt_tokens)
        rows, stats = stage.accept_tasks(
            [g[0].text for g in raw], [ids for _, ids in requests], stage.task_texts(pool_df),
            # every eval prompt, of both splits, used or not: its topic stays out of training
            stage.task_texts(_eval_prompts(cfg, limit=False)), cfg.prompts, rng,
            source_ref=policy,
            fits=fits)
        return {"prompts": rows}, {"stats": stats}

    return _stage(ctx, "prompts", round_, params, [*pool, policy], compute,
                  code=stage.CODE_VERSION)


def sample(ctx: Context, round_: int, new_prompts: str, pool: list[str], policy: str) -> str:
    """N candidates per selected prompt (and SPIN's greedy answers) from the policy; with
    `sampling.explore_budget` (DPO), more for the prompts whose candidates all pass or all
    fail their constraints. The version's params record, per constraint type, the prompts
    with a pass and a fail before and after exploration (`exploration`)."""
    from dataclasses import replace

    from flywheel.stages.sampling import CODE_VERSION, candidates, explore, select_prompts

    cfg, s = ctx.cfg, ctx.cfg.sampling
    spin = cfg.train.method == "spin"
    if spin or s.explore_budget <= 0:  # no exploration: its settings shape nothing
        s = replace(s, explore_budget=0)
    params = {"round": round_, "seed": cfg.seed, **shaping(s), "spin": spin,
              **_gen_params(cfg)}
    if not s.explore_budget:
        params = {k: v for k, v in params.items() if not k.startswith("explore_")}

    def compute(fp):
        model = _model(ctx, policy)
        new_ids = list(ctx.catalog.rows("prompts", new_prompts).prompt_id)
        pool_df = _prompts(ctx, [*pool, new_prompts])
        chosen = select_prompts(pool_df, new_ids, s.prompts_per_round, cfg.seed + round_,
                                s.balance_types)
        seed = cfg.seed * 1000 + round_
        parts = [candidates(ctx.backend, model["path"], policy, chosen, n=s.n,
                            temperature=s.temperature, top_p=s.top_p,
                            max_new_tokens=s.max_new_tokens, seed=seed, salt=fp)]
        extra, stats = explore(ctx.backend, model["path"], policy, chosen, parts[0], s,
                               seed=seed, salt=fp)
        if not extra.empty:
            parts.append(extra)
        if spin:
            gold = pool_df[pool_df.gold.notna()]
            parts.append(candidates(ctx.backend, model["path"], policy, gold, n=1,
                                    temperature=0.0, top_p=1.0,
                                    max_new_tokens=s.max_new_tokens, seed=seed, salt=fp,
                                    greedy=True))
        return {"samples": pd.concat(parts, ignore_index=True)}, {"exploration": stats}

    return _stage(ctx, "samples", round_, params, [new_prompts, *pool, policy], compute,
                  code=CODE_VERSION)


def _judge(ctx: Context, policy: str):
    """The judge (a fixed checkpoint, an endpoint, or the policy judging itself) and the
    backend it runs on."""
    from flywheel.stages.judging import Judge

    j = ctx.cfg.models.judge
    if j.endpoint:
        from flywheel.roles import identity

        who = identity(ctx.cfg, "judge")
        return ctx.served("judge"), Judge(version=f"endpoint:{j.model}", path=j.model,
                                          content_hash=who["identity"], location=who["url"])
    if j.path:
        return ctx.backend, Judge(version=f"fixed:{Path(j.path).name}", path=j.path,
                                  content_hash=model_hash(j.path, ctx.cfg.hash_cache_path()))
    m = _model(ctx, policy)
    return ctx.backend, Judge(version=policy, path=m["path"], content_hash=m["content_hash"])


def _judge_params(cfg: Config) -> dict:
    """What of the judge's model shapes judgments: for a local judge the generation settings
    (the checkpoint enters by content); for an endpoint, what it serves."""
    if not cfg.models.judge.endpoint:
        return _gen_params(cfg)
    from flywheel.roles import fingerprint_params

    return {"judge_endpoint": fingerprint_params(cfg, "judge")}


def judge(ctx: Context, round_: int, samples: str, prompt_versions: list[str],
          policy: str) -> str:
    """Verifiers and the LLM judge over one samples version."""
    from flywheel.stages.judging import CODE_VERSION, judge_samples, over_context
    from flywheel.templates import template_hash

    cfg = ctx.cfg
    judge_backend, jd = _judge(ctx, policy)
    params = {"round": round_, "seed": cfg.seed, **shaping(cfg.judge), **_judge_params(cfg),
              "judge": jd.version, "judge_hash": jd.content_hash,
              "template_hashes": [template_hash(cfg.judge.pointwise_template),
                                  template_hash(cfg.judge.pairwise_template)]}
    if cfg.judge.verdict == "text":  # verdicts read by the stricter parser of 0.1.0+2
        params["parser"] = 2

    def compute(fp):
        rows = judge_samples(judge_backend, jd, _prompts(ctx, prompt_versions),
                             ctx.catalog.rows("samples", samples), cfg.judge,
                             cfg.seed * 1000 + round_, fp)
        _log_over_context(ctx, round_, "judgments", over_context(rows))
        return {"judgments": rows}, {}

    return _stage(ctx, "judgments", round_, params, [samples, *prompt_versions, policy], compute,
                  code=CODE_VERSION)


def canary(ctx: Context, round_: int, judgments: str, policy: str) -> str:
    """The canary set (`judge.canary_file`) judged in both orders by the round's judge (the
    judgments' judge), through the judging stage's pairwise template and verdict reading: a
    version of kind `canary` whose parent is the round's judgments. Its fingerprint holds the
    judge's identity, the canary file's content and the judge settings a pairwise verdict
    depends on, so a rerun reuses it and the judgments' own fingerprint is unchanged. "" (no
    version) when `judge.canary_file` is empty."""
    from flywheel.stages.canary import CODE_VERSION, judge_canary, load_canary
    from flywheel.templates import template_hash

    cfg = ctx.cfg
    path = cfg.judge.canary_file
    if not path:
        return ""
    judge_backend, jd = _judge(ctx, policy)
    j = cfg.judge
    params = {"round": round_, "seed": cfg.seed, "canary_sha256": file_hash(path),
              "verdict": j.verdict, "max_new_tokens": j.max_new_tokens,
              "pairwise_template": template_hash(j.pairwise_template), **_judge_params(cfg),
              "judge": jd.version, "judge_hash": jd.content_hash}
    if j.verdict == "text":
        params["parser"] = 2

    def compute(fp):
        rows = judge_canary(judge_backend, jd, load_canary(path), j, round_=round_,
                            seed=cfg.seed * 1000 + round_, salt=fp)
        unsent = rows.rationale.fillna("").str.startswith("input is ") & ~rows.parsed
        _log_over_context(ctx, round_, "canary", list(rows.rationale[unsent]))
        return {"canary_judgments": rows}, {
            "accuracy": float(rows.correct.mean()) if len(rows) else None}

    return _stage(ctx, "canary", round_, params, [judgments], compute, code=CODE_VERSION)


def build_pairs(ctx: Context, round_: int, judgments: str, samples: str,
                prompt_versions: list[str]) -> str:
    """Preference pairs (DPO: best vs worst, or up to `pairs.per_prompt` per prompt; SPIN:
    gold vs own answer). The version's params count the pairs by rule (`rules`) and, per
    constraint type, the prompts that ended with a pair (`by_type`)."""
    from flywheel.stages.pairs import (
        CODE_VERSION,
        length_bounds,
        pairs_by_type,
        repair_pairs,
        spin_pairs,
    )
    from flywheel.stages.pairs import build_pairs as best_worst

    cfg = ctx.cfg
    spin = cfg.train.method == "spin"
    # the judge mode is not in these params: the judgments (a parent) carry it in theirs
    params = {"round": round_, **shaping(cfg.pairs), "method": cfg.train.method}
    if spin:  # SPIN makes one pair per gold answer
        params.pop("per_prompt", None)
        params.pop("repair", None)

    def compute(fp):
        s = ctx.catalog.rows("samples", samples)
        prompts = _prompts(ctx, prompt_versions)
        if spin:
            rows = spin_pairs(prompts, s, fp)
        else:
            judged = ctx.catalog.rows("judgments", judgments)
            rows = best_worst(s, judged, cfg.pairs, fp, mode=cfg.judge.mode,
                              bounds=length_bounds(prompts))
            if cfg.pairs.repair:
                fixed = repair_pairs(prompts, s, judged, cfg.pairs.repair, fp,
                                     mode=cfg.judge.mode, cfg=cfg.pairs)
                rows = pd.concat([rows, fixed], ignore_index=True) if len(fixed) else rows
        return {"pairs": rows}, {"rules": rows.rule.value_counts().to_dict(),
                                 "by_type": pairs_by_type(prompts, s, rows)}

    return _stage(ctx, "pairs", round_, params, [judgments, samples, *prompt_versions], compute,
                  code=CODE_VERSION)


def _sampled_passes(ctx: Context, pairs: str, prompts: pd.DataFrame) -> pd.DataFrame:
    """`train.sft_per_prompt`: the round's candidates that pass every constraint (with
    `train.sft_repair`, topped up by repaired ones), from the samples and judgments the pairs
    version was made from (its parents)."""
    from flywheel.stages.train import sampled_passes

    parents = {ctx.catalog.get(v).kind: v for v in ctx.catalog.get(pairs).parents}
    if "samples" not in parents or "judgments" not in parents:
        return pd.DataFrame(columns=["prompt_id", "text"])
    return sampled_passes(prompts, ctx.catalog.rows("samples", parents["samples"]),
                          ctx.catalog.rows("judgments", parents["judgments"]),
                          ctx.cfg.train.sft_per_prompt, ctx.cfg.judge.mode,
                          repair_types=ctx.cfg.pairs.repair if ctx.cfg.train.sft_repair else None,
                          pairs_cfg=ctx.cfg.pairs)


def training_dtype(cfg: Config) -> str:
    """The dtype training runs in: train.dtype, or with `auto` models.dtype."""
    return cfg.models.dtype if cfg.train.dtype == "auto" else cfg.train.dtype


def train(ctx: Context, round_: int, pairs: str, prompt_versions: list[str], policy: str, *,
          previous_pairs: str | None = None, base: str | None = None) -> str:
    """LoRA DPO/SPIN on the round's pairs (plus the previous round's with
    `train.data_mix: current+previous`), against the round's starting model or, with
    `train.reference: base`, the round-0 model; the merged checkpoint becomes a model version.
    """
    from flywheel.stages.train import (
        STEP_COLUMNS,
        STEPS_KEY,
        sft_copies,
        sft_rephrasings,
        train_lora,
    )

    cfg = ctx.cfg
    t = cfg.train
    dtype = training_dtype(cfg)
    params = {"round": round_, "seed": cfg.seed, **shaping(t),
              # every model before train.dtype was trained in float32: only others are named
              **({"train_dtype": dtype} if dtype != "float32" else {})}
    mixed = [pairs] + ([previous_pairs] if t.data_mix == "current+previous" and previous_pairs
                       else [])
    reference = base if t.reference == "base" and base else policy
    recorded = {"data_mix": t.data_mix, "pairs_versions": mixed, "reference": t.reference,
                "reference_version": reference}

    def compute(fp):
        start = _model(ctx, policy)
        pair_rows = ctx.catalog.rows("pairs", mixed)
        if len(pair_rows) < max(1, t.min_pairs):
            ctx.log(f"round {round_} · train     {len(pair_rows)} pairs < train.min_pairs: "
                    "the model is kept unchanged")
            row = {"path": start["path"], "content_hash": start["content_hash"],
                   "base_version": policy, "method": "unchanged", "train_pairs": len(pair_rows),
                   "metrics": "{}"}
            return {"models": pd.DataFrame([row])}, recorded
        out = cfg.models_dir() / f"model-r{round_}-{fp[:10]}"
        ctx.backend.release()
        pool = _prompts(ctx, prompt_versions)
        text = dict(zip(pool.prompt_id, pool.text))
        extra = _sampled_passes(ctx, pairs, pool) if t.sft_epochs and t.sft_per_prompt else None
        if t.sft_rephrase and t.sft_epochs > 0:
            used = set(pair_rows.prompt_id) | (set(extra.prompt_id) if extra is not None else set())
            text |= sft_rephrasings(pool, used, sft_copies(t))
        ref_path = _model(ctx, reference)["path"] if reference != policy else None
        metrics = train_lora(start["path"], pair_rows, text, t, out, seed=cfg.seed,
                             device=cfg.models.device, dtype=dtype, progress=cfg.progress,
                             ref_path=ref_path, log=ctx.log, sft_extra=extra)
        if metrics.get("sft_steps"):
            ctx.log(f"round {round_} · train     SFT step on {metrics['sft_examples']} verified "
                    f"passes: {metrics['sft_steps']} steps, loss {metrics['sft_loss']:.3f}")
        # every logged step, as rows of train_steps committed with the model version
        steps = pd.DataFrame(metrics.pop(STEPS_KEY, []), columns=STEP_COLUMNS)
        row = {"path": str(out), "content_hash": model_hash(out, cfg.hash_cache_path()),
               "base_version": policy,
               "method": t.method, "train_pairs": len(pair_rows),
               "metrics": json.dumps(metrics)}
        return {"models": pd.DataFrame([row]), "train_steps": steps}, recorded

    extra_parents = mixed[1:] + ([reference] if reference != policy else [])
    return _stage(ctx, "model", round_, params,
                  [pairs, *extra_parents, *prompt_versions, policy], compute,
                  code=MODEL_CODE_VERSION)


#: The judge settings the eval's comparison uses (pairwise, in both orders). In the eval's
#: fingerprint where they differ from their defaults, and only for evals that compare: an eval
#: made before they were part of it keeps its fingerprint with default judge settings, and
#: the migration 0005_eval_fingerprint_names_its_judge re-fingerprints the others.
EVAL_JUDGE_SETTINGS = ("verdict", "samples", "temperature", "max_new_tokens",
                       "pairwise_template")


def eval_judge_params(cfg: Config, baseline: str | None) -> dict:
    """What the eval's fingerprint holds of the judge: its settings (those the comparison
    uses, where changed) when the eval compares against a baseline with the LLM judge."""
    if not baseline or not cfg.eval.judge:
        return {}
    settings = changed(cfg.judge, EVAL_JUDGE_SETTINGS)
    out = {"judge_settings": settings} if settings else {}
    if cfg.models.judge.endpoint:
        from flywheel.roles import fingerprint_params

        out["judge_endpoint"] = fingerprint_params(cfg, "judge")
    return out


def _eval_judge_name(cfg: Config) -> str:
    """The eval's judge, as its fingerprint names it (its path, as before endpoints)."""
    j = cfg.models.judge
    return f"endpoint:{j.model}" if j.endpoint else (j.path or "start-model")


def evaluate(ctx: Context, round_: int, model: str, baseline: str | None,
             baseline_eval: str | None) -> str:
    """Held-out eval: constraint pass rates and answer lengths of both splits, per constraint
    type (in the version's params: `splits`); with a baseline, the win rate in both orders
    on the in-distribution split."""
    from flywheel.stages import evaluate as stage

    cfg = ctx.cfg
    params = {"round": round_, **shaping(cfg.eval), "sha256": file_hash(cfg.eval.prompts_file),
              **_gen_params(cfg), "judge": _eval_judge_name(cfg),
              **eval_judge_params(cfg, baseline)}
    parents = [model] + ([baseline] if baseline else []) + ([baseline_eval] if baseline_eval
                                                             else [])

    def compute(fp):
        from flywheel.promptfile import IN_DISTRIBUTION

        prompts = _eval_prompts(cfg)
        items = _answers(ctx, model, prompts, baseline_eval)
        split_of = dict(zip(prompts.prompt_id, prompts.split))
        splits = [split_of[p] for p in items.prompt_id]
        # the in-distribution split is compared with the baseline and gives pass_rate; the
        # transfer split is only measured (its items carry no baseline, verdicts or outcome)
        ind = pd.Series([s == IN_DISTRIBUTION for s in splits], index=items.index)
        compared = items[ind].reset_index(drop=True)
        if baseline:
            compared = _compare(ctx, compared, prompts, model, baseline, baseline_eval,
                                round_)
        overall, by_type = stage.pass_rates(compared)
        summary = stage.summarise(compared) if baseline else {}
        if (~ind).any():  # back in the file's order
            order = {p: i for i, p in enumerate(items.prompt_id)}
            items = pd.concat([compared, items[~ind]], ignore_index=True)
            items = items.iloc[items.prompt_id.map(order).argsort()].reset_index(drop=True)
        else:
            items = compared
        report = stage.split_report(items, [split_of[p] for p in items.prompt_id])
        items["model_version"] = model
        row = {"model_version": model, "baseline_version": baseline, "n_prompts": len(items),
               "pass_rate": overall, "pass_by_type": json.dumps(by_type), **summary}
        items = items.reindex(columns=stage.ITEM_COLUMNS)
        return {"evals": pd.DataFrame([row]), "eval_items": items}, {"splits": report}

    return _stage(ctx, "eval", round_, params, parents, compute, code=stage.CODE_VERSION)


def _log_over_context(ctx: Context, round_: int, kind: str, errors: list[str]) -> None:
    """Say how many judge inputs were too long for the judge (flagged, not sent), and why."""
    if errors:
        ctx.log(f"round {round_} · {kind:<9} {len(errors)} judge input(s) not sent, flagged "
                f"unparsed; the first: {errors[0]}")


def _answers(ctx: Context, model: str, prompts: pd.DataFrame,
             earlier_eval: str | None) -> pd.DataFrame:
    """The model's eval answers, reused from an earlier eval of the same checkpoint."""
    from flywheel.stages.evaluate import answers

    m = _model(ctx, model)
    if earlier_eval:
        old = queries.earlier_eval_answers(ctx.catalog, earlier_eval, m["content_hash"])
        if len(old) == len(prompts):
            return old[["prompt_id", "text", "finish_reason", "checks", "pass_fraction"]]
    return answers(ctx.backend, m["path"], prompts, ctx.cfg.eval.max_new_tokens)


def _compare(ctx: Context, items: pd.DataFrame, prompts: pd.DataFrame, model: str,
             baseline: str, baseline_eval: str | None, round_: int) -> pd.DataFrame:
    """Attach the baseline's answers, the LLM judge's two verdicts and the outcome."""
    from flywheel.stages.evaluate import outcome
    from flywheel.stages.judging import over_context, pairwise_judgments

    base = _answers(ctx, baseline, prompts, baseline_eval).set_index("prompt_id")
    items = items.copy()
    items["baseline_text"] = [base.text[p] for p in items.prompt_id]
    base_frac = [base.pass_fraction[p] for p in items.prompt_id]
    items["verdict_ab"] = items["verdict_ba"] = None
    tied = [i for i, (a, b) in enumerate(zip(items.pass_fraction, base_frac))
            if (pd.isna(a) or pd.isna(b) or a == b)]
    if ctx.cfg.eval.judge and tied:
        cand = pd.concat([
            pd.DataFrame({"sample_id": "new:" + items.prompt_id, "prompt_id": items.prompt_id,
                          "text": items.text}),
            pd.DataFrame({"sample_id": "base:" + items.prompt_id, "prompt_id": items.prompt_id,
                          "text": items.baseline_text})])
        pairs = [("new:" + items.prompt_id.iloc[i], "base:" + items.prompt_id.iloc[i])
                 for i in tied]
        judge_backend, jd = _judge(ctx, baseline)
        rows = pairwise_judgments(judge_backend, jd, prompts, cand, pairs,
                                  ctx.cfg.judge, ctx.cfg.seed + round_, "eval")
        _log_over_context(ctx, round_, "eval", over_context(rows))
        verdict = {(r["sample_a"], r["swapped"]): r["verdict"] for r in rows}
        items["verdict_ab"] = [verdict.get(("new:" + p, False)) for p in items.prompt_id]
        items["verdict_ba"] = [verdict.get(("base:" + p, True)) for p in items.prompt_id]
    items["outcome"] = [
        outcome(None if pd.isna(a) else a, None if pd.isna(b) else b, ab, ba)
        for a, b, ab, ba in zip(items.pass_fraction, base_frac, items.verdict_ab,
                                items.verdict_ba)]
    return items


# -- the promotion gate -----------------------------------------------------------------------
def gate(ctx: Context, round_: int, model: str, ev: str, policy: str, policy_eval: str,
         previous_gate: str | None) -> str:
    """Promote the round's model to policy, or reject it and keep the current policy
    (`flywheel.stages.gate`). The decision is a version of kind `gate` (table `gates`) whose
    parents are the eval, the candidate, the current policy and the previous round's gate, so
    the chain of rounds, rejected ones included, is a join.
    """
    from flywheel.stages.gate import CODE_VERSION, decide

    params = {"round": round_, **shaping(ctx.cfg.eval, "gate")}

    def compute(fp):
        row = decide(ctx.catalog.rows("eval", ev).iloc[0].to_dict(), ctx.cfg.eval, model=model,
                     eval_version=ev, policy=policy, policy_eval=policy_eval)
        return {"gates": pd.DataFrame([row])}, {"promoted": row["promoted"]}

    parents = [ev, model, policy] + ([previous_gate] if previous_gate else [])
    return _stage(ctx, "gate", round_, params, parents, compute, code=CODE_VERSION)


# -- the round, declared once -----------------------------------------------------------------
@dataclass
class RoundState:
    """What a round's stages read and write: version ids. The loop fills the inputs; each
    stage sets its `output`."""

    round: int
    pool: list[str]  # the prompts versions before this round (seeds, ingested, earlier rounds)
    policy: str  # the model the round starts from (the last promoted one)
    policy_eval: str  # the eval holding that model's answers
    base: str  # the round-0 model
    previous_pairs: str | None = None
    previous_gate: str | None = None
    prompts: str = ""
    samples: str = ""
    judgments: str = ""
    canary: str = ""  # "" when judge.canary_file is empty
    pairs: str = ""
    model: str = ""
    eval: str = ""
    gate: str = ""

    @property
    def prompt_versions(self) -> list[str]:
        """The pool the round's later stages read: earlier prompts plus the round's own."""
        return [*self.pool, self.prompts]


@dataclass(frozen=True)
class Stage:
    """One stage of the round: what it is called, the kind of version it makes (its table is
    `flywheel.catalog.TABLES[kind]`), the RoundState fields it reads, the function that
    computes (or reuses) it, and the config sections whose settings shape it (each setting
    declares how: flywheel.config `fp=`)."""

    name: str  # the Prefect task's name, and the log's
    kind: str
    output: str  # the RoundState field it sets
    inputs: tuple[str, ...]
    run: Callable[[Context, RoundState], str]
    sections: tuple[str, ...]
    calls_model: bool = False  # generates with a model
    roles: tuple[str, ...] = ()  # the model roles it calls: retried when one is served remotely

    def __call__(self, ctx: Context, state: RoundState) -> str:
        return self.run(ctx, state)


#: The round: one entry per stage, in order. `run_round` (plain Python) and the Prefect flow
#: (flows/iterate.py: one task per entry) both run exactly this list. Adding a stage is one
#: entry here, its function above and its table (flywheel/tables.py, with a migration).
ROUND: tuple[Stage, ...] = (
    Stage("prompts", "prompts", "prompts", ("pool", "policy"),
          lambda ctx, s: generate_prompts(ctx, s.round, s.pool, s.policy),
          ("prompts", "models"), calls_model=True, roles=("generator", "policy")),
    Stage("samples", "samples", "samples", ("prompts", "pool", "policy"),
          lambda ctx, s: sample(ctx, s.round, s.prompts, s.pool, s.policy),
          ("sampling", "models", "train.method"), calls_model=True, roles=("policy",)),
    Stage("judgments", "judgments", "judgments", ("samples", "prompt_versions", "policy"),
          lambda ctx, s: judge(ctx, s.round, s.samples, s.prompt_versions, s.policy),
          ("judge", "models"), calls_model=True, roles=("judge", "policy")),
    Stage("canary", "canary", "canary", ("judgments", "policy"),
          lambda ctx, s: canary(ctx, s.round, s.judgments, s.policy),
          ("judge", "models"), calls_model=True, roles=("judge", "policy")),
    Stage("pairs", "pairs", "pairs", ("judgments", "samples", "prompt_versions"),
          lambda ctx, s: build_pairs(ctx, s.round, s.judgments, s.samples, s.prompt_versions),
          ("pairs", "judge.mode", "train.method")),
    Stage("train", "model", "model",
          ("pairs", "prompt_versions", "policy", "previous_pairs", "base"),
          lambda ctx, s: train(ctx, s.round, s.pairs, s.prompt_versions, s.policy,
                               previous_pairs=s.previous_pairs, base=s.base),
          ("train",)),
    Stage("eval", "eval", "eval", ("model", "policy", "policy_eval"),
          lambda ctx, s: evaluate(ctx, s.round, s.model, s.policy, s.policy_eval),
          ("eval", "judge", "models"), calls_model=True, roles=("policy", "judge")),
    Stage("gate", "gate", "gate", ("eval", "model", "policy", "policy_eval", "previous_gate"),
          lambda ctx, s: gate(ctx, s.round, s.model, s.eval, s.policy, s.policy_eval,
                              s.previous_gate),
          ("eval.min_win_rate", "eval.gate_statistic")),
)
STAGES: dict[str, Stage] = {st.name: st for st in ROUND}


# -- the loop -----------------------------------------------------------------------------------
@dataclass
class RoundResult:
    round: int
    prompts: str
    samples: str
    judgments: str
    pairs: str
    model: str
    eval: str
    gate: str = ""
    promoted: bool = True
    policy: str = ""  # the model the next round starts from
    new: bool = True  # whether any of the round's versions was computed by this run
    report: str = ""  # the HTML report written after the round (report.enabled), or ""

    @classmethod
    def of(cls, state: RoundState, new: bool) -> RoundResult:
        return cls(state.round, state.prompts, state.samples, state.judgments, state.pairs,
                   state.model, state.eval, state.gate, new=new)


@contextmanager
def prepared(cfg: Config, run_id: str, command: str = "") -> Iterator[runlock.Held]:
    """Check every input (preflight), then take the workspace lock for the run; released
    however the block ends. `flywheel iterate` takes it before Prefect starts, so a second
    run, or bad input, stops at once; `running` inside it does not take either again."""
    if runlock.is_locked(cfg.catalog_path()):
        # a second run stops at once, before the preflight loads models: acquire names the
        # holder (and should the holder have just finished, lets go at once)
        runlock.acquire(cfg.catalog_path(), run_id, command)
        runlock.release(cfg.catalog_path())
    preflight(cfg)
    runlock.acquire(cfg.catalog_path(), run_id, command)
    from flywheel import roles

    roles.store_checks()
    for line in roles.describe_served(cfg):
        print(line, file=sys.stderr, flush=True)
    try:
        yield runlock.held(cfg.catalog_path())
    finally:
        runlock.release(cfg.catalog_path())


@contextmanager
def running(cfg: Config, run_id: str | None = None, command: str = "") -> Iterator[Context]:
    """A run: check inputs and take the workspace lock (unless this process holds it for the
    run already: see `prepared`), record the run and its end (finish; fail with the stage and
    the error; or interrupted by a signal, with the stage); the lock is released however the
    run ends."""
    held = runlock.held(cfg.catalog_path())
    if held is None:
        with prepared(cfg, run_id or new_run_id(), command) as held, \
                running(cfg, held.holder.run_id, command) as ctx:
            yield ctx
        return
    if run_id and run_id != held.holder.run_id:
        raise FlywheelError(f"this process holds the lock of {cfg.catalog_path()} for run "
                            f"{held.holder.run_id}, not {run_id}")
    ctx = context(cfg, held.holder.run_id)
    stale = held.stale
    ctx.catalog.init()
    if stale is not None and stale.run_id != ctx.run_id:
        ctx.log(f"the lock of {stale.describe()} was left by a process that no longer "
                "runs: taken over; finished stages are reused, the interrupted one redone")
        ctx.catalog.event(stale.run_id, "killed", detail={"detected_by": ctx.run_id})
    ctx.catalog.record_run(ctx.run_id, cfg.to_dict(), command)
    ctx.catalog.event(ctx.run_id, "start", detail={
        "pid": os.getpid(), "host": socket.gethostname(), "command": command,
        "took_over": stale.run_id if stale else None})
    try:
        yield ctx
    except BaseException as exc:
        if isinstance(exc, Interrupted):
            exc.round, exc.stage = ctx.stage or (None, None)
        with interrupt.deferred():  # a managed server is stopped before anything else
            ctx.close()
        try:
            with interrupt.deferred():  # a second Ctrl-C does not cut the record short
                _record_end(ctx, exc, command)
            if isinstance(exc, Interrupted):
                exc.recorded = True
        except Exception:  # the failure being reported matters more
            pass
        raise
    ctx.close()
    ctx.catalog.event(ctx.run_id, "finish")


def _record_end(ctx: Context, exc: BaseException, command: str) -> None:
    """Record how a run ended early, with the round and stage it was in: `interrupted` by a
    signal (nothing of the stage in flight committed), or `fail` with its error."""
    round_, kind = ctx.stage or (None, None)
    signame = _signal_name(exc)
    if signame:
        ctx.catalog.event(ctx.run_id, "interrupted", round=round_, stage=kind,
                          detail={"signal": signame, "command": command})
    else:
        ctx.catalog.event(ctx.run_id, "fail", round=round_, stage=kind, detail={
            "error": f"{type(exc).__name__}: {exc}"})


def _signal_name(exc: BaseException) -> str | None:
    """The signal that ended a run with `exc` (SIGINT, SIGTERM), if a signal did: our own
    `Interrupted`, Python's KeyboardInterrupt, or Prefect's TerminationSignal."""
    if isinstance(exc, Interrupted):
        return exc.signame
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT"
    if type(exc).__name__ == "TerminationSignal":
        import signal

        try:
            return signal.Signals(exc.signal).name
        except (AttributeError, ValueError):
            return "SIGTERM"
    return None


def round_zero(ctx: Context) -> tuple[str, str, str]:
    """Seeds, base model, and the base model's held-out eval (round 0)."""
    seeds, base = seed_prompts(ctx), base_model(ctx)
    return seeds, base, evaluate(ctx, 0, base, None, None)


@dataclass
class Loop:
    """Where the loop stands between rounds: the prompt pool, the policy (the last promoted
    model) with its eval, the base model, the last round's pairs and gate."""

    pool: list[str]
    policy: str
    policy_eval: str
    base: str
    previous_pairs: str | None = None
    previous_gate: str | None = None
    round: int = 0  # the last round done
    new_rounds: int = 0  # rounds this run computed (not all reused)

    def wants(self, rounds: int, continue_: bool) -> bool:
        """Another round? `rounds` in all, or with `continue_`, `rounds` new ones: rounds the
        catalog already holds are reused and not counted, so each run adds rounds."""
        return (self.new_rounds if continue_ else self.round) < rounds

    def last_round(self, rounds: int, continue_: bool) -> int:
        """The round a run asked for `rounds` ends with: with `continue_`, the rounds done so
        far plus those it has still to compute (what `--rounds` says after an interrupt)."""
        return self.round + rounds - self.new_rounds if continue_ else rounds

    def next_round(self, round_: int) -> RoundState:
        """The inputs of round `round_`, which starts from here."""
        return RoundState(round=round_, pool=list(self.pool), policy=self.policy,
                          policy_eval=self.policy_eval, base=self.base,
                          previous_pairs=self.previous_pairs, previous_gate=self.previous_gate)

    def advance(self, res: RoundResult) -> None:
        self.pool = [*self.pool, res.prompts]
        if res.promoted:
            self.policy, self.policy_eval = res.model, res.eval
        self.previous_pairs, self.previous_gate, self.round = res.pairs, res.gate, res.round
        self.new_rounds += res.new


def run_round(ctx: Context, round_: int, loop: Loop) -> RoundResult:
    """One round: the stages of ROUND in order, without Prefect."""
    made = ctx.made
    state = loop.next_round(round_)
    for stage in ROUND:
        setattr(state, stage.output, stage(ctx, state))
    return finish_round(ctx, RoundResult.of(state, new=ctx.made > made))


def finish_round(ctx: Context, res: RoundResult) -> RoundResult:
    """Read the gate's decision into the result, log it and record the round's end."""
    row = ctx.catalog.rows("gate", res.gate).iloc[0]
    res.promoted, res.policy = bool(row.promoted), row.policy_version
    verdict = "promoted" if res.promoted else "REJECTED"
    ctx.log(f"round {res.round} · gate      {verdict}: {row.reason}")
    ctx.catalog.event(ctx.run_id, "round", round=res.round, stage="gate", version_id=res.gate,
                      detail={"promoted": res.promoted, "policy": res.policy,
                              "reason": row.reason, "new": res.new})
    res.report = write_report(ctx, res.round)
    return res


def write_report(ctx: Context, round_: int) -> str:
    """The HTML report of the catalog so far (`flywheel report`), written to
    `report.dir` after each round when `report.enabled`: its path, logged; "" when off. A
    report that cannot be written is logged and the run goes on (the round is committed)."""
    if not ctx.cfg.report.enabled:
        return ""
    from flywheel import htmlreport

    try:
        path = htmlreport.write_report(ctx.cfg.catalog_path(), ctx.cfg.report_dir())
    except Exception as exc:  # a figure that fails must not fail a run whose round is kept
        ctx.log(f"round {round_} · report    not written: {type(exc).__name__}: {exc} "
                "(`flywheel report` writes it again)")
        return ""
    ctx.log(f"round {round_} · report    {path}")
    return str(path)


def ingested_prompts(ctx: Context) -> list[str]:
    """Every prompts version `flywheel ingest` made, oldest first: the pool after the seeds."""
    return queries.ingested_prompt_versions(ctx.catalog)


def start_loop(ctx: Context, seeds: str, base: str, base_eval: str) -> Loop:
    return Loop(pool=[seeds, *ingested_prompts(ctx)], policy=base, policy_eval=base_eval,
                base=base)


def iterate(cfg: Config, rounds: int, *, run_id: str | None = None, command: str = "",
            continue_: bool = False,
            on_round: Callable[[Context, RoundResult], None] | None = None) -> list[RoundResult]:
    """Rounds 1..`rounds` (with `continue_`: `rounds` more after those in the catalog), each
    starting from the last promoted model."""
    results = []
    with running(cfg, run_id, command) as ctx, resumable(rounds, continue_) as loop_at:
        loop = loop_at(start_loop(ctx, *round_zero(ctx)))
        while loop.wants(rounds, continue_):
            res = run_round(ctx, loop.round + 1, loop)
            loop.advance(res)
            results.append(res)
            if on_round:
                on_round(ctx, res)
    return results


@contextmanager
def resumable(rounds: int, continue_: bool) -> Iterator[Callable[[Loop], Loop]]:
    """Give an `Interrupted` leaving the loop the last round its run asked for, so the resume
    command can name it (`--rounds N`). Yields a function that registers the loop."""
    held: list[Loop] = []

    def register(loop: Loop) -> Loop:
        held.append(loop)
        return loop

    try:
        yield register
    except Interrupted as exc:
        exc.rounds = held[0].last_round(rounds, continue_) if held else rounds
        raise
