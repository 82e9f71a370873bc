"""Run launch/run.py's main() on the tiny random model and the toy task (see test_faults).

    python tests/fault_run.py OUT [launch/run.py arguments ...]

The run: configs/tiny.yaml with tiny-random-llama, the toy task `even_length` (12 training,
6 test examples) and the hinted scheme `pps` (about half the draws accepted, so every round
trains and the weights change), 2 iterations, and the optimizer state carried from round to
round (fem resets it by default), so that checkpoints hold it and a resume must restore it;
extra arguments (`--set k=v`, `--mesh`, ...) follow these and win. The model and the XLA
compilation cache live in $FEM_JAX_CACHE.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's fem_jax, whatever is installed

from launch_cli import load  # noqa: E402
from toy_tasks import register  # noqa: E402

BASE = ["--config", str(HERE.parent / "configs" / "tiny.yaml"), "--set", "model.path=tiny-random-llama",
        "--set", "task.name=even_length", "--set", "task.options={n_train: 12, n_test: 6}",
        "--set", "estep.scheme=pps", "--set", "run.iterations=2", "--set", "mstep.reset_optimizer=false"]

if __name__ == "__main__":
    register()
    cli = load()
    sys.exit(cli.main(BASE + ["--out", sys.argv[1]] + sys.argv[2:]))
