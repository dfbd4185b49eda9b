"""
The deployment guide walked on this machine: deploy/walkthrough.sh builds a
wheel, installs it into a fresh virtual environment, configures a node from
the shipped example, checks it, takes mail with the primary down and runs a
tenant cutover (hold, re-route, release) with its audit trail, all on
loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_walk_the_guide() -> None:
    """When deploy/walkthrough.sh follows the guide step by step, every step does what the guide says."""
    result = subprocess.run(
        ["bash", str(ROOT / "deploy" / "walkthrough.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "delivered to the new tenant" in result.stdout
    assert "walkthrough done" in result.stdout
