"""CLI command: deploy (registered into `flywheel`'s parser by flywheel.cli).

`flywheel deploy` turns `flywheel iterate --rounds N --continue` into a Prefect deployment of
the `flywheel-iterate` flow (flows/iterate.py) with a schedule: each run adds N rounds to the
same workspace, found through the catalog, so rounds keep counting from one run to the next.

- no `--pool`: `iterate_flow.serve(...)`, a long-running process that creates the deployment
  and runs its scheduled runs itself, each in a subprocess;
- `--pool NAME`: `iterate_flow.from_source(<project root>, "flows/iterate.py:iterate_flow")
  .deploy(...)` registers a work-pool deployment and returns; a worker (`prefect worker start
  --pool NAME`, on a machine that sees the project directory) runs the runs.

Both need a Prefect server (`PREFECT_API_URL`): Prefect's temporary server refuses schedules.
Every run executes in the project root (serve: this process changes to it before serving; a
work pool: the deployment's pull step sets it), and every relative path of the config that
would resolve differently from there is made absolute (see `pin_paths`).

Prefect is imported inside the command only, so `flywheel --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flywheel.errors import FlywheelError

#: The project root: where flows/iterate.py lives and where every deployed run executes.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/iterate.py:iterate_flow"
FLOW_NAME = "flywheel-iterate"
DEFAULT_NAME = "scheduled"

#: The config settings that are file-system paths (dotted keys). Templates
#: (prompts.template, judge.*_template) are not: they are file names, looked up in prompts/
#: of the directory the run executes in (PROJECT_ROOT for a deployed run), then among the
#: templates shipped with the package (flywheel.templates).
PATH_KEYS = ("workspace", "catalog", "models.policy.path", "models.judge.path",
             "models.generator.path", "models.judge.tokenizer", "models.generator.tokenizer",
             "prompts.seed_file", "eval.prompts_file", "judge.canary_file", "report.dir")
#: Of those, the model directories are rewritten only when they exist locally (a model name
#: that is not a local path is left as it is).
MODEL_KEYS = ("models.policy.path", "models.judge.path", "models.generator.path",
              "models.judge.tokenizer", "models.generator.tokenizer")

SERVER_HINT = ["start one: `prefect server start` (keep it running: `nohup prefect server "
               "start &`, or a systemd unit; UI at http://127.0.0.1:4200)",
               "and point flywheel at it: `prefect config set "
               "PREFECT_API_URL=http://127.0.0.1:4200/api` (or export PREFECT_API_URL)",
               "schedules do not run on Prefect's temporary server, which flywheel iterate "
               "starts when PREFECT_API_URL is unset"]

EPILOG = """examples:
  flywheel deploy --cron "0 2 * * *" --config configs/demo.yaml
      serve: one more round every night at 02:00 (UTC); keep this process running
  flywheel deploy --interval 21600 --rounds 2 --name every-6h --set sampling.n=8
      serve: two more rounds every 6 hours
  flywheel deploy --cron "0 2 * * *" --pool gpu --config configs/self_rewarding.yaml
      a work-pool deployment (returns at once); a GPU machine runs
      `prefect worker start --pool gpu`
  prefect deployment run 'flywheel-iterate/scheduled'
      trigger a run now, outside the schedule

Each run is `flywheel iterate --rounds N --continue` on the same workspace: the rounds the
catalog holds are reused, N more are added. A run that starts while another one holds the
workspace stops at once with the holder's name (the workspace lock).
"""


def register(sub: argparse._SubParsersAction) -> dict:
    """Add this module's subcommands to `sub`; return {command name: function(args) -> int}."""
    de = sub.add_parser(
        "deploy", help="schedule `iterate --continue` as a Prefect deployment (serve or pool)",
        description="Create a Prefect deployment of the flywheel-iterate flow whose every run "
                    "adds --rounds rounds to the same workspace (`flywheel iterate --rounds N "
                    "--continue`). Without --pool this process serves the deployment: it "
                    "stays up and runs each scheduled run in a subprocess (run it under "
                    "systemd or tmux). With --pool it registers a work-pool deployment and "
                    "returns; a worker runs the runs. Needs a Prefect server "
                    "(PREFECT_API_URL). The config is checked first, and its relative paths "
                    "are pinned so runs do not depend on any working directory.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    when = de.add_mutually_exclusive_group()
    when.add_argument("--cron", metavar="EXPR",
                      help='cron schedule, e.g. "0 2 * * *" (02:00 every day)')
    when.add_argument("--interval", type=float, metavar="SECONDS",
                      help="run every SECONDS seconds")
    de.add_argument("--timezone", metavar="TZ",
                    help="time zone of --cron / the --interval anchor, e.g. Europe/Berlin "
                         "(default UTC)")
    de.add_argument("--rounds", type=int, default=1,
                    help="rounds each run adds (default 1)")
    de.add_argument("--config", "-c", help="YAML config (a diff against the defaults)")
    de.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE",
                    help="override one setting, e.g. --set sampling.n=8 (repeatable)")
    de.add_argument("--name", default=DEFAULT_NAME,
                    help=f"deployment name (default {DEFAULT_NAME!r}: "
                         f"{FLOW_NAME}/{DEFAULT_NAME})")
    de.add_argument("--pool", metavar="NAME",
                    help="create a deployment on this work pool instead of serving it here "
                         "(the pool is created, type process, if it does not exist)")
    de.add_argument("--paused", action="store_true",
                    help="create the deployment with its schedule paused")
    return {"deploy": cmd_deploy}


