"""Hooks the training loop calls, so methods that act on weights during training (TRP's periodic
truncation and nuclear-norm sub-gradient) need no loop of their own.

Order within one optimizer step (after gradient accumulation):
    on_step_start(model, step)            # before the first micro-batch's forward
    ... forward/backward over the grad-accum micro-batches ...
    on_before_optimizer_step(model, step)  # gradients complete (accumulated, synced, unscaled), before clipping
    optimizer.step(); scheduler.step(); zero_grad()
    on_step_end(model, step, logs)         # logs: dict the callback may add JSON-able entries to
"""

from __future__ import annotations

__all__ = ["Callback"]


class Callback:
    """Base class: override what you need. `step` counts optimizer steps from 0."""

    def on_step_start(self, model, step: int) -> None:
        pass

    def on_before_optimizer_step(self, model, step: int) -> None:
        pass

    def on_step_end(self, model, step: int, logs: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """Saved with training checkpoints, so resume continues exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
