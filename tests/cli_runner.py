"""The CLI as a user runs it, for tests: a fresh process with its own embedded Ray."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "athanor.cluster.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
