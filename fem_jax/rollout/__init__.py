"""Rollout engines: JaxEngine in process, VllmEngine over vLLM (CUDA or CPU; imported lazily).

`make_engine(backend, ...)` is the one place that knows the backends' names: the loop
builds its engine here and talks to it only through the Engine protocol (`generate`,
`sync`, `release`)."""

from __future__ import annotations

from .engine import Engine, Sample, SamplingParams, SyncReport, Weights, render_prompt

BACKENDS = ("jax", "vllm")


def make_engine(backend: str, *, model, tokenizer, model_dir, rollout_cfg, dtype: str, seed: int) -> Engine:
    """The rollout engine of `backend` serving `model`'s weights (a fem_jax Transformer)."""
    if backend == "jax":
        from .jax_engine import JaxEngine

        return JaxEngine(model, tokenizer, max_batch=rollout_cfg.max_batch, chunk=rollout_cfg.chunk)
    if backend == "vllm":
        from .vllm_engine import VllmEngine

        r = rollout_cfg
        return VllmEngine(str(model_dir), tokenizer, tensor_parallel_size=r.tensor_parallel_size,
                          gpu_memory_utilization=r.gpu_memory_utilization, kv_cache_gb=r.kv_cache_gb,
                          max_model_len=r.max_model_len or None, sync=r.sync, dtype=dtype, seed=seed,
                          verify=False)
    raise ValueError(f"rollout.backend: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def __getattr__(name):
    if name == "JaxEngine":
        from .jax_engine import JaxEngine

        return JaxEngine
    if name == "VllmEngine":
        from .vllm_engine import VllmEngine

        return VllmEngine
    raise AttributeError(name)


__all__ = ["BACKENDS", "Engine", "JaxEngine", "Sample", "SamplingParams", "SyncReport", "VllmEngine", "Weights",
           "make_engine", "render_prompt"]
