"""VllmEngine: the Engine protocol over `vllm.LLM`, for rollouts on GPUs.

The model folder is a Hugging Face export of our checkpoint (`fem_jax.checkpoint.export_hf`
or `python -m fem_jax.convert`); it is verified against its manifest.json before vLLM
reads it, so a partial or corrupt export is refused with an error naming the file.

Prompts: rendered and tokenized by `encode_prompt`, the same function JaxEngine uses, and
handed to vLLM as token ids, so both engines see identical prompts (vLLM does not
re-apply a template or add a BOS of its own).

Sampling: our options map onto `vllm.SamplingParams` (`sampling_kwargs`): n, temperature
(0 = greedy), top_p, top_k (0 = off), max_tokens, stop, seed, and logprobs=0, i.e. the
log-probability of each sampled token under the model's raw distribution, as JaxEngine
returns. Greedy requests with n > 1 ask vLLM for one sample and repeat it.

New weights each EM iteration (`update(model_dir)`): the export's manifest is checked,
then the weights are loaded in place into the running engine through a worker extension
(`FemWorkerExtension.fem_load_folder`, called with `llm.collective_rpc`): every worker
streams the safetensors files through `model.load_weights`, which shards them for
tensor parallelism itself. The prefix cache is reset (it holds keys and values of the
old weights). Where that path is unavailable (an older vLLM without worker extensions,
or a different architecture/shape in config.json) the engine is shut down and created
again on the new folder: slower (process start, CUDA graph capture) but always right.

GPU memory between JAX (M-step) and vLLM (E-step) on one device:
- JAX pre-allocates 75% of the GPU at its first use by default. Set, before jax is first
  imported, `XLA_PYTHON_CLIENT_PREALLOCATE=false` (allocate on demand) or
  `XLA_PYTHON_CLIENT_MEM_FRACTION=0.45` (a fixed cap), and keep
  `gpu_memory_utilization` + JAX's share below ~0.95. JAX keeps freed blocks in its own
  pool; `XLA_PYTHON_CLIENT_ALLOCATOR=platform` returns them to the driver at a speed cost.
- vLLM claims `gpu_memory_utilization` of the *total* device memory (weights, activations,
  KV cache) and must find it free when it starts or wakes. With `enable_sleep_mode=True`,
  `sleep()` (level 2: weights and KV cache discarded, since the next iteration brings new
  weights anyway) returns nearly all of it while JAX trains; `update()` wakes the weights,
  loads the new ones, then wakes the KV cache. `sleep(level=1)` keeps a CPU copy of the
  weights instead (for waking into the same weights).
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from .engine import Prompt, Sample, SamplingParams, encode_prompt

EXTENSION = "fem_jax.rollout.vllm_engine.FemWorkerExtension"


# ----------------------------------------------------------------------------- pure parts (tested without vLLM)


def sampling_kwargs(sp: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of vllm.SamplingParams for our SamplingParams (one request)."""
    greedy = sp.temperature == 0
    kw: dict[str, Any] = {
        "n": 1 if greedy else sp.n,
        "temperature": 0.0 if greedy else float(sp.temperature),
        "top_p": 1.0 if greedy else float(sp.top_p),
        "top_k": -1 if greedy or sp.top_k == 0 else int(sp.top_k),
        "max_tokens": int(sp.max_new_tokens),
        "logprobs": 0,  # the sampled token's log-probability only
        "skip_special_tokens": True,
    }
    if sp.stop:
        kw["stop"] = list(sp.stop)
    if not greedy:
        kw["seed"] = int(sp.seed)
    return kw


def token_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[dict[str, list[int]]]:
    """vLLM TokensPrompt dicts: the ids JaxEngine would feed for the same prompts."""
    return [{"prompt_token_ids": encode_prompt(tokenizer, p)} for p in prompts]


