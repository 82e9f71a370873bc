"""Train a model to reason by filtered EM (or EM policy gradient / GRPO), resumably.

    python launch/run.py                                   # the embedded default, on a CPU
    python launch/run.py --config configs/tiny.yaml        # a tiny model: a smoke run (about a minute)
    python launch/run.py --set estep.scheme=star --set mstep.lr_start=1e-5
    python launch/run.py --schemes rs,star,pps --seeds 257,521,1031
    python launch/run.py --config configs/tiny.yaml --mesh fsdp=4,tensor=2 --cpu-devices 8

The run folder defaults to runs/<config name>, plus the overrides that make the run
another experiment (runs/default+scheme=star+lr_start=1e-05). Running the same command
again continues where it stopped; `--set run.iterations=5` extends a finished run.

Where the FEM paper's experiments differ from the embedded default, configs/paper/ has
them (every value cited). Our departures from the papers, each a config field:
- the embedded default trains SmolLM2-135M-Instruct on an offline arithmetic task with its
  own learning rate and sizes (configs/default.yaml says which and why);
- STaR continues from θ(k-1) as Algorithm 1 does; `mstep.restart_from_base` gives the
  original STaR restart;
- `estep.reject_hint_leaks` (off by default, as in the paper) drops hinted draws that
  repeat the hint.

Several hosts: run the same command on every host with --distributed (or
FEM_JAX_DISTRIBUTED=1); jax.distributed.initialize() reads the coordinator, process count
and id from the flags or the cluster's environment (SLURM, Open MPI).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog="python launch/run.py", description=head,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--config", default=None, help="experiment YAML (default: configs/default.yaml)")
    p.add_argument("--out", default=None, help="run folder; resumable (default: runs/<config name>[+overrides])")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. 'data=1,fsdp=-1,tensor=1' (sets run.mesh)")
    p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="N fake CPU devices (XLA's --xla_force_host_platform_device_count), to try --mesh on a CPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set mstep.lr_start=1e-5 (repeatable)")
    p.add_argument("--report-to", default=None, metavar="LIST",
                   help="experiment trackers, comma-separated: tensorboard, wandb, trackio (sets run.report_to)")
    p.add_argument("--schemes", default=None, help="comma-separated E-step schemes to compare, e.g. rs,star,pps")
    p.add_argument("--seeds", default=None, help="comma-separated seeds for the comparison, e.g. 257,521,1031")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (several hosts)")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (with --distributed)")
    p.add_argument("--num-processes", type=int, default=None, help="number of processes (with --distributed)")
    p.add_argument("--process-id", type=int, default=None, help="this process's id (with --distributed)")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    return p.parse_args(argv)


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


def main(argv=None) -> int:
    args = parse_args(argv)
    from fem_jax.console import quiet_libraries

    buffer = quiet_libraries()
    if args.cpu_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}".strip()
    try:
        return _main(args, buffer)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, KeyError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {' '.join(str(e).split())}" + ("" if args.debug else "  (--debug shows the traceback)"),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130


def _main(args, buffer) -> int:
    if args.distributed or os.environ.get("FEM_JAX_DISTRIBUTED") == "1":
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    import jax

    from fem_jax import config as config_lib
    from fem_jax.console import Console, route_library_logs
    from fem_jax.loop import run, run_comparison
    from fem_jax.run_folder import default_out
    from fem_jax.models import cache_dir

    # compiled steps persist across processes: a resumed or repeated run skips recompiling
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    config_path = Path(args.config) if args.config else DEFAULT_CONFIG
    overrides = list(args.set)
    if args.mesh is not None:
        overrides.append(f"run.mesh={args.mesh}")
    if args.report_to is not None:
        overrides.append(f"run.report_to={args.report_to}")
    if args.schemes is not None:
        overrides.append(f"compare.schemes={args.schemes}")
    if args.seeds is not None:
        overrides.append(f"compare.seeds={args.seeds}")
    cfg = config_lib.load_config(config_path, overrides)
    out = Path(args.out) if args.out else default_out(config_path, config_lib.override_dict(overrides))
    is_main = jax.process_index() == 0
    route_library_logs(buffer, out, is_main)
    if cfg.run.mesh:
        _check_devices(cfg.run.mesh)
    console = Console()
    if cfg.compare.schemes or cfg.compare.objectives or cfg.compare.trl or cfg.compare.seeds:
        table = run_comparison(cfg, out, console=console)
        if is_main:
            print(f"\n{table}\n\n(written to {out / 'comparison.md'} and {out / 'comparison.png'})")
        return 0
    rows = run(cfg, out, console=console)
    if is_main:
        from fem_jax.report import table

        print(f"\n{table(rows)}\n\n(run folder: {out}; metrics.jsonl, summary.md, curves.png)")
    return 0


def _check_devices(spec: str) -> None:
    import jax

    from fem_jax.sharding import make_mesh

    try:
        make_mesh(spec)
    except ValueError as e:
        hint = ""
        if jax.default_backend() == "cpu" and ("available" in str(e) or "divisible" in str(e)):  # a device count, not a typo
            hint = (" On a CPU, add --cpu-devices N (or XLA_FLAGS=--xla_force_host_platform_device_count=N) "
                    "for N fake devices.")
        raise UserError(f"{e}.{hint}") from None


if __name__ == "__main__":
    sys.exit(main())
