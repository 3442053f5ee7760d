"""requirements.lock is what `make setup` installs: the environment the tests run in (made by
`make setup`) holds exactly the locked distributions at the locked versions, and the Makefile
installs through the lock."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
#: The installer's own tools and the project itself, never locked.
UNLOCKED = {"pip", "setuptools", "wheel", "flywheel"}


def locked() -> dict[str, Version]:
    pins = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"requirements.lock line {number}: {line!r} is not NAME==VERSION"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def installed() -> dict[str, Version]:
    return {canonicalize_name(d.metadata["Name"]): Version(d.version)
            for d in importlib.metadata.distributions()
            if canonicalize_name(d.metadata["Name"]) not in UNLOCKED}


def test_the_environment_is_exactly_the_lock():
    pins, have = locked(), installed()
    # torch's CPU build carries a local version (2.13.0+cpu): the lock pins its public one
    wrong = {n: (str(have[n]), str(v)) for n, v in pins.items()
             if n in have and Version(have[n].public) != v}
    assert wrong == {}, f"installed (left) differs from requirements.lock (right): {wrong}"
    assert sorted(set(pins) - set(have)) == [], "locked but not installed"
    assert sorted(set(have) - set(pins)) == [], "installed but not locked: run `make lock`"


def test_every_declared_dependency_is_locked():
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    declared = [Requirement(m) for m in re.findall(r'^\s*"([^"]+)"', block, re.M)]
    pins = locked()
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {req}"


def test_make_setup_installs_through_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    joined = makefile.replace("\\\n", " ")  # continuation lines as one
    installs = [line for line in joined.splitlines()
                if "pip install" in line and '-e ".[dev' in line and "lock-venv" not in line]
    assert len(installs) == 2 and all("-c requirements.lock" in line for line in installs), \
        installs
    assert "$(VENV)/.installed: pyproject.toml requirements.lock" in makefile
