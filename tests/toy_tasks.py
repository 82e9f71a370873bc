"""A toy task for loop tests: the tiny random model 'solves' it about half the time."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class _Ex:
    id: str
    gold: int
    fields: dict


class EvenLengthTask:
    """A test task the random model can 'solve': the answer is the parity of the number of
    characters it writes. Roughly half the draws are accepted, so every phase has work."""

    name = "even_length"
    hint_schemes = ("pps", "pps2", "pps3")

    def __init__(self, seed=0, n_train=12, n_test=6, operands=None, min_value=None, max_value=None):
        # operands/min_value/max_value: configs/tiny.yaml's arithmetic options, which a test that
        # loads it and sets task.name=even_length inherits (--set merges task.options); ignored
        self.n_train, self.n_test = n_train, n_test

    def load(self, split):
        n = self.n_train if split == "train" else self.n_test
        return [_Ex(f"{split}/{i}", 0, {"q": f"Say something {i}."}) for i in range(n)]

    def messages(self, ex, hint=None):
        text = ex.fields["q"] + (f" The answer should be {ex.gold}." if hint else "")
        return [{"role": "user", "content": text}]

    def parse(self, text):
        return len(text) % 2

    def reward(self, answer, gold):
        return float(answer == gold)

    def hint_leaked(self, text, hint=None, gold=None):
        return "answer should be" in text


def register(monkeypatch=None) -> None:
    """Add the toy task to fem_jax.tasks' registry (undone by `monkeypatch` when given)."""
    from fem_jax import tasks

    if monkeypatch is not None:
        monkeypatch.setitem(tasks.TASKS, EvenLengthTask.name, EvenLengthTask)
    else:
        tasks.TASKS[EvenLengthTask.name] = EvenLengthTask
