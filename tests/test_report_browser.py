"""The report in a real browser: headless Chromium (Debian's `chromium`; `.ci/run` installs
it) opens `flywheel report`'s page from disk through the DevTools protocol; every figure must
load (natural width > 0) and the console must stay empty (no error, warning, exception or
failed request). Skipped only where chromium is missing outside CI (CI=true: it must run)."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from tests.chromium import Chromium, chromium_binary
from tests.conftest import run_cli
from tests.test_report_html import synthetic_catalog

if chromium_binary() is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI=true but no chromium on PATH: .ci/run installs it "
                           "(apt-get install chromium)")
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs "
                "it, and under CI=true this test must run)", allow_module_level=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    ws = tmp_path_factory.mktemp("browser-ws")
    db = synthetic_catalog(ws / "flywheel.duckdb")
    out = ws / "report"
    proc = run_cli("report", "--catalog", str(db), "-o", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out / "index.html"


def test_every_figure_loads_and_the_console_is_empty(report):
    with Chromium() as browser:
        page = browser.open(report)
    assert page.title == "flywheel report · flywheel.duckdb"
    srcs = re.findall(r'<img src="([^"]+)"', report.read_text())
    assert [i["src"] for i in page.images] == srcs and len(srcs) == 10
    assert [i["src"] for i in page.images if not (i["complete"] and i["naturalWidth"] > 0)] \
        == []
    assert page.console == []


def test_a_missing_figure_is_seen(report, tmp_path):
    """The check itself: a page whose figure file is gone shows a broken image and a failed
    request in the console."""
    broken = tmp_path / "r"
    shutil.copytree(report.parent, broken)
    (broken / "03-win-rate.png").unlink()
    with Chromium() as browser:
        page = browser.open(broken / "index.html")
    assert [i["src"] for i in page.images if i["naturalWidth"] == 0] == ["03-win-rate.png"]
    assert any("03-win-rate.png" in m or "ERR_FILE_NOT_FOUND" in m for m in page.console)
