"""What a training stage is, for the loop in dualner.train: a recipe.

A recipe supplies its micro batches (and their position, to resume), its evaluation sets, and its
loss terms by name: `losses(batch) -> {name: scalar}`. The loop trains on the weighted sum and logs
every term (`loss/<name>`), in losses.jsonl and TensorBoard, without knowing which terms exist.
A new loss term is one function in the recipe's `TERMS` and one weight in `train.loss_weights`.
Its state is saved in every checkpoint: `state_dict()` once (the same on every rank), and the
components of `per_rank_state()` per rank (dualner.checkpoint.Checkpointer).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from dualner.errors import ConfigError

LossTerm = Callable[[Any], torch.Tensor]  # (the recipe's forward results for a micro batch) -> scalar


def resolve_weights(terms: dict[str, LossTerm], defaults: dict[str, float],
                    overrides: dict[str, float]) -> dict[str, float]:
    """The recipe's default weights, updated by `train.loss_weights` (names checked)."""
    unknown = sorted(set(overrides) - set(terms))
    if unknown:
        raise ConfigError(f"train.loss_weights.{unknown[0]}: not a loss term of this stage; its terms: "
                          f"{', '.join(terms)}")
    weights = {name: defaults.get(name, 0.0) for name in terms} | overrides
    if not any(weight > 0 for weight in weights.values()):
        raise ConfigError("train.loss_weights: every loss term has weight 0; nothing would be trained")
    return weights


class Recipe:
    """Base of the stage recipes; constructed with everything it needs (no attribute set later; only
    the hardening tests' fault injection wraps a method, tests/hooks/fault_injection.py)."""

    evaluate_initial_model = False  # stage 2: the model it starts from is the one to beat
    TERMS: dict[str, LossTerm] = {}

    def __init__(self, weights: dict[str, float], dev_sets: list, test_sets: list):
        self.weights = weights
        self.dev_sets, self.test_sets = dev_sets, test_sets

    @property
    def active_terms(self) -> dict[str, LossTerm]:
        return {name: term for name, term in self.TERMS.items() if self.weights.get(name, 0.0) > 0}

    def batches(self, start_step: int) -> Iterator[dict]:
        """This rank's host micro batches from `start_step` on (dualner.data.packing layout), drawn
        as the loop needs them: the engine's accumulation_steps per optimizer step."""
        raise NotImplementedError

    def forward(self, batch: dict) -> Any:
        """The forward passes of a micro batch already on the device: what the terms read."""
        raise NotImplementedError

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        context = self.forward(batch)
        return {name: term(context) for name, term in self.active_terms.items()}

    # -- optional --------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Called by the loop before the micro batches of optimizer step `step` (1-based)."""

    def device_statistics(self) -> dict[str, torch.Tensor]:
        """Sums over the log window kept on the device (reduced with the losses, then reset)."""
        return {}

    def window_scalars(self, sums: dict) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        """Saved in every checkpoint, the same on every rank."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def per_rank_state(self) -> dict:
        """{name: component with state_dict() / load_state_dict(every rank's states)} saved per rank
        (e.g. the stage-2 stream's position)."""
        return {}

    def on_new_best(self) -> None:
        pass

    def data_problem(self, final: bool = False) -> str | None:
        """Called by every rank after every step: a reason to stop for bad input data (the loop
        checkpoints, then stops), the same decision on every rank; `final`: the job's last step
        (nothing may be left undecided)."""
        return None
