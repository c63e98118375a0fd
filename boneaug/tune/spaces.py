"""Search spaces of the three sweeps, what each kind tunes and measures (`KIND`), and how a
trial's values enter the configuration."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from boneaug.config import BoneaugConfig, UnitConfig
from boneaug.errors import ConfigError

SweepKind = Literal["threshold", "patches", "unit"]
KINDS: tuple[SweepKind, ...] = ("threshold", "patches", "unit")
UNIT_PARAMS = ("lambda_gan", "lambda_kl", "lambda_recon", "lambda_kl_cyc", "lambda_cyc", "lr")
QUALITY_KEYS = ("frac_source", "frac_translated", "gain", "fd_ratio")

@dataclass(frozen=True)
class KindSpec:
    """What a sweep kind tunes and measures: one row of `KIND`."""

    params: tuple[str, ...]  # the trial's parameters, in table order
    metric: str  # what chooses the best trial
    metrics: tuple[str, ...]  # what each row of the results table reports


_QUALITY_ROW = ("iteration", *QUALITY_KEYS, "objective")
KIND: dict[SweepKind, KindSpec] = {
    "threshold": KindSpec(("t",), "val_auc", ("augmented_samples", "val_auc", "test_auc")),
    "patches": KindSpec(("s", "n"), "objective", _QUALITY_ROW),
    "unit": KindSpec(UNIT_PARAMS, "objective", _QUALITY_ROW),
}

@dataclass(frozen=True)
class Param:
    """One dimension of a search space: a grid, a log-uniform range or an integer range."""

    kind: Literal["grid", "loguniform", "randint"]
    values: tuple[float, ...]  # grid: the values; loguniform / randint: (low, high), both inclusive

    def __post_init__(self) -> None:
        if not self.values:
            raise ConfigError(f"{self.kind} search dimension without values")
        if self.kind != "grid" and (len(self.values) != 2 or self.values[0] > self.values[1]):
            raise ConfigError(f"{self.kind} needs (low, high) with low <= high, got {self.values}")
        if self.kind == "loguniform" and self.values[0] <= 0:
            raise ConfigError(f"loguniform needs low > 0, got {self.values}")

    def to_tune(self) -> Any:
        from ray import tune

        low, high = self.values[0], self.values[-1]
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "randint":
            return tune.randint(int(low), int(high) + 1)  # Tune's upper bound is exclusive
        if low == high:
            return low
        return tune.loguniform(low, high)

    def describe(self) -> str:
        return f"{self.kind}{list(self.values)}"


Space = dict[str, Param]


def threshold_space(grid: Sequence[float]) -> Space:
    """t over `grid` (paper: 0.70, 0.85, 0.90, 0.95)."""
    values = tuple(float(t) for t in grid)
    if not values or any(not 0 <= t <= 1 for t in values):
        raise ConfigError(f"thresholds must be in [0, 1], got {list(grid)}")
    return {"t": Param("grid", tuple(sorted(set(values))))}


def patches_space(s_values: Sequence[float] = (1.0, 2.0),
                  n_range: tuple[int, int] = (3, 12)) -> Space:
    """s over a grid (paper: 1 or 2) and n uniformly in the integer range (paper: 7-10)."""
    if any(s < 1 for s in s_values):
        raise ConfigError(f"s must be >= 1 (patch side / box side), got {list(s_values)}")
    if n_range[0] < 1:
        raise ConfigError(f"n must be >= 1, got the range {n_range}")
    return {"s": Param("grid", tuple(sorted({float(s) for s in s_values}))),
            "n": Param("randint", (int(n_range[0]), int(n_range[1])))}


def unit_space(unit: UnitConfig, *, factor: float = 10.0, lr_factor: float = 10.0) -> Space:
    """lambda0..lambda4 log-uniform in [default / factor, default * factor], lr likewise.

    A weight that is 0 in `unit` stays 0 (its term is switched off; log-uniform cannot hold 0).
    """
    if factor < 1 or lr_factor < 1:
        raise ConfigError(f"factors must be >= 1, got factor={factor}, lr_factor={lr_factor}")
    space: Space = {}
    for name in UNIT_PARAMS:
        value = float(getattr(unit, name))
        spread = lr_factor if name == "lr" else factor
        if value > 0:
            space[name] = Param("loguniform", (value / spread, value * spread))
    return space


def apply_params(config: BoneaugConfig, kind: SweepKind, body_part: str,
                 params: Mapping[str, Any]) -> BoneaugConfig:
    """`config` with a trial's values put where the steps read them (validated again).

    threshold: ``augment.thresholds = (t,)`` and ``augment.t[body_part] = t`` (the augment jobs then
    train one augmented model at the tuned t); patches: ``patches.body_parts[body_part].s / .n``;
    unit: the ``unit.lambda_*`` and ``unit.lr`` fields.
    """
    data = config.model_dump(mode="json")
    known = KIND[kind].params
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"{kind} sweep has no parameter(s) {unknown}; it tunes {list(known)}")
    if kind == "threshold" and "t" in params:
        data["augment"]["thresholds"] = [float(params["t"])]
        data["augment"]["t"][body_part] = float(params["t"])
    elif kind == "patches":
        part = data["patches"]["body_parts"][body_part]
        part.update({k: (int(v) if k == "n" else float(v)) for k, v in params.items()})
    elif kind == "unit":
        data["unit"].update({k: float(v) for k, v in params.items()})
    try:
        return BoneaugConfig.model_validate(data)
    except Exception as exc:  # pydantic's ValidationError; say which trial values broke it
        raise ConfigError(
            f"{kind} trial values {dict(params)} give an invalid config: {exc}") from exc


def quality_objective(gain: float, fd_ratio: float | None) -> float:
    """The UNIT sweeps' objective: gain, less how far fd_ratio exceeds 1 (see the module
    docstring)."""
    if fd_ratio is None or not math.isfinite(fd_ratio):
        return gain
    return gain - max(0.0, fd_ratio - 1.0)


__all__ = [
    "KIND", "KINDS", "QUALITY_KEYS", "UNIT_PARAMS", "KindSpec", "Param", "Space", "SweepKind",
    "apply_params", "patches_space", "quality_objective", "threshold_space", "unit_space",
]
