"""The offline wheelhouse (tools/wheelhouse.py, `make wheelhouse`): reading the target's package
list, the platform tags, subtracting the base from pip's resolution, the pip commands, and a
real resolution and download of a small requirement for the target platform."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _tool():
    spec = importlib.util.spec_from_file_location("flywheel_wheelhouse",
                                                  ROOT / "tools" / "wheelhouse.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


wh = _tool()


def test_parse_freeze_reads_pins_file_installs_and_refuses_garbage():
    base = wh.parse_freeze("# comment\nTorch==2.5.1+cu124\nPyYAML==6.0.2  # pinned\n"
                           "numpy @ file:///feedstock/numpy-1.26.4.whl\n-e git+https://x/y#egg=z\n"
                           "\n--index-url https://example\n")
    assert base == {"torch": "2.5.1+cu124", "pyyaml": "6.0.2", "numpy": None}
    with pytest.raises(wh.WheelhouseError, match=r"base.txt line 2: 'torch>=2' is not "
                                                 r"`name==version`.*pip list --format=freeze"):
        wh.parse_freeze("rich==13.0\ntorch>=2\n", "base.txt")


def test_platform_tags_add_older_manylinux_and_legacy_names():
    tags = wh.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-1] == "manylinux1_x86_64"
    assert "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_29_x86_64" not in tags and len(tags) == 24 + 3
    assert wh.platform_tags("macosx_14_0_arm64,win_amd64") == ["macosx_14_0_arm64", "win_amd64"]


def _item(name, version, requires=(), requested=False, extras=()):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)},
            "requested": requested, "requested_extras": list(extras)}


REPORT = {
    "environment": {"python_version": "3.11", "python_full_version": "3.11.7",
                    "sys_platform": "linux", "platform_system": "Linux",
                    "platform_machine": "x86_64", "os_name": "posix",
                    "implementation_name": "cpython", "platform_python_implementation": "CPython",
                    "platform_release": "", "platform_version": "",
                    "implementation_version": "3.11.7"},
    "install": [
        _item("flywheel", "0.1.0", ["torch>=2.4", "transformers<6,>=5.20", "tqdm>=4.66",
                                    "sqlalchemy[asyncio]<2.1,>=2.0", "pytest>=8; extra == 'dev'",
                                    "colorama; platform_system == 'Windows'"],
              requested=True, extras=["dev"]),
        _item("torch", "2.13.0", ["nvidia-cublas==13.1; platform_system == 'Linux'",
                                  "sympy>=1.13"]),
        _item("nvidia-cublas", "13.1"), _item("sympy", "1.14.0"),
        _item("transformers", "5.24.0", ["tokenizers<0.24,>=0.23", "tqdm>=4.27"]),
        _item("tokenizers", "0.23.3"), _item("tqdm", "4.70.1"),
        _item("SQLAlchemy", "2.0.58", ["greenlet>=1; extra == 'asyncio'", "typing-extensions"]),
        _item("greenlet", "3.5.6"), _item("typing_extensions", "4.16.0"),
        _item("pytest", "9.2.0", ["pluggy>=1.5"]), _item("pluggy", "1.7.0"),
        _item("colorama", "0.4.6"),
    ],
}


def test_plan_keeps_what_the_base_satisfies_and_walks_only_what_is_downloaded():
    base = {"torch": "2.6.0a0+ecf3bae40a", "transformers": "4.46.3", "tqdm": "4.67.1",
            "sqlalchemy": "2.0.30", "tokenizers": "0.20.3"}
    plan = wh.plan(REPORT, base)
    # torch: an NGC-style local pre-release satisfies >=2.4, so neither it nor its CUDA wheels
    assert plan.kept == {"torch": "2.6.0a0+ecf3bae40a", "tqdm": "4.67.1",
                         "sqlalchemy": "2.0.30"}
    assert set(plan.download) == {"flywheel", "transformers", "tokenizers", "greenlet",
                                  "pytest", "pluggy"}
    assert plan.download["transformers"] == "5.24.0"
    # the base's old transformers and tokenizers are replaced, with who asked for what
    assert set(plan.replaced) == {"transformers", "tokenizers"}
    assert plan.replaced["transformers"]["base"] == "4.46.3"
    assert plan.replaced["tokenizers"]["wanted"] == ["<0.24,>=0.23 (by transformers)"]
    # sqlalchemy stays, but its asyncio extra needs greenlet; typing_extensions (its plain
    # dependency) is the base's business; colorama is for Windows only
    assert "typing-extensions" not in plan.download and "colorama" not in plan.download
    assert plan.names["sqlalchemy"] == "SQLAlchemy"


def test_plan_with_an_empty_base_downloads_the_whole_resolution_but_other_platforms_deps():
    plan = wh.plan(REPORT, {})
    assert plan.kept == {} and plan.replaced == {}
    assert set(plan.download) == {wh.canonicalize_name(i["metadata"]["name"])
                                  for i in REPORT["install"]} - {"colorama"}


def test_plan_replaces_a_file_installed_package_when_a_version_is_asked():
    plan = wh.plan(REPORT, {"tqdm": None, "torch": None})
    assert plan.replaced["tqdm"]["base"] is None and "tqdm" in plan.download
    assert "torch" in plan.download  # version unknown: `>=2.4` cannot be trusted


def test_commands_resolve_from_scratch_and_download_exact_wheels_for_the_target():
    cmds = wh.commands(python_exe="py", project_wheel="w/flywheel-0.1.0-py3-none-any.whl",
                       extras=("dev",), report="r.json", out="wh",
                       platform="manylinux_2_28_x86_64", python="3.12")
    resolve, download = cmds["resolve"], cmds["download"]
    assert resolve[:4] == ["py", "-m", "pip", "install"]
    assert {"--dry-run", "--ignore-installed", "--only-binary=:all:"} <= set(resolve)
    assert resolve[resolve.index("--report") + 1] == "r.json"
    assert resolve[resolve.index("--python-version") + 1] == "3.12"
    assert resolve[-1] == "w/flywheel-0.1.0-py3-none-any.whl[dev]"
    assert resolve.count("--platform") == 27
    assert download[3:6] == ["download", "--no-deps", "--dest"]
    assert cmds["build"][3:6] == ["wheel", "--no-deps", "-w"]


def test_a_missing_base_file_is_refused_with_how_to_make_it(tmp_path, capsys):
    assert wh.main(["--base", str(tmp_path / "nope.txt"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope.txt does not exist" in err and "pip list --format=freeze" in err


def test_real_pip_resolves_and_downloads_for_the_target_platform(tmp_path):
    """pip itself, for manylinux x86_64 / CPython 3.11: PyYAML's wheel is platform-specific."""
    report = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), *wh.target_args("manylinux_2_28_x86_64", "3.11"),
           "PyYAML==6.0.*", "tqdm>=4.66"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and "No matching distribution" not in done.stderr:
        pytest.skip(f"no package index reachable: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(report.read_text())
    names = {wh.canonicalize_name(i["metadata"]["name"]) for i in data["install"]}
    assert names == {"pyyaml", "tqdm"}
    yaml_url = next(i["download_info"]["url"] for i in data["install"]
                    if i["metadata"]["name"] == "PyYAML")
    assert "cp311-cp311-manylinux" in yaml_url
    out = tmp_path / "wh"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest",
                           str(out), *wh.target_args("manylinux_2_28_x86_64", "3.11"),
                           "PyYAML==" + next(i["metadata"]["version"] for i in data["install"]
                                             if i["metadata"]["name"] == "PyYAML")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = out.glob("*.whl")
    assert wheel.name.startswith("pyyaml-6.0") and "cp311" in wheel.name
