"""launch/run.py loaded as a module (it is a script, not part of the package), for the tests
and test scripts that call its main() in this process."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load():
    spec = importlib.util.spec_from_file_location("run_cli", Path(__file__).resolve().parents[1] / "launch" / "run.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli
