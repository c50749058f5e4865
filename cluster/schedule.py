"""Learning-rate schedules as pure functions of the step, so a resumed or resized run continues on the same curve."""

from __future__ import annotations

import math

from athanor.config import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    """The learning rate for optimizer step `step` (0-based) under `t.schedule`."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "wsd":
        return _warmup_stable_decay(step, t)
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def _warmup_stable_decay(step: int, t: TrainConfig) -> float:
    """Held at lr, then linear to min_lr over the last decay_fraction of the run (Hu et al. 2024, MiniCPM)."""
    decay_steps = max(1, round(t.decay_fraction * t.max_steps))
    decay_start = max(t.warmup_steps, t.max_steps - decay_steps)
    if step < decay_start:
        return t.lr
    progress = min(1.0, (step - decay_start) / max(1, t.max_steps - decay_start))
    return t.lr + (t.min_lr - t.lr) * progress