# -- paths --------------------------------------------------------------------------------------
def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d[part]
    d[last] = value


def pin_paths(config: dict, cwd: str | Path | None = None,
              root: str | Path = PROJECT_ROOT) -> tuple[dict, list[str]]:
    """The config (a `Config.to_dict()`) with its paths pinned for runs that execute in
    `root`: a relative path given from `cwd` is made absolute, unless it already names the
    same file from `root` (then it is kept exactly as given, because paths are part of stage
    fingerprints: `data/seed_prompts.jsonl` stays what `flywheel iterate` run from the project
    root recorded). Absolute paths and empty settings stay; a model setting that is not an
    existing local path stays. Returns (new config, ["key: old -> new", ...])."""
    import copy

    cwd, root = Path(cwd or os.getcwd()).resolve(), Path(root).resolve()
    out, changes = copy.deepcopy(config), []
    for key in PATH_KEYS:
        value = _get(out, key)
        if not value:
            continue
        path = Path(value).expanduser()
        here = path if path.is_absolute() else (cwd / path).resolve()
        if key in MODEL_KEYS and not here.exists():
            continue  # not a local path: left to whatever reads it
        if not path.is_absolute() and (root / path).resolve() == here:
            continue  # names the same file from the project root: kept as given
        if str(here) != value:
            _set(out, key, str(here))
            changes.append(f"{key}: {value} -> {here}")
    return out, changes


