from __future__ import annotations

import math

import pytest

from controller.numerics.limits import OutputLimiter
from plant_models.errors import ConfigError


def limiter() -> OutputLimiter:
    return OutputLimiter(
        bounds={"perfusion_rate": (0.0, 4.0), "feed": (0.0, 5.0)},
        rate_limits={"perfusion_rate": 0.5},
        deadbands={"feed": 0.1},
    )


def test_bounds_rate_and_deadband() -> None:
    lim = limiter()
    out = lim.apply(
        {"perfusion_rate": 10.0, "feed": -3.0}, {"perfusion_rate": 1.0, "feed": 1.0}, 1.0
    )
    assert out == {"perfusion_rate": 1.5, "feed": 0.0}
    out = lim.apply(
        {"perfusion_rate": 0.0, "feed": 1.05}, {"perfusion_rate": 1.0, "feed": 1.0}, 2.0
    )
    assert out == {"perfusion_rate": 0.0, "feed": 1.0}


def test_non_finite_holds_previous_and_missing_holds() -> None:
    out = limiter().apply({"perfusion_rate": math.nan}, {"perfusion_rate": 2.0, "feed": 3.0}, 1.0)
    assert out == {"perfusion_rate": 2.0, "feed": 3.0}


def test_previous_outside_bounds_is_pulled_in() -> None:
    out = limiter().apply(
        {"perfusion_rate": 9.0, "feed": 9.0}, {"perfusion_rate": 9.0, "feed": 9.0}, 1.0
    )
    assert out == {"perfusion_rate": 4.0, "feed": 5.0}


def test_invalid_limits() -> None:
    with pytest.raises(ConfigError, match="invalid"):
        OutputLimiter(bounds={"x": (1.0, 0.0)})
    with pytest.raises(ConfigError, match="no bounds"):
        OutputLimiter(bounds={"x": (0.0, 1.0)}, rate_limits={"y": 1.0})
