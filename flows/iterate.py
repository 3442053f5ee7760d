"""Prefect flows over `flywheel.pipeline`: one named task per stage, version ids between them.

Tasks are thin: each calls one plain pipeline function and returns a version id (a short
string), never data. The round's summary becomes a markdown artifact. Under `flywheel iterate`,
each flow takes SIGTERM back from Prefect's flow engine (`interrupt.reclaim`), so SIGINT and
SIGTERM stop a flow as they stop the plain pipeline: never inside a commit.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flywheel import interrupt, pipeline, report
from flywheel.config import config_from_dict


def _ctx(config: dict, run_id: str) -> pipeline.Context:
    ctx = pipeline.context(config_from_dict(config), run_id)
    try:
        logger = get_run_logger()
        ctx.log = logger.info
    except Exception:  # outside a run context: keep printing
        pass
    return ctx


@task(name="prompts", cache_policy=NO_CACHE)
def prompts_task(config: dict, run_id: str, round_: int, pool: list[str], policy: str) -> str:
    return pipeline.generate_prompts(_ctx(config, run_id), round_, pool, policy)


@task(name="samples", cache_policy=NO_CACHE)
def samples_task(config: dict, run_id: str, round_: int, new: str, pool: list[str],
                 policy: str) -> str:
    return pipeline.sample(_ctx(config, run_id), round_, new, pool, policy)


@task(name="judgments", cache_policy=NO_CACHE)
def judgments_task(config: dict, run_id: str, round_: int, samples: str, prompts: list[str],
                   policy: str) -> str:
    return pipeline.judge(_ctx(config, run_id), round_, samples, prompts, policy)


@task(name="pairs", cache_policy=NO_CACHE)
def pairs_task(config: dict, run_id: str, round_: int, judgments: str, samples: str,
               prompts: list[str]) -> str:
    return pipeline.build_pairs(_ctx(config, run_id), round_, judgments, samples, prompts)


# log_prints off: `datasets` hashes functions with dill, which prints a bytecode listing to a
# captured stdout; with Prefect's print-to-log on, the listing would flood the run's logs.
@task(name="train", cache_policy=NO_CACHE, log_prints=False)
def train_task(config: dict, run_id: str, round_: int, pairs: str, prompts: list[str],
               policy: str, previous_pairs: str | None, base: str) -> str:
    return pipeline.train(_ctx(config, run_id), round_, pairs, prompts, policy,
                          previous_pairs=previous_pairs, base=base)


@task(name="eval", cache_policy=NO_CACHE)
def eval_task(config: dict, run_id: str, round_: int, model: str, baseline: str | None,
              baseline_eval: str | None) -> str:
    return pipeline.evaluate(_ctx(config, run_id), round_, model, baseline, baseline_eval)


@task(name="gate", cache_policy=NO_CACHE)
def gate_task(config: dict, run_id: str, round_: int, model: str, ev: str, policy: str,
              policy_eval: str, previous_gate: str | None) -> str:
    return pipeline.gate(_ctx(config, run_id), round_, model, ev, policy, policy_eval,
                         previous_gate)


@task(name="round-0", cache_policy=NO_CACHE)
def round_zero_task(config: dict, run_id: str) -> tuple[str, str, str]:
    return pipeline.round_zero(_ctx(config, run_id))


@flow(name="flywheel-round", log_prints=True)
def round_flow(config: dict, run_id: str, round_: int, pool: list[str], policy: str,
               policy_eval: str, base: str, previous_pairs: str | None = None,
               previous_gate: str | None = None) -> dict:
    """One round: prompts -> samples -> judgments -> pairs -> train -> eval -> gate."""
    interrupt.reclaim()
    ctx = _ctx(config, run_id)
    made = ctx.made
    new = prompts_task(config, run_id, round_, pool, policy)
    prompts = [*pool, new]
    samples = samples_task(config, run_id, round_, new, pool, policy)
    judgments = judgments_task(config, run_id, round_, samples, prompts, policy)
    pairs = pairs_task(config, run_id, round_, judgments, samples, prompts)
    model = train_task(config, run_id, round_, pairs, prompts, policy, previous_pairs, base)
    ev = eval_task(config, run_id, round_, model, policy, policy_eval)
    gate = gate_task(config, run_id, round_, model, ev, policy, policy_eval, previous_gate)
    res = pipeline.finish_round(ctx, pipeline.RoundResult(
        round_, new, samples, judgments, pairs, model, ev, gate, new=ctx.made > made))
    rows = report.summary_rows(ctx.catalog, last_eval=ev)
    create_markdown_artifact(key=f"flywheel-round-{round_}",
                             markdown=f"# flywheel round {round_}\n\n" + report.markdown(rows),
                             description=f"round {round_} summary")
    return vars(res)


@flow(name="flywheel-iterate", log_prints=True)
def iterate_flow(config: dict, rounds: int = 3, run_id: str | None = None,
                 command: str = "flywheel iterate", continue_rounds: bool = False) -> list[dict]:
    """Rounds 1..`rounds`, each starting from the last promoted model. With `continue_rounds`,
    `rounds` more rounds after those the catalog holds (what a scheduled deployment runs)."""
    interrupt.reclaim()
    results = []
    with pipeline.running(config_from_dict(config), run_id, command) as ctx, \
            pipeline.resumable(rounds, continue_rounds) as loop_at:
        seeds, base, base_eval = round_zero_task(config, ctx.run_id)
        loop = loop_at(pipeline.start_loop(ctx, seeds, base, base_eval))
        while loop.wants(rounds, continue_rounds):
            res = round_flow(config, ctx.run_id, loop.round + 1, loop.pool, loop.policy,
                             loop.policy_eval, loop.base, loop.previous_pairs,
                             loop.previous_gate)
            loop.advance(pipeline.RoundResult(**res))
            results.append(res)
            report.print_table(report.summary_rows(ctx.catalog, last_eval=res["eval"]),
                               f"flywheel · round {res['round']}")
    return results
