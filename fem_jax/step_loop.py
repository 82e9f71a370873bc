"""EMPG's and GRPO's rounds: the steps of Algorithm 1 of "Training LLMs to Reason via EM
Policy Gradient" (one-step off-policy: step t samples from θ(t-1) only).

Step t: the E-step draws `estep.samples_per_prompt` rollouts (N) for each of a batch of
`estep.prompts_per_step` prompts, taken without replacement from a seeded shuffle of the
training set and reshuffled each epoch; the M-step makes the configured optimizer updates on
that buffer only (the objective's spec: advantages, ratios, KL), and step t+1 draws a new
batch. Evaluation every `eval.every` steps (the paper: 5), the table's score the mean of the
last 10 evaluations (fem_jax.report). The rest of a round is fem_jax.experiment.Experiment's.
"""

from __future__ import annotations

import numpy as np

from .experiment import Experiment


def step_examples(train: list, prompts_per_step: int, seed: int, k: int) -> list:
    """Step k's batch of `prompts_per_step` prompts from a seeded shuffle of the training set,
    a new shuffle each epoch (positions (k-1)B .. kB-1 of the epochs laid end to end). The TRL
    arm (fem_jax.trl_run) feeds GRPOTrainer the same sequence."""
    b, n = prompts_per_step, len(train)
    out = []
    for pos in range((k - 1) * b, k * b):
        epoch, i = divmod(pos, n)
        order = np.random.default_rng([seed, 7919, epoch]).permutation(n)
        out.append(train[order[i]])
    return out


class PolicySteps(Experiment):
    prefix = "step"
    noun = "step"

    def round_examples(self, k: int) -> list:
        return step_examples(self.train, self.cfg.estep.prompts_per_step, self.cfg.run.seed, k)

    def title(self) -> str:
        return self.cfg.mstep.objective
