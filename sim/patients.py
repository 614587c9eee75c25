"""Virtual patients: seeded draws of the patient-specific deviations of domain.md."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import numpy as np

from plant_models.config import ParameterFile, load_parameters, param

__all__ = ["CohortSpec", "PatientCohort", "VirtualPatient", "load_cohort_spec"]

DATA = resources.files("sim") / "data"


@dataclasses.dataclass(frozen=True)
class CohortSpec:
    """Distribution of virtual patients (all [check] priors of domain.md)."""

    growth_cv: float = param("1", 0.0, 2.0, "CV of the log-normal growth-rate factor")
    lag_min: float = param("h", 0.0, 240.0, "shortest activation lag")
    lag_max: float = param("h", 0.0, 240.0, "longest activation lag")
    exhaustion_cv: float = param("1", 0.0, 2.0, "CV of the log-normal exhaustion-threshold factor")
    viability_min: float = param("1", 0.0, 1.0, "lowest starting viability", low_open=True)
    viability_max: float = param("1", 0.0, 1.0, "highest starting viability", low_open=True)
    non_expander_fraction: float = param("1", 0.0, 1.0, "fraction of non-expanders")
    non_expander_growth: float = param("1", 0.0, 1.0, "growth factor of a non-expander")


def load_cohort_spec(path: str | Path | None = None) -> tuple[CohortSpec, ParameterFile]:
    src = Path(str(DATA / "cohort.toml")) if path is None else Path(path)
    return load_parameters(CohortSpec, src, model="cohort")


@dataclasses.dataclass(frozen=True)
class VirtualPatient:
    """One patient's deviations from the nominal biology.

    Attributes:
        patient_id: label, e.g. "P0007".
        growth_factor: multiplies the truth maximum growth rate.
        lag_time: activation lag (culture age at half growth), h.
        exhaustion_factor: multiplies the exhaustion threshold.
        initial_viability: viability at inoculation.
        non_expander: whether the growth factor includes the non-expander penalty.
    """

    patient_id: str
    growth_factor: float
    lag_time: float
    exhaustion_factor: float
    initial_viability: float
    non_expander: bool

    @classmethod
    def nominal(cls) -> VirtualPatient:
        """The nominal patient: no deviation (lag as the nominal parameter set)."""
        return cls("nominal", 1.0, 18.0, 1.0, 0.9, False)

    @classmethod
    def draw(cls, seed: int, spec: CohortSpec, patient_id: str | None = None) -> VirtualPatient:
        """Draw one patient; the same seed always gives the same patient."""
        rng = np.random.default_rng(np.random.SeedSequence([20260101, int(seed)]))

        def lognormal(cv: float) -> float:
            sigma = float(np.sqrt(np.log1p(cv**2)))
            return float(np.exp(rng.normal(-0.5 * sigma**2, sigma)))

        growth = lognormal(spec.growth_cv)
        lag = float(rng.uniform(spec.lag_min, spec.lag_max))
        exhaustion = lognormal(spec.exhaustion_cv)
        viability = float(rng.uniform(spec.viability_min, spec.viability_max))
        non_expander = bool(rng.uniform() < spec.non_expander_fraction)
        if non_expander:
            growth *= spec.non_expander_growth
        return cls(patient_id or f"P{seed:04d}", growth, lag, exhaustion, viability, non_expander)


class PatientCohort:
    """A reproducible cohort: patient ``i`` of seed ``s`` is drawn from seed ``s*100003+i``,
    so it does not depend on the cohort size."""

    def __init__(self, size: int, seed: int, spec: CohortSpec | None = None) -> None:
        if size < 1:
            raise ValueError(f"cohort size must be at least 1, got {size}")
        self.size = size
        self.seed = seed
        self.spec = spec if spec is not None else load_cohort_spec()[0]
        self.patients = tuple(
            VirtualPatient.draw(seed * 100003 + i, self.spec, patient_id=f"S{seed}-P{i:03d}")
            for i in range(size)
        )

    def __len__(self) -> int:
        return self.size

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.patients)
