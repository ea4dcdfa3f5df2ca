"""Scheduled sampling: how strongly grounding acts at each denoising step.

GLIGEN's schedule `[a, b, c]` splits the steps into fractions: scale 1 for the first `a`,
a linear decay for the next `b`, scale 0 for the last `c`. Turning grounding off late lets
the frozen base model refine details (GLIGEN section 3.2, "scheduled sampling").
A single `beta` is diffusers' `gligen_scheduled_sampling_beta`, i.e. `[beta, 0, 1 - beta]`.
"""

from __future__ import annotations

from typing import Sequence

from gligen.errors import UserError, is_number

Schedule = tuple[float, float, float]
DEFAULT_SCHEDULE: Schedule = (0.3, 0.0, 0.7)


def schedule_from_beta(beta: float) -> Schedule:
    """`[beta, 0, 1 - beta]`: full grounding for the first `beta` of the steps, then none."""
    if not (is_number(beta) and 0.0 <= beta <= 1.0):
        raise UserError(f"beta must be in [0, 1], got {beta!r}")
    return (float(beta), 0.0, 1.0 - float(beta))


def parse_schedule(values: Sequence[float] | str) -> Schedule:
    """Validate `[a, b, c]` (or the string "a,b,c"): three non-negative fractions summing to 1."""
    if isinstance(values, str):
        try:
            values = [float(v) for v in values.split(",")]
        except ValueError:
            raise UserError(f"schedule {values!r} must be three numbers a,b,c") from None
    if len(values) != 3 or not all(is_number(v) and v >= 0 for v in values):
        raise UserError(f"schedule {list(values)} must be three non-negative fractions a,b,c")
    if abs(sum(values) - 1.0) > 1e-6:
        raise UserError(f"schedule {list(values)} must sum to 1, sums to {sum(values):g}")
    return (float(values[0]), float(values[1]), float(values[2]))


def grounding_scales(num_steps: int, schedule: Schedule = DEFAULT_SCHEDULE) -> list[float]:
    """Per-step fuser scales, as GLIGEN's `alpha_generator`.

    The decay stage of n steps takes the values (n-1)/n, ..., 1/n, 0.
    """
    full = int(schedule[0] * num_steps)
    decay = int(schedule[1] * num_steps)
    off = num_steps - full - decay
    return [1.0] * full + [(decay - 1 - k) / decay for k in range(decay)] + [0.0] * off
