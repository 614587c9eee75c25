"""The baseline controllers live in :mod:`controller.numerics.baselines` (they are deployable);
re-exported here for the simulator's callers."""

from controller.numerics.baselines import (
    Controller,
    LatestValues,
    RecipeController,
    RuleController,
    make_baseline,
)

__all__ = [
    "Controller",
    "LatestValues",
    "RecipeController",
    "RuleController",
    "make_baseline",
]
