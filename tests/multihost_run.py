"""Run launch/run.py's main() on the tiny random model and the toy task (see test_multihost).

    python tests/multihost_run.py OUT [launch/run.py arguments ...]

One process of a run on several "hosts" (add --distributed --coordinator 127.0.0.1:PORT
--num-processes 2 --process-id I --cpu-devices 2), or the single-process reference on the
same global mesh (--cpu-devices 4). The run: configs/tiny.yaml with tiny-random-llama, the
toy task `even_length` (12 training, 6 test examples), the hinted scheme `pps` (about half
the draws accepted, so every round trains and the weights change), `--mesh data=2,fsdp=-1`,
3 iterations; extra arguments follow these and win. The model and the XLA compilation
cache live in $FEM_JAX_CACHE.

Test hooks, from the environment:
  FEM_JAX_TEST_LAG=S     hosts out of step, as on a cluster with a shared file system:
                         process 0 sleeps S seconds before each file it writes through
                         fem_jax.io's atomic writers, every other process before each listing
                         of the checkpoint steps. A decision that one process reads from the
                         run folder before process 0 has written it (or after process 0 has
                         deleted it) then goes wrong every time, not only by bad luck.
  FEM_JAX_TEST_WRITES=P  every path this process creates, opens for writing, renames, removes
                         or chmods under the run folder, outside checkpoints/ (which orbax
                         writes from every process), is appended to P.rank<process id>
                         (a Python audit hook: what C++ writes, such as TensorStore's
                         checkpoint chunks, is not seen).
"""

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from launch_cli import load  # noqa: E402
from toy_tasks import register  # noqa: E402

BASE = ["--config", str(HERE.parent / "configs" / "tiny.yaml"), "--set", "model.path=tiny-random-llama",
        "--set", "task.name=even_length", "--set", "task.options={n_train: 12, n_test: 6}",
        "--set", "estep.scheme=pps", "--set", "run.iterations=3", "--mesh", "data=2,fsdp=-1"]

WRITE_EVENTS = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.link",
                "os.symlink", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def lag(rank: int, seconds: float) -> None:
    from fem_jax import checkpoint, io

    if rank == 0:
        write = io.atomic_write_bytes

        def late_write(path, data):
            time.sleep(seconds)
            write(path, data)

        io.atomic_write_bytes = late_write  # atomic_write_text/_jsonl call it
    else:
        steps = checkpoint.Checkpointer._orbax_steps

        def late_steps(self):
            time.sleep(seconds)
            return steps(self)

        checkpoint.Checkpointer._orbax_steps = late_steps


def record_writes(out: str, record: str) -> None:
    root = os.path.abspath(out)
    skip = os.path.join(root, "checkpoints")
    f = open(record, "a", buffering=1)  # opened before the hook: its own writes are not events

    def paths(event, args):
        if event == "open":
            path, mode, flags = args
            writes = set(mode) & set("wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
            return [path] if writes else []
        return args[:2] if event in ("os.rename", "os.link", "os.symlink", "shutil.move", "shutil.copyfile") \
            else args[:1]

    def hook(event, args):
        if event not in WRITE_EVENTS:
            return
        for p in paths(event, args):
            if isinstance(p, (str, bytes, os.PathLike)):
                p = os.path.abspath(os.fsdecode(p))
                if (p == root or p.startswith(root + os.sep)) and not (p == skip or p.startswith(skip + os.sep)):
                    f.write(f"{event} {os.path.relpath(p, root)}\n")

    sys.addaudithook(hook)


if __name__ == "__main__":
    out, extra = sys.argv[1], sys.argv[2:]
    rank = int(extra[extra.index("--process-id") + 1]) if "--process-id" in extra else 0
    register()
    if os.environ.get("FEM_JAX_TEST_LAG"):
        lag(rank, float(os.environ["FEM_JAX_TEST_LAG"]))
    if os.environ.get("FEM_JAX_TEST_WRITES"):
        record_writes(out, f"{os.environ['FEM_JAX_TEST_WRITES']}.rank{rank}")
    cli = load()
    sys.exit(cli.main(BASE + ["--out", out] + extra))
