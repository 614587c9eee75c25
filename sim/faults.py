"""Sensor faults: seeded transformations of the measurement stream of the virtual plant.

:class:`FaultInjector` sits between :meth:`sim.plant.VirtualBioreactor.step` and whatever
consumes the measurements (the estimator, a controller)::

    faults = FaultInjector([default_fault("spike")], seed=3)
    measurements = faults(plant.time_h, plant.step(inputs, step_h))

Fault kinds (:data:`FAULT_KINDS`):

- ``nan``: the value becomes NaN or +/-inf (a broken transmitter, a failed parse);
- ``out_of_range``: a physically impossible value (negative, or a thousand-fold reading);
- ``stuck``: a probe repeats one value (fresh timestamps) over a time window;
- ``spike``: a single wild reading (bubble on a probe, a clot in the analyser);
- ``stale``: a gateway re-sends an old sample (its old sample time, arriving now);
- ``duplicate``: an assay result is delivered again one to three hours later;
- ``out_of_order``: assays are held back for an extra day, so newer results arrive first,
  and every delivery is shuffled;
- ``drift``: a probe's calibration drifts slowly (reading = (1 + rate * days) * value), as
  a capacitance probe's cells-per-signal factor does when activated T cells grow in size.

The first five must be rejected by the estimator; duplicates must be ignored and
out-of-order assays applied at their sample time. A drift is too slow for any check to
reject: only the assays can reveal it (the estimator's ``online_gains`` states). Every
corruption is recorded in :attr:`FaultInjector.injected` so tests and benchmarks can check
what happened to it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from controller.numerics.measurements import Measurement
from plant_models.errors import ConfigError

__all__ = [
    "FAULT_KINDS",
    "FaultInjector",
    "FaultSpec",
    "InjectedFault",
    "default_fault",
    "parse_fault_kinds",
]

FAULT_KINDS = (
    "nan",
    "out_of_range",
    "stuck",
    "spike",
    "stale",
    "duplicate",
    "out_of_order",
    "drift",
)


@dataclasses.dataclass(frozen=True)
class FaultSpec:
    """One fault and where it applies.

    Attributes:
        kind: one of :data:`FAULT_KINDS`.
        probability: chance that an eligible measurement is affected (``stuck``: unused).
        variables: affected variable names (empty: all).
        sources: affected sources, ``online`` and/or ``assay``.
        start_h: first culture age at which the fault acts, h.
        end_h: culture age after which it stops, h.
        magnitude: ``spike``: relative size (value +/- magnitude*|value|, at least
            ``absolute``); ``out_of_range``: multiplier of the high reading; ``drift``:
            relative change of the probe's gain per day after ``start_h``.
        absolute: ``spike``: smallest absolute size in the variable's unit.
        delay_h: ``stale``: age of the re-sent sample; ``out_of_order``: extra hold-back.
    """

    kind: str
    probability: float = 0.05
    variables: tuple[str, ...] = ()
    sources: tuple[str, ...] = ("online", "assay")
    start_h: float = 0.0
    end_h: float = math.inf
    magnitude: float = 1.0
    absolute: float = 3.0
    delay_h: float = 6.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ConfigError(f"fault kind {self.kind!r} is unknown; expected one of {FAULT_KINDS}")
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"fault {self.kind}: probability {self.probability} not in [0, 1]")
        unknown = [s for s in self.sources if s not in ("online", "assay")]
        if unknown:
            raise ConfigError(f"fault {self.kind}: unknown sources {unknown}; online or assay")
        if not self.start_h <= self.end_h:
            raise ConfigError(f"fault {self.kind}: start_h {self.start_h} after end_h {self.end_h}")
        if self.delay_h < 0 or self.magnitude <= 0 or self.absolute < 0:
            raise ConfigError(
                f"fault {self.kind}: delay_h and absolute must be >= 0, magnitude > 0"
            )

    def applies(self, m: Measurement, time_h: float) -> bool:
        """Whether measurement ``m`` delivered at ``time_h`` is eligible for this fault."""
        return (
            self.start_h <= time_h <= self.end_h
            and m.source in self.sources
            and (not self.variables or m.name in self.variables)
        )


def default_fault(kind: str) -> FaultSpec:
    """The fault of each kind used by the estimation benchmark and the tests."""
    if kind == "stuck":  # the capacitance probe freezes for two days in the growth phase
        return FaultSpec(
            "stuck",
            1.0,
            variables=("viable_cells",),
            sources=("online",),
            start_h=72.0,
            end_h=120.0,
        )
    if kind == "stale":
        return FaultSpec("stale", 0.1, sources=("online",), delay_h=6.0)
    if kind == "duplicate":
        return FaultSpec("duplicate", 1.0, sources=("assay",))
    if kind == "out_of_order":
        return FaultSpec("out_of_order", 0.5, sources=("assay",), delay_h=26.0)
    if kind == "drift":  # +4 % per day from day 1: +28 % by day 8
        return FaultSpec(
            "drift",
            1.0,
            variables=("viable_cells",),
            sources=("online",),
            start_h=24.0,
            magnitude=0.04,
        )
    return FaultSpec(kind)


def parse_fault_kinds(text: str) -> list[FaultSpec]:
    """The default faults named in a comma-separated list (``all`` for every kind), e.g.
    for a ``--faults spike,stuck`` command-line option."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        names = list(FAULT_KINDS)
    unknown = [n for n in names if n not in FAULT_KINDS]
    if unknown or not names:
        raise ConfigError(
            f"faults {text!r}: unknown kind(s) {unknown}; choose from {', '.join(FAULT_KINDS)} "
            "or 'all'"
        )
    return [default_fault(n) for n in names]


