"""The rollout Engine protocol shared by JaxEngine (in process, any JAX device) and
VllmEngine (vLLM on CUDA GPUs or on a CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, Union

Message = dict[str, str]
Prompt = Union[str, Sequence[Message]]  # plain text, or chat messages rendered with the chat template


@dataclasses.dataclass
class Sample:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    logprobs: list[float]  # log-probability of each sampled token under the model's raw distribution (T = 1)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 128
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


@dataclasses.dataclass
class Weights:
    """The trainer's weights after round `round`, in every form an engine may read: the
    arrays in memory, and the orbax checkpoint of that round when one was saved."""

    round: int
    params: Mapping[str, Any]  # path -> jax.Array, the trainer's own (do not donate)
    checkpoints: Path | None  # the orbax root
    saved: bool  # checkpoint `round` exists under `checkpoints`
    export_dir: Path  # where an engine that reads files may write a Hugging Face export
    model_config: dict  # ModelConfig.to_hf_config()
    tokenizer_from: Path | None


@dataclasses.dataclass(frozen=True)
class SyncReport:
    """How one `Engine.sync` reached the engine, for the round's metrics and the log."""

    method: str  # "memory": from the trainer's arrays; "folder": through a Hugging Face export
    seconds_export: float = 0.0  # writing the export (0 in memory)
    seconds_load: float = 0.0  # loading into the engine
    fallback: str = ""  # why the engine's preferred method was not used (printed as a warning)

    def metrics(self) -> dict:
        row = {"sync_method": self.method, "seconds_export": self.seconds_export, "seconds_load": self.seconds_load,
               "seconds_sync": self.seconds_export + self.seconds_load}
        if self.fallback:
            row["sync_fallback"] = self.fallback
        return row


class Engine(Protocol):
    def generate(self, prompts: Sequence[Prompt], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, max_new_tokens: int = 128, seed: int = 0, stop: Sequence[str] = (),
                 progress: Callable[[int], None] | None = None) -> list[list[Sample]]:
        """For each prompt, `n` samples. Greedy when temperature == 0. `progress(k)` is called
        as samples finish, with the number finished since the last call."""
        ...

    def sync(self, weights: Weights) -> SyncReport:
        """Serve `weights` from now on, in place; the engine decides how (JaxEngine: its own
        copy of the arrays; VllmEngine: vLLM's reload, from memory or from an export)."""
        ...

    def release(self) -> None:
        """Free the engine's copy of the weights until the next `sync` (the M-step runs
        meanwhile). Generating before the next `sync` is an error."""
        ...


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The exact text both engines feed the model: chat messages through the tokenizer's
    chat template with the generation prompt appended; plain strings unchanged."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt, the same for every engine. Chat messages: the rendered
    template already holds its special tokens (no BOS added again); plain strings: the
    tokenizer's own special tokens, as transformers' and vLLM's text prompts get."""
    text = render_prompt(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"])
