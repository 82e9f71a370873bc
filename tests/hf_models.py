"""Tiny random transformers models of both families, built locally for parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

torch = None
transformers = None


def _imports():
    global torch, transformers
    if torch is None:
        import torch as _t
        import transformers as _tf

        torch, transformers = _t, _tf
    return torch, transformers


def tiny_config(family: str = "llama", *, tied=False, heads=4, kv_heads=2, layers=2, hidden=64,
                inter=96, vocab=160, rope=None, theta=10000.0, bias=False, head_dim=None,
                max_pos=512):
    """A transformers config of `family` ('llama' or 'qwen2'). `rope` is a scaling dict
    such as {'rope_type': 'llama3', ...}; `bias` sets llama's attention_bias and mlp_bias."""
    torch, tf = _imports()
    major = int(tf.__version__.split(".")[0])
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
              tie_word_embeddings=tied, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    if major >= 5:
        kw["rope_parameters"] = {"rope_theta": theta, "rope_type": "default", **(rope or {})}
    else:
        kw["rope_theta"] = theta
        if rope:
            kw["rope_scaling"] = dict(rope)
    if family == "llama":
        return tf.LlamaConfig(attention_bias=bias, mlp_bias=bias, **kw)
    if family == "qwen2":
        return tf.Qwen2Config(**kw)
    raise ValueError(family)


def build_hf(config, seed: int = 0, bias_scale: float = 0.5):
    """A random float32 CausalLM. Biases and norm weights are made non-trivial so that a
    mapping mistake on them shows."""
    torch, tf = _imports()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * bias_scale)
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def save_hf(model, folder: Path, legacy_config: bool = False) -> Path:
    """save_pretrained; with legacy_config, rewrite config.json in the 4.x layout."""
    folder = Path(folder)
    model.save_pretrained(folder)
    if legacy_config:
        c = json.loads((folder / "config.json").read_text())
        rp = c.pop("rope_parameters", None) or {}
        c["rope_theta"] = rp.pop("rope_theta", 10000.0)
        c["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
        (folder / "config.json").write_text(json.dumps(c))
    return folder


def hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """transformers logits; with a mask, positions follow it as in generate()."""
    torch, _ = _imports()
    ids_t = torch.tensor(ids)
    kw = {}
    if mask is not None:
        m = torch.tensor(mask)
        pos = (m.long().cumsum(-1) - 1).clamp(min=0)
        kw = dict(attention_mask=m, position_ids=pos)
    with torch.no_grad():
        return model(ids_t, **kw).logits.float().numpy()


def assert_close(ours, ref, tol=1e-4, what="logits"):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    diff = np.abs(ours - ref)
    rel = diff.max() / np.abs(ref).max()
    assert rel <= tol, (f"{what}: max|diff|/max|ref| = {rel:.3e} > {tol:.0e} "
                        f"(max diff {diff.max():.3e}, mean diff {diff.mean():.3e})")
