"""Rollout engines: JaxEngine in process (CPU, tests), VllmEngine on GPUs (imported lazily).

`make_engine(backend, ...)` is the one place that knows the backends' names: the loop
builds its engine here and talks to it only through the Engine protocol (`generate`,
`sync`, `release`)."""

from __future__ import annotations

from .engine import Engine, Sample, SamplingParams, Weights, render_prompt

BACKENDS = ("jax", "vllm")


def make_engine(backend: str, *, model, tokenizer, model_dir, rollout_cfg, dtype: str, seed: int) -> Engine:
    """The rollout engine of `backend` serving `model`'s weights (a fem_jax Transformer)."""
    if backend == "jax":
        from .jax_engine import JaxEngine

        return JaxEngine(model, tokenizer, max_batch=rollout_cfg.max_batch, chunk=rollout_cfg.chunk)
    if backend == "vllm":
        from .vllm_engine import VllmEngine

        return VllmEngine(str(model_dir), tokenizer, tensor_parallel_size=rollout_cfg.tensor_parallel_size,
                          gpu_memory_utilization=rollout_cfg.gpu_memory_utilization, dtype=dtype, seed=seed,
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


__all__ = ["BACKENDS", "Engine", "JaxEngine", "Sample", "SamplingParams", "VllmEngine", "Weights", "make_engine",
           "render_prompt"]
