"""FEM's rounds: the iterations of Algorithm 1 of "Learning to Reason in LLMs by Expectation
Maximization" (Section 3).

Iteration k: the E-step draws a rationale for every training example from the proposal
(rs | star | pps, fem_jax.estep) with θ(k-1); the filter keeps the correct ones; the M-step
makes `mstep.epochs` epochs (the paper: one) of SFT on the kept draws after their hint-free
prompts, from θ(k-1) (or from the base model with mstep.restart_from_base, original STaR),
at the iteration's learning rate (linear from lr_start at k = 1 to lr_end at k = K). The
rest of a round (checkpoint, sync, evaluation of θ(k), resume) is fem_jax.experiment.Experiment's.
"""

from __future__ import annotations

from .experiment import Experiment


class FemIterations(Experiment):
    prefix = "iter"
    noun = "iteration"

    def round_examples(self, k: int) -> list:
        """Every training example, every iteration (Algorithm 1, line 3)."""
        return list(self.train)

    def title(self) -> str:
        return self.cfg.estep.scheme
