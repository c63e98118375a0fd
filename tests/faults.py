"""Failures injected into Ray Train workers and Tune trials, for the tests of resumption.

The production code has no hook for them. A test wraps the function that Ray ships to its
workers (UNIT's Train loop, the Tune trainable) with one of these where it is handed to Ray
(through pytest's monkeypatch), and calls `by_value` first: Ray's cloudpickle then ships this
module's code with the wrapper, since the workers cannot import the tests. The wrapped function
itself stays where it is, so it still travels by reference. Each failure happens once: an
exclusively created marker file records it, and the retry that follows runs clean.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any


def by_value() -> None:
    """Ship this module's functions to Ray's workers by value (they cannot import tests/)."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _first_time(marker: str) -> bool:
    try:
        with open(marker, "x"):
            return True
    except FileExistsError:
        return False


def unit_fails_once(loop_fn: Callable[[dict[str, Any]], Any], *, iteration: int, rank: int,
                    delay_s: float, marker: str) -> Callable[[dict[str, Any]], Any]:
    """`loop_fn` (UNIT's Train loop), except that on its first attempt rank `rank` raises at
    `iteration`, `delay_s` seconds after that iteration starts (a crash some time after the last
    checkpoint)."""

    def loop(config: dict[str, Any]) -> Any:
        import ray.train

        import boneaug.train.unit as unit

        real = unit.train_iteration
        calls = [0]

        def step(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if (calls[0] == iteration and ray.train.get_context().get_world_rank() == rank
                    and _first_time(marker)):
                time.sleep(delay_s)
                raise RuntimeError(f"injected failure at iteration {iteration} on rank {rank}")
            return real(*args, **kwargs)

        unit.train_iteration = step
        try:
            return loop_fn(config)
        finally:
            unit.train_iteration = real

    return loop


def trial_fails_once(trial_fn: Callable[..., Any], *, when: Mapping[str, Any],
                     marker: str) -> Callable[..., Any]:
    """`trial_fn` (a Tune trainable taking its context, as `boneaug.tune.run_trial`), except
    that the first trial whose parameters match `when` raises before it trains."""

    def trial(params: dict[str, Any], context: Any) -> Any:
        if all(params.get(k) == v for k, v in when.items()) and _first_time(marker):
            raise RuntimeError(f"injected failure of the trial with {dict(params)}")
        return trial_fn(params, context)

    return trial


__all__ = ["by_value", "trial_fails_once", "unit_fails_once"]
