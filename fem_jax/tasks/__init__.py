"""Tasks: a name registry and `get_task(name, **options)`.

Every task has `load(split)` -> list[Example], `messages(example, hint=None)`,
`parse(text)`, `reward(answer, gold)` and `hint_leaked(text, hint=None, gold=None)`; see
`base.Task`. Dataset tasks take `path`, `n_train`, `n_test`, `seed`, `config` and `pool`
(draw both splits from one pool of the dataset's splits; see `base`).
"""

from __future__ import annotations

import inspect

from .arithmetic import Arithmetic
from .base import Example, Task
from .judge import HelpSteer2, SummarizeFeedback
from .math import GSM8K, MATH

TASKS: dict[str, type] = {cls.name: cls for cls in (Arithmetic, GSM8K, MATH, HelpSteer2, SummarizeFeedback)}


def task_options(cls: type) -> list[str]:
    """The option names a task class accepts (its constructors' keyword parameters)."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        names += [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def get_task(name: str, **options) -> Task:
    """The task `name` built with `options`; ValueError naming an unknown task or option."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    cls = TASKS[name]
    allowed = task_options(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"task {name!r}: unknown option(s) {unknown}; expected some of {allowed}")
    return cls(**options)


__all__ = ["TASKS", "Example", "Task", "get_task", "task_options"]