def _sampled_logprobs(token_ids: Sequence[int], logprobs) -> list[float]:
    if logprobs is None:
        return [float("nan")] * len(token_ids)
    out = []
    for t, d in zip(token_ids, logprobs):
        lp = d[t] if t in d else None
        out.append(float(getattr(lp, "logprob", lp)) if lp is not None else float("nan"))
    return out


def to_samples(request_output, n: int) -> list[Sample]:
    """Our Samples from one vllm.RequestOutput (duck-typed: .outputs[j].text, .token_ids,
    .finish_reason, .logprobs). A greedy request answered once is repeated to n."""
    outs = []
    for o in request_output.outputs:
        ids = [int(t) for t in o.token_ids]
        reason = "length" if o.finish_reason == "length" else "stop"
        outs.append(Sample(text=o.text, token_ids=ids, finish_reason=reason,
                           logprobs=_sampled_logprobs(ids, o.logprobs)))
    if len(outs) == 1 and n > 1:
        outs = [Sample(s.text, list(s.token_ids), s.finish_reason, list(s.logprobs)) for s in outs * n]
    if len(outs) != n:
        raise RuntimeError(f"vLLM returned {len(outs)} samples for a request of n={n}")
    return outs


def same_architecture(a: dict, b: dict) -> bool:
    """Can weights of config `b` be loaded in place into an engine built for config `a`?"""
    keys = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "tie_word_embeddings", "rope_theta", "rope_scaling", "max_position_embeddings")
    return all(a.get(k) == b.get(k) for k in keys)


