"""An offline wheelhouse: wheels for everything flywheel needs beyond a target machine's base
environment, for a GPU machine without a package index (`make wheelhouse`).

    python tools/wheelhouse.py --base BASE.txt [--out wheelhouse] [--platform TAG]
                               [--python X.Y] [--extras dev] [--dry-run]

BASE.txt is the target machine's `python -m pip list --format=freeze` (or `pip freeze`). pip
does all the resolving:

1. `pip wheel --no-deps` builds the project's own wheel into the wheelhouse.
2. `pip install --dry-run --ignore-installed --report` resolves that wheel with its extras for
   the target (`--only-binary=:all: --platform ... --python-version ... --implementation cp`)
   from scratch, as if nothing were installed.
3. The base is subtracted: walking the resolved requirements from flywheel down, a dependency
   the base already has at a version every requirement on it accepts is kept from the base (and
   not walked further: what it needs is the base's own business); every other one is
   downloaded. So a base torch that satisfies `torch>=2.4` keeps its CUDA build, and none of
   the resolved torch's nvidia-* wheels are fetched.
4. `pip download --no-deps --only-binary=:all:` fetches exactly those versions for the target
   platform.

It writes `requirements.txt` (what was downloaded, pinned) and `wheelhouse.json` (downloaded,
kept from the base, and base packages replaced because a requirement rejects their version) and
prints the same summary. On the target: `pip install --no-index --find-links wheelhouse
'flywheel[dev]'`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"
DEFAULT_EXTRAS = ("dev",)
#: pip names manylinux tags by glibc version; the legacy names of the same tags.
_LEGACY = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
_MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_(\w+)")
ABSENT = object()


class WheelhouseError(Exception):
    """A bad input or a failed pip step, with what to do."""


# -- inputs -----------------------------------------------------------------------------------
def parse_freeze(text: str, source: str = "BASE") -> dict[str, str | None]:
    """{canonical name: version} from `pip freeze` / `pip list --format=freeze` lines. A line
    `name @ url` (pip freeze of a package installed from a file) has no version: None. Editable
    lines, options and comments are skipped; anything else unreadable is an error naming the
    line."""
    out: dict[str, str | None] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        if " @ " in line:
            out[canonicalize_name(line.split(" @ ", 1)[0].strip())] = None
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise WheelhouseError(
                f"{source} line {number}: {raw.strip()!r} is not `name==version`; make the "
                "file on the target machine with `python -m pip list --format=freeze > "
                "base.txt`")
        out[canonicalize_name(name.strip())] = version.strip()
    return out


def platform_tags(platform: str) -> list[str]:
    """pip's `--platform` takes exact tags: a manylinux_2_N_arch tag is expanded to every
    older glibc tag it runs (down to 2.5), with the legacy names, as pip does for the machine
    it runs on. Other tags are kept as given."""
    tags: list[str] = []
    for tag in platform.split(","):
        tag = tag.strip()
        match = _MANYLINUX.fullmatch(tag)
        if not match or int(match.group(1)) != 2:
            tags.append(tag)
            continue
        arch = match.group(3)
        for minor in range(int(match.group(2)), 4, -1):
            tags.append(f"manylinux_2_{minor}_{arch}")
            if minor in _LEGACY:
                tags.append(f"{_LEGACY[minor]}_{arch}")
    return list(dict.fromkeys(tags))


def target_args(platform: str, python: str) -> list[str]:
    """pip's options that select wheels for the target machine instead of this one."""
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for tag in platform_tags(platform):
        args += ["--platform", tag]
    return args


# -- the plan ---------------------------------------------------------------------------------
@dataclass
class Plan:
    """What the wheelhouse holds, and why the rest is left out."""

    download: dict[str, str] = field(default_factory=dict)  # name -> version (resolved)
    kept: dict[str, str | None] = field(default_factory=dict)  # name -> base version
    replaced: dict[str, dict] = field(default_factory=dict)  # name -> base, version, wanted
    names: dict[str, str] = field(default_factory=dict)  # canonical -> the project's spelling


