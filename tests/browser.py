"""Headless Chromium for the report tests: Debian's chromium package, installed here when it
is missing and this machine may install it (root with apt-get), else the test is skipped
with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # no network here: without these Chromium keeps trying to reach Google's hosts
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def find_chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("headless Chromium is not installed and this user cannot apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    r = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:  # a fresh machine may not have the package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=900)
        r = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    found = shutil.which("chromium")
    if not found:
        pytest.skip(f"apt-get install chromium failed: {r.stderr.strip().splitlines()[-1:]}")
    return found


class Chromium:
    def __init__(self, exe: str):
        self.exe = exe

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as profile:
            return subprocess.run(
                [self.exe, *FLAGS, f"--user-data-dir={profile}", *args],
                capture_output=True,
                text=True,
                timeout=180,
            )

    def screenshot(self, page: Path, out: Path, width: int = 1280, height: int = 3000) -> Path:
        r = self._run(f"--window-size={width},{height}", f"--screenshot={out}", page.resolve().as_uri())
        assert out.is_file(), f"chromium wrote no screenshot: {r.stderr[-2000:]}"
        return out

    def dom(self, page: Path) -> str:
        """The page's DOM after Chromium parsed and laid it out."""
        r = self._run("--dump-dom", page.resolve().as_uri())
        assert r.returncode == 0 and "<html" in r.stdout, r.stderr[-2000:]
        return r.stdout


@pytest.fixture(scope="session")
def chromium() -> Chromium:
    return Chromium(find_chromium())