# -- the command --------------------------------------------------------------------------------
def api_url() -> str | None:
    """The Prefect API the deployment goes to: PREFECT_API_URL from the environment or the
    active Prefect profile (`prefect config set`)."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def require_server() -> str:
    """PREFECT_API_URL, checked to be set and to answer; FlywheelError with the fix if not."""
    url = api_url()
    if not url:
        raise FlywheelError("flywheel deploy needs a Prefect server, and PREFECT_API_URL is not "
                            "set", details=SERVER_HINT)
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise FlywheelError(f"no Prefect server answers at PREFECT_API_URL={url} ({exc})",
                            details=SERVER_HINT) from exc
    return url


def _schedule(args):
    """A prefect.schedules.Cron / Interval from --cron / --interval (+ --timezone), or None."""
    from prefect.schedules import Cron, Interval

    if args.timezone:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(args.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise FlywheelError(f"--timezone {args.timezone!r}: not a known time zone (an "
                                "IANA name such as Europe/Berlin or UTC)") from exc
    if args.cron:
        try:
            return Cron(args.cron, timezone=args.timezone or "UTC")
        except Exception as exc:
            raise FlywheelError(f"--cron {args.cron!r}: not a valid cron expression ({exc})",
                                details=['five fields: minute hour day month weekday, e.g. '
                                         '"0 2 * * *" for 02:00 every day']) from exc
    if args.interval is not None:
        if args.interval <= 0:
            raise FlywheelError(f"--interval {args.interval:g}: give a positive number of "
                                "seconds")
        return Interval(args.interval, timezone=args.timezone or "UTC")
    if args.timezone:
        raise FlywheelError("--timezone needs --cron or --interval")
    return None


def _describe(args) -> str:
    if args.cron:
        return f"cron {args.cron!r} ({args.timezone or 'UTC'})"
    if args.interval is not None:
        return f"every {args.interval:g} s"
    return "no schedule (runs only when triggered)"


def _command(args) -> str:
    """What the runs record in the catalog as their command."""
    return f"flywheel iterate --rounds {args.rounds} --continue (deployment " \
           f"{FLOW_NAME}/{args.name})"


def cmd_deploy(args) -> int:
    from flywheel import pipeline
    from flywheel.config import config_from_dict, load_config

    if args.rounds < 1:
        raise FlywheelError(f"--rounds {args.rounds}: give at least 1 round")
    cfg = load_config(args.config, args.overrides)
    pipeline.preflight(cfg)  # bad input fails here, not in the first scheduled run at 2 a.m.
    config, changes = pin_paths(cfg.to_dict())
    config_from_dict(config)  # still a valid config
    schedule = _schedule(args)
    url = require_server()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parameters = {"config": config, "rounds": args.rounds, "continue_rounds": True,
                  "command": _command(args)}
    for change in changes:
        print(f"path pinned: {change}", file=sys.stderr)
    workspace = Path(PROJECT_ROOT, config["workspace"])
    print(f"deployment {FLOW_NAME}/{args.name}: {_describe(args)}; each run adds "
          f"{args.rounds} round{'s' if args.rounds > 1 else ''} to workspace {workspace} "
          f"(Prefect API {url})", file=sys.stderr)
    if args.pool:
        return _deploy_to_pool(args, parameters, schedule)
    return _serve(args, parameters, schedule)


def _serve(args, parameters: dict, schedule) -> int:
    # runs execute in subprocesses that inherit this working directory: the project root, so
    # the entrypoint is flows/iterate.py and relative paths mean what they meant there
    os.chdir(PROJECT_ROOT)
    from flows.iterate import iterate_flow

    print("serving: this process runs the scheduled runs; keep it running (systemd, tmux); "
          "Ctrl-C stops it and pauses the schedule", file=sys.stderr)
    sys.stderr.flush()
    try:
        iterate_flow.serve(name=args.name, schedules=[schedule] if schedule else None,
                           parameters=parameters, paused=args.paused or None, limit=1,
                           description=f"flywheel iterate --rounds {args.rounds} --continue, "
                                       "scheduled (flywheel deploy)",
                           tags=["flywheel"])
    finally:
        _pause(args.name)
    return 0


def _pause(name: str) -> None:
    """Pause the served deployment's schedule once this process stops (Prefect's own
    pause-on-shutdown does not finish on SIGTERM in 3.8), so no runs pile up unserved;
    starting `flywheel deploy` again resumes it. Best effort."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.pause_deployment(client.read_deployment_by_name(f"{FLOW_NAME}/{name}").id)
        print(f"stopped serving; the schedule of {FLOW_NAME}/{name} is paused until "
              "`flywheel deploy` runs again", file=sys.stderr)
    except Exception as exc:  # the server may be gone too
        print(f"stopped serving; could not pause {FLOW_NAME}/{name}: {exc}", file=sys.stderr)


def ensure_pool(name: str) -> bool:
    """Create work pool `name` (type process) if it does not exist; True if it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True


def _deploy_to_pool(args, parameters: dict, schedule) -> int:
    from prefect import flow

    if ensure_pool(args.pool):
        print(f"created work pool {args.pool!r} (type process); to use another type create "
              f"it first: prefect work-pool create {args.pool} --type TYPE", file=sys.stderr)
    remote = flow.from_source(source=str(PROJECT_ROOT), entrypoint=ENTRYPOINT)
    deployment_id = remote.deploy(
        name=args.name, work_pool_name=args.pool, build=False, push=False,
        schedules=[schedule] if schedule else None, paused=args.paused or None,
        parameters=parameters, print_next_steps=False, ignore_warnings=True,
        description=f"flywheel iterate --rounds {args.rounds} --continue, scheduled "
                    "(flywheel deploy --pool)", tags=["flywheel"])
    print(f"created deployment {FLOW_NAME}/{args.name} (id {deployment_id}) on work pool "
          f"{args.pool!r}: {_describe(args)}; runs execute in {PROJECT_ROOT}")
    print("run the runs on a machine that sees that directory, with this project's "
          "environment active:")
    print(f"  prefect worker start --pool {args.pool}")
    print("trigger one now / watch them:")
    print(f"  prefect deployment run '{FLOW_NAME}/{args.name}'")
    print("  prefect flow-run ls")
    return 0