def plan(report: dict, base: dict[str, str | None], python: str | None = None) -> Plan:
    """Subtract the base from pip's resolution `report` (`pip install --report` JSON).

    Walk from the requested package (with its requested extras): each requirement whose marker
    holds for the target is met by the base when the base has the package at a version its
    specifier accepts (pre-releases and local versions count: `2.6.0a0+git` satisfies
    `>=2.4`), else it is downloaded at the resolved version and walked in turn. A package the
    base has at a version some requirement rejects is downloaded and listed as replaced."""
    items = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    env = dict(report.get("environment") or default_environment())
    if python:
        env["python_version"] = python
        env["python_full_version"] = python if python.count(".") > 1 else python + ".0"
    roots = [(n, tuple(i.get("requested_extras") or ())) for n, i in items.items()
             if i.get("requested")]
    if not roots:
        raise WheelhouseError("pip's report names no requested package")
    result = Plan(names={n: i["metadata"]["name"] for n, i in items.items()})
    wanted: dict[str, list[str]] = {}  # name -> specifiers that asked for it (for messages)
    queue = [*((n, ()) for n, _ in roots), *(r for r in roots if r[1])]
    walked: set[tuple[str, tuple]] = set()
    for name, _ in roots:
        result.download[name] = items[name]["metadata"]["version"]
    while queue:
        name, extras = queue.pop()
        if (name, extras) in walked:
            continue
        walked.add((name, extras))
        for req in _requirements(items[name], extras, env):
            dep = canonicalize_name(req.name)
            if dep not in items:  # pip resolved without it (its marker differs): nothing to do
                continue
            wanted.setdefault(dep, []).append(f"{req.specifier or 'any'} (by {name})")
            have = base[dep] if dep in base else ABSENT
            if dep not in result.download and have is not ABSENT and _accepts(req, have):
                result.kept.setdefault(dep, have)
                if req.extras:  # the base has it; its extras' dependencies may still be needed
                    queue.append((dep, tuple(sorted(req.extras))))
                continue
            if dep not in result.download:
                result.download[dep] = items[dep]["metadata"]["version"]
                queue.append((dep, ()))
            if have is not ABSENT:  # in the base, at a version some requirement rejects
                result.kept.pop(dep, None)
                result.replaced[dep] = {"base": have, "version": result.download[dep],
                                        "wanted": wanted[dep]}
            if req.extras:
                queue.append((dep, tuple(sorted(req.extras))))
    return result


def _requirements(item: dict, extras: tuple, env: dict) -> list[Requirement]:
    out = []
    for text in item["metadata"].get("requires_dist") or []:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is None:
            if not extras:
                out.append(req)
            continue
        if any(req.marker.evaluate({**env, "extra": e}) for e in extras) or (
                not extras and req.marker.evaluate({**env, "extra": ""})):
            out.append(req)
    return out


def _accepts(req: Requirement, version: str | None) -> bool:
    """Whether the base's `version` meets `req` (None: installed from a file, version unknown:
    trusted only when nothing in particular is asked)."""
    if version is None:
        return not str(req.specifier)
    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    return req.specifier.contains(parsed, prereleases=True) or req.specifier.contains(
        Version(parsed.public), prereleases=True)


# -- pip --------------------------------------------------------------------------------------
def commands(*, python_exe: str, project_wheel: str, extras: tuple[str, ...], report: str,
             out: str, platform: str, python: str) -> dict[str, list[str]]:
    """The three pip commands (download's requirement list is appended when the plan is
    known)."""
    spec = project_wheel + (f"[{','.join(extras)}]" if extras else "")
    pip = [python_exe, "-m", "pip"]
    return {
        "build": [*pip, "wheel", "--no-deps", "-w", out, str(ROOT)],
        "resolve": [*pip, "install", "--dry-run", "--ignore-installed", "--quiet",
                    "--report", report, *target_args(platform, python), spec],
        "download": [*pip, "download", "--no-deps", "--dest", out,
                     *target_args(platform, python)],
    }


