"""The package's import graph has no cycle and no import that points up the layers (scripts/import_graph.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycles_and_no_upward_imports():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py"), str(ROOT / "src"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "cycles:\n  none" in run.stdout and "upward imports:\n  none" in run.stdout