def iter_safetensors(folder: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(name, torch tensor on CPU) for every tensor of an export, file by file."""
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors files")
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def check_export(model_dir: str | os.PathLike, checksums: bool = True) -> dict:
    """verify_export (manifest sizes and sha256), then the config.json."""
    from ..checkpoint import verify_export

    verify_export(model_dir, checksums=checksums)
    return json.loads((Path(model_dir) / "config.json").read_text())


class FemWorkerExtension:
    """Mixed into vLLM's GPU workers (`worker_extension_cls`); called via collective_rpc."""

    def fem_load_folder(self, folder: str) -> int:
        model = self.model_runner.model  # type: ignore[attr-defined]
        loaded = model.load_weights(weights=iter_safetensors(folder))
        return len(loaded) if loaded is not None else -1


# ----------------------------------------------------------------------------- the engine


class VllmEngine:
    def __init__(self, model_dir: str | os.PathLike, tokenizer=None, *, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, dtype: str = "bfloat16", seed: int = 0,
                 enable_sleep_mode: bool = True, max_model_len: int = 4096, verify: bool = True,
                 **llm_kwargs):
        self.model_dir = Path(model_dir)
        self.verify = verify
        self.config = check_export(self.model_dir) if verify else json.loads(
            (self.model_dir / "config.json").read_text())
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer = tokenizer
        self.llm_args = dict(tensor_parallel_size=tensor_parallel_size,
                             gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed,
                             enable_sleep_mode=enable_sleep_mode, max_model_len=max_model_len, **llm_kwargs)
        self.sleeping: int = 0  # 0 awake, else the sleep level
        self.in_place = True
        self.last_update: dict[str, Any] = {}
        self.llm = self._create(self.model_dir)

    def _create(self, model_dir: Path):
        import vllm

        kw = dict(self.llm_args)
        try:
            return vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), worker_extension_cls=EXTENSION, **kw)
        except TypeError:  # a vLLM without worker extensions: reload by re-creation only
            self.in_place = False
            return vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), **kw)

    # ------------------------------------------------------------------ Engine protocol

    def generate(self, prompts: Sequence[Prompt], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, max_new_tokens: int = 128, seed: int = 0, stop: Sequence[str] = (),
                 progress=None) -> list[list[Sample]]:
        import vllm

        if self.sleeping:
            self.wake_up()
        sp = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                            max_new_tokens=max_new_tokens, seed=seed, stop=tuple(stop))
        params = vllm.SamplingParams(**sampling_kwargs(sp))
        outs = self.llm.generate(token_prompts(self.tokenizer, prompts), params, use_tqdm=False)
        res = [to_samples(o, n) for o in outs]
        if progress is not None:
            progress(len(prompts) * n)
        return res

    def update(self, model_dir: str | os.PathLike) -> None:
        """Serve the weights of a new export: verified, then loaded in place (or the
        engine re-created where in-place loading is not possible)."""
        import time

        model_dir = Path(model_dir)
        t0 = time.perf_counter()
        cfg = check_export(model_dir) if self.verify else json.loads((model_dir / "config.json").read_text())
        t1 = time.perf_counter()
        how = "in_place"
        if self.in_place and same_architecture(self.config, cfg):
            try:
                if self.sleeping:
                    self.llm.wake_up(tags=["weights"])
                self.llm.collective_rpc("fem_load_folder", args=(str(model_dir),))
                if self.sleeping:
                    self.llm.wake_up(tags=["kv_cache"])
                    self.sleeping = 0
                self.llm.reset_prefix_cache()
            except (AttributeError, NotImplementedError, RuntimeError, TypeError) as e:
                how = f"recreate ({type(e).__name__}: {e})"
                self._recreate(model_dir)
        else:
            how = "recreate"
            self._recreate(model_dir)
        self.model_dir, self.config = model_dir, cfg
        self.last_update = {"verify_s": t1 - t0, "load_s": time.perf_counter() - t1, "how": how}

    def sync(self, weights) -> dict:
        """The Engine protocol: export the trainer's weights to a Hugging Face folder (from
        the round's orbax checkpoint when it was saved, else from the arrays in memory),
        then load it into the running engine. Returns the timings of both."""
        import time

        import jax

        t0 = time.perf_counter()
        folder = Path(weights.export_dir)
        if jax.process_index() == 0:  # one export in the shared run folder; every process loads it
            if weights.saved:
                from ..checkpoint import export_hf

                export_hf(weights.checkpoints, folder, step=weights.round, dtype=self.llm_args["dtype"],
                          tokenizer_from=weights.tokenizer_from)
            else:
                from ..models.hf import save_params

                save_params(weights.params, weights.model_config, folder, dtype=self.llm_args["dtype"],
                            tokenizer_from=weights.tokenizer_from)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"fem_jax:vllm-export-{weights.round}")
        t1 = time.perf_counter()
        self.update(folder)
        return {"seconds_export": t1 - t0, "seconds_sync": time.perf_counter() - t0, **self.last_update}

    def release(self) -> None:
        """Sleep (level 2: weights and KV cache freed) while JAX trains; sync() wakes it."""
        if self.llm_args.get("enable_sleep_mode"):
            self.sleep(level=2)

    def _recreate(self, model_dir: Path) -> None:
        self.shutdown()
        self.llm = self._create(model_dir)
        self.sleeping = 0

    # ------------------------------------------------------------------ memory

    def sleep(self, level: int = 2) -> None:
        """Free the GPU for training: level 2 drops weights and KV cache (the next
        update() brings new weights), level 1 keeps the weights in CPU memory."""
        if not self.llm_args.get("enable_sleep_mode"):
            raise RuntimeError("VllmEngine(enable_sleep_mode=False): sleep() is unavailable")
        if not self.sleeping:
            self.llm.sleep(level=level)
            self.sleeping = level

    def wake_up(self) -> None:
        if self.sleeping == 2:
            raise RuntimeError("the engine slept at level 2 (weights discarded): call update(model_dir) "
                               "to load weights before generating")
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = 0

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        for obj in (engine, getattr(engine, "engine_core", None)):
            stop = getattr(obj, "shutdown", None)
            if callable(stop):
                try:
                    stop()
                except Exception:  # noqa: BLE001  best effort: the object is dropped anyway
                    pass
        del llm, engine
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
