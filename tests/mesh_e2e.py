"""Run launch/run.py's main() on a fake 8-device CPU with the toy task (see test_mesh_e2e).

    python tests/mesh_e2e.py OUT [MESH]
"""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from launch_cli import load  # noqa: E402
from toy_tasks import register  # noqa: E402

register()
cli = load()
out, mesh = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
args = ["--config", str(HERE.parent / "configs" / "tiny.yaml"), "--set", "task.name=even_length",
        "--set", "task.options={n_train: 16, n_test: 8}", "--out", out]
sys.exit(cli.main(args + (["--mesh", mesh] if mesh else [])))
