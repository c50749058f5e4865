"""A baseline library's own virtualenv, built on first use and rebuilt when broken or stale.

Baselines (DataTrove, torchao, llm-compressor, ...) pin libraries athanor does not want, so each runs in a venv of
its own. A venv counts as ready only when the marker written after its last successful install names the same
installs: an interrupted build (no marker) or changed pins start again from an empty folder. Standard library only:
the baseline scripts that import this run inside those venvs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

MARKER = ".athanor-baseline.json"


def ensure_venv(venv: str | Path, installs: list[list[str]], python: str | None = None, quiet: bool = True) -> Path:
    """The venv's python, after `pip install` of each list in `installs` in order (e.g. torch first, so later
    packages resolve against the CPU build); reused as is when its marker names the same installs."""
    venv = Path(venv)
    py = venv / "bin" / "python"
    marker = venv / MARKER
    want = {"installs": installs}
    if marker.is_file() and py.exists():
        try:
            if json.loads(marker.read_text()).get("installs") == installs:
                return py
        except ValueError:
            pass
    if venv.exists():
        print(f"rebuilding {venv}: no marker of a finished install, or other pins", flush=True)
        shutil.rmtree(venv)
    else:
        print(f"creating {venv} ...", flush=True)
    # `python -m venv` with its bundled pip: `--without-pip` + ensurepip is not reliable across Python builds.
    subprocess.run([python or shutil.which("python3") or sys.executable, "-m", "venv", str(venv)], check=True)
    for packages in installs:
        subprocess.run([str(py), "-m", "pip", "install", *(["-q"] if quiet else []), *packages], check=True)
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], check=True, capture_output=True, text=True).stdout
    marker.write_text(json.dumps({**want, "freeze": freeze.splitlines()}, indent=1))
    return py
