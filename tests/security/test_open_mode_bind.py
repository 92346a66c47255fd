"""Row 5: open (key-less) mode listens on an explicit loopback address only: "" (which uvicorn binds to
every interface), 0.0.0.0, :: and public names are refused before anything listens."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.services import REPO, base_env, free_port


@pytest.mark.parametrize("host", ["", "0.0.0.0", "::", "[::]", "example.org", " "])
def test_open_mode_refuses_anything_but_loopback(host, tmp_path):
    for command in ("api", "up"):
        r = subprocess.run([sys.executable, "-m", "app.cli", command, "--host", host, "--port", str(free_port())],
                           cwd=REPO, env=base_env(ADAPTD_HOME=str(tmp_path)), capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0 and "refusing to listen" in r.stderr, (command, host, r.stderr[-500:])


def test_loopback_addresses_are_allowed():
    from app.auth import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("127.0.0.2")
    assert is_loopback("localhost")  # resolves to loopback only on this machine
    assert not any(is_loopback(h) for h in ("", "0.0.0.0", "::", "10.0.0.1", "2130706433", "example.org"))