def _run(cmd: list[str], what: str) -> None:
    print("+ " + " ".join(cmd[:6]) + (" ..." if len(cmd) > 6 else ""), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(line for line in (done.stderr or done.stdout).splitlines()[-25:]
                         if "is ignored: it is neither a file nor a directory" not in line)
        raise WheelhouseError(f"{what} failed (pip exit {done.returncode}):\n{tail}")


def build(args) -> Plan:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = parse_freeze(Path(args.base).read_text(), args.base) if args.base else {}
    extras = tuple(e for e in args.extras.split(",") if e)
    with tempfile.TemporaryDirectory(prefix="flywheel-wheelhouse-") as tmp:
        report_path = Path(tmp) / "report.json"
        cmds = commands(python_exe=sys.executable, project_wheel="PLACEHOLDER", extras=extras,
                        report=str(report_path), out=str(out), platform=args.platform,
                        python=args.python)
        _run(cmds["build"], "building flywheel's wheel")
        wheels = sorted(out.glob("flywheel-*.whl"), key=lambda p: p.stat().st_mtime)
        if not wheels:
            raise WheelhouseError(f"pip wheel made no flywheel-*.whl in {out}")
        cmds = commands(python_exe=sys.executable, project_wheel=str(wheels[-1]), extras=extras,
                        report=str(report_path), out=str(out), platform=args.platform,
                        python=args.python)
        _run(cmds["resolve"], "resolving flywheel's dependencies for the target")
        report = json.loads(report_path.read_text())
    result = plan(report, base, args.python)
    pins = [f"{result.names[n]}=={v}" for n, v in sorted(result.download.items())
            if n != "flywheel"]
    (out / "requirements.txt").write_text("".join(p + "\n" for p in pins))
    (out / "wheelhouse.json").write_text(json.dumps({
        "platform": platform_tags(args.platform), "python": args.python, "extras": extras,
        "base": args.base, "download": result.download, "kept_from_base": result.kept,
        "replaced_in_base": result.replaced}, indent=2) + "\n")
    if not args.dry_run and pins:
        _run([*cmds["download"], *pins], "downloading the wheels")
    summary(result, out, args.dry_run)
    return result


def summary(result: Plan, out: Path, dry_run: bool) -> None:
    size = sum(p.stat().st_size for p in out.glob("*.whl")) / 1e6
    print(f"{len(result.download)} wheels {'to download' if dry_run else 'in ' + str(out)} "
          f"(flywheel's own included{'' if dry_run else f', {size:.0f} MB'}); "
          f"{len(result.kept)} packages kept from the base")
    for name, r in sorted(result.replaced.items()):
        print(f"  replaces the base's {name} {r['base']} with {r['version']}: wanted "
              + "; ".join(r["wanted"]))
    print(f"on the target: pip install --no-index --find-links {out.name} 'flywheel[dev]'")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wheelhouse.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="", help="the target's `pip list --format=freeze` "
                   "output; empty: nothing is subtracted")
    p.add_argument("--out", default="wheelhouse", help="the folder the wheels go to")
    p.add_argument("--platform", default=DEFAULT_PLATFORM, help="the target's platform tag "
                   "(older manylinux tags are added); several, comma-separated")
    p.add_argument("--python", default="{}.{}".format(*sys.version_info[:2]),
                   help="the target's Python version, X.Y (default: this Python's)")
    p.add_argument("--extras", default=",".join(DEFAULT_EXTRAS),
                   help="flywheel's extras to include, comma-separated")
    p.add_argument("--dry-run", action="store_true", help="resolve and write the plan; "
                   "download nothing but flywheel's own wheel")
    args = p.parse_args(argv)
    if args.base and not Path(args.base).exists():
        print(f"wheelhouse: BASE {args.base} does not exist: make it on the target machine "
              "with `python -m pip list --format=freeze > base.txt` and copy it here",
              file=sys.stderr)
        return 2
    try:
        build(args)
    except WheelhouseError as exc:
        print(f"wheelhouse: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
