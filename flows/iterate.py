"""Prefect flows over `flywheel.pipeline`: a thin executor of the round it declares.

`round_flow` runs `pipeline.ROUND` in order, one task per entry, named after it, with retries
where the stage generates with a remote model. Tasks are thin: each runs one stage and returns
a version id (a short string), never data. The flows validate the config once
(`iterate_flow` takes a plain mapping, as a deployment passes it) and hand the validated
`Config` to every task. The round's summary becomes a markdown artifact. Under
`flywheel iterate`, each flow takes SIGTERM back from Prefect's flow engine
(`interrupt.reclaim`), so SIGINT and SIGTERM stop a flow as they stop the plain pipeline:
never inside a commit.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flywheel import interrupt, pipeline, report
from flywheel.backends import is_remote
from flywheel.config import Config, config_from_dict

#: Retries of a stage that generates with a remote model (a model server can drop a request);
#: a local model's failure is not transient, so it is not retried.
REMOTE_RETRIES = 2


def _ctx(cfg: Config, run_id: str) -> pipeline.Context:
    ctx = pipeline.context(cfg, run_id)
    try:
        logger = get_run_logger()
        ctx.log = logger.info
    except Exception:  # outside a run context: keep printing
        pass
    return ctx


def run_stage(cfg: Config, run_id: str, name: str, state: pipeline.RoundState) -> str:
    """Run one stage of the round (reused if its version is in the catalog)."""
    return pipeline.STAGES[name](_ctx(cfg, run_id), state)


def _backend_of(cfg: Config, role: str) -> str:
    """The backend a role runs on: its own when served, else the in-process one."""
    r = getattr(cfg.models, role)
    return r.backend if r.endpoint else cfg.models.backend


def stage_task(stage: pipeline.Stage, cfg: Config):
    """The Prefect task of one stage: named after it, retried when it calls a remote model.
    Printing is not turned into logs: `datasets` (training) prints a bytecode listing when it
    hashes functions with dill, which would flood the run's logs."""
    remote = any(is_remote(_backend_of(cfg, role)) for role in stage.roles)
    retries = REMOTE_RETRIES if stage.calls_model and remote else 0
    return task(run_stage, name=stage.name, cache_policy=NO_CACHE, log_prints=False,
                retries=retries, retry_delay_seconds=10)


@task(name="round-0", cache_policy=NO_CACHE)
def round_zero_task(cfg: Config, run_id: str) -> tuple[str, str, str]:
    return pipeline.round_zero(_ctx(cfg, run_id))


@flow(name="flywheel-round", log_prints=True, validate_parameters=False)
def round_flow(cfg: Config, run_id: str, state: pipeline.RoundState) -> dict:
    """One round: the stages of `pipeline.ROUND`, one task each, in order."""
    interrupt.reclaim()
    ctx = _ctx(cfg, run_id)
    made = ctx.made
    for stage in pipeline.ROUND:
        setattr(state, stage.output, stage_task(stage, cfg)(cfg, run_id, stage.name, state))
    res = pipeline.finish_round(ctx, pipeline.RoundResult.of(state, new=ctx.made > made))
    rows = report.summary_rows(ctx.catalog, last_eval=res.eval)
    link = f"\n\nReport: [{res.report}]({Path(res.report).resolve().as_uri()})\n" \
        if res.report else ""
    create_markdown_artifact(key=f"flywheel-round-{res.round}",
                             markdown=f"# flywheel round {res.round}\n\n"
                                      + report.markdown(rows) + link,
                             description=f"round {res.round} summary")
    return vars(res)


@flow(name="flywheel-iterate", log_prints=True)
def iterate_flow(config: dict, rounds: int = 3, run_id: str | None = None,
                 command: str = "flywheel iterate", continue_rounds: bool = False) -> list[dict]:
    """Rounds 1..`rounds`, each starting from the last promoted model. With `continue_rounds`,
    `rounds` more rounds after those the catalog holds (what a scheduled deployment runs)."""
    interrupt.reclaim()
    cfg = config_from_dict(config)
    results = []
    with pipeline.running(cfg, run_id, command) as ctx, \
            pipeline.resumable(rounds, continue_rounds) as loop_at:
        seeds, base, base_eval = round_zero_task(cfg, ctx.run_id)
        loop = loop_at(pipeline.start_loop(ctx, seeds, base, base_eval))
        while loop.wants(rounds, continue_rounds):
            res = round_flow(cfg, ctx.run_id, loop.next_round(loop.round + 1))
            loop.advance(pipeline.RoundResult(**res))
            results.append(res)
            report.print_table(report.summary_rows(ctx.catalog, last_eval=res["eval"]),
                               f"flywheel · round {res['round']}")
    return results
