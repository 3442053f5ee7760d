"""The request cache: a SQLite file of responses by request hash."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flywheel.backends.cache import RequestCache
from flywheel.errors import FlywheelError

BODY = {"model": "judge", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


def test_key_depends_on_route_body_and_identity_only():
    k = RequestCache.key("chat.completions", BODY, "abc")
    assert len(k) == 64 and int(k, 16) >= 0
    # key order in the body does not matter; every field's value does
    assert RequestCache.key("chat.completions", dict(reversed(BODY.items())), "abc") == k
    assert RequestCache.key("chat.completions", {**BODY, "max_tokens": 9}, "abc") != k
    assert RequestCache.key("completions", BODY, "abc") != k
    assert RequestCache.key("chat.completions", BODY, "abd") != k


def test_nothing_created_before_the_first_put(tmp_path):
    path = tmp_path / "ws" / ".flywheel" / "requests.sqlite3"
    cache = RequestCache(path)
    assert cache.get("k") is None
    assert cache.stats() == (0, 0)
    assert cache.clear() == 0
    assert not (tmp_path / "ws").exists()
    cache.put("k", {"id": "x", "choices": [{"text": "é"}]})
    assert path.is_file()
    assert cache.get("k") == {"id": "x", "choices": [{"text": "é"}]}


def test_put_get_stats_clear(tmp_path):
    path = tmp_path / "requests.sqlite3"
    cache = RequestCache(path)
    for i in range(3):
        cache.put(f"k{i}", {"i": i})
    cache.put("k1", {"i": 10})  # a key stored again replaces its response
    entries, size = cache.stats()
    assert entries == 3 and size > 0
    assert [cache.get(f"k{i}") for i in range(3)] == [{"i": 0}, {"i": 10}, {"i": 2}]
    assert cache.get("missing") is None
    other = tmp_path / "other.txt"
    other.write_text("kept")
    assert cache.clear() == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]
    assert cache.stats() == (0, 0) and cache.get("k0") is None


def test_survives_reopen_and_a_killed_writer(tmp_path):
    path = tmp_path / "c" / "requests.sqlite3"
    RequestCache(path).put("a", {"v": 1})
    # a process killed right after its put: the response is committed already
    code = (f"import os; from flywheel.backends.cache import RequestCache; "
            f"RequestCache({str(path)!r}).put('b', {{'v': 2}}); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd(), timeout=60)
    assert proc.returncode == -9
    cache = RequestCache(path)
    assert cache.get("a") == {"v": 1} and cache.get("b") == {"v": 2}
    assert cache.stats()[0] == 2


def test_corrupt_file_names_it_and_the_fix(tmp_path):
    path = tmp_path / "requests.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    cache = RequestCache(path)
    with pytest.raises(FlywheelError) as err:
        cache.get("k")
    msg = str(err.value)
    assert f"request cache {path} is unreadable" in msg
    assert "flywheel cache clear" in msg
    with pytest.raises(FlywheelError, match="flywheel cache clear"):
        cache.put("k", {"v": 1})
    assert cache.clear() == 0
    assert not path.exists()
    cache.put("k", {"v": 1})  # cleared: usable again
    assert cache.get("k") == {"v": 1}