@dataclasses.dataclass(frozen=True)
class InjectedFault:
    """Record of one corruption: ``original`` became ``delivered`` at ``time_h``."""

    kind: str
    time_h: float
    original: Measurement
    delivered: Measurement


class FaultInjector:
    """Apply faults to each delivery of measurements (seeded, deterministic).

    Call it once per plant step with the plant's time and the measurements it returned;
    it returns what the consumer receives. Faults apply in the order given.
    """

    def __init__(self, faults: Sequence[FaultSpec], seed: int = 0) -> None:
        self.faults = tuple(faults)
        self.rng = np.random.default_rng(np.random.SeedSequence([4241, int(seed)]))
        # one stream per fault, keyed by its kind: two kinds never hit the same samples
        self._rngs = [
            np.random.default_rng(
                np.random.SeedSequence([4241, int(seed), FAULT_KINDS.index(f.kind), i])
            )
            for i, f in enumerate(self.faults)
        ]
        self.injected: list[InjectedFault] = []
        self._held: list[tuple[float, Measurement]] = []  # (release time, measurement)
        self._past: list[Measurement] = []  # online readings, for stale re-sends
        self._frozen: dict[tuple[int, str], float] = {}  # (fault index, name) -> stuck value

    def __call__(self, time_h: float, measurements: Sequence[Measurement]) -> list[Measurement]:
        clean = list(measurements)
        self._past.extend(m for m in clean if m.source == "online")
        out = clean
        corrupted: set[int] = set()  # one fault per measurement: faults do not stack
        for index, fault in enumerate(self.faults):
            out = self._apply(index, fault, time_h, out, corrupted)
        released = [m for t, m in self._held if t <= time_h + 1e-9]
        self._held = [(t, m) for t, m in self._held if t > time_h + 1e-9]
        out = out + released
        if any(f.kind == "out_of_order" for f in self.faults) and len(out) > 1:
            order = self.rng.permutation(len(out))
            out = [out[int(i)] for i in order]
        horizon = max((f.delay_h for f in self.faults), default=0.0) + 2.0
        self._past = [m for m in self._past if m.sample_time >= time_h - horizon]
        return out

    @property
    def held(self) -> list[Measurement]:
        """Measurements held back and not yet delivered."""
        return [m for _, m in self._held]

    def _record(self, kind: str, time_h: float, original: Measurement, new: Measurement) -> None:
        self.injected.append(InjectedFault(kind, time_h, original, new))

    def _apply(
        self,
        index: int,
        fault: FaultSpec,
        time_h: float,
        batch: list[Measurement],
        corrupted: set[int],
    ) -> list[Measurement]:
        rng = self._rngs[index]
        out: list[Measurement] = []
        for m in batch:
            if id(m) in corrupted or not fault.applies(m, time_h):
                out.append(m)
                continue
            if fault.kind == "drift":
                gain = 1.0 + fault.magnitude * (time_h - fault.start_h) / 24.0
                new = dataclasses.replace(m, value=m.value * gain)
                self._record("drift", time_h, m, new)
                corrupted.add(id(new))
                out.append(new)
                continue
            if fault.kind == "stuck":
                key = (index, m.name)
                value = self._frozen.setdefault(key, m.value)
                new = dataclasses.replace(m, value=value)
                self._record("stuck", time_h, m, new)
                corrupted.add(id(new))
                out.append(new)
                continue
            if rng.uniform() >= fault.probability:
                out.append(m)
                continue
            if fault.kind == "nan":
                value = float(rng.choice([math.nan, math.inf, -math.inf]))
                new = dataclasses.replace(m, value=value)
            elif fault.kind == "out_of_range":
                high = (abs(m.value) + 1.0) * 1000.0 * fault.magnitude
                new = dataclasses.replace(m, value=-1.0 if rng.uniform() < 0.5 else high)
            elif fault.kind == "spike":
                size = max(fault.magnitude * abs(m.value), fault.absolute)
                sign = 1.0 if rng.uniform() < 0.5 or m.value - size < 0 else -1.0
                new = dataclasses.replace(m, value=m.value + sign * size)
            elif fault.kind == "stale":
                old = [
                    p
                    for p in self._past
                    if p.name == m.name and p.sample_time <= m.sample_time - fault.delay_h + 1e-9
                ]
                if not old:
                    out.append(m)
                    continue
                new = dataclasses.replace(old[-1], arrival_time=time_h)
            elif fault.kind == "duplicate":
                out.append(m)
                again = dataclasses.replace(m, arrival_time=time_h + int(rng.integers(1, 4)))
                self._held.append((again.arrival_time, again))
                self._record("duplicate", time_h, m, again)
                continue
            else:  # out_of_order: hold back for an extra delay
                late = dataclasses.replace(m, arrival_time=time_h + fault.delay_h)
                self._held.append((late.arrival_time, late))
                self._record("out_of_order", time_h, m, late)
                continue
            self._record(fault.kind, time_h, m, new)
            corrupted.add(id(new))
            out.append(new)
        return out
