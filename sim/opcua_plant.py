"""A bioreactor served over OPC UA as a :class:`sim.closed_loop.Plant`: the closed loop
(``run_closed_loop``, ``summarize``, the violation count) drives the deployable runtime's
plant I/O (:class:`controller.runtime.plant_io.OpcUaConnection`: secure session, heartbeat,
subscriptions, WriteSetpoints) step by step, against the OPC UA simulators or real equipment.

The client runs on its own event loop in a background thread, so the plant is synchronous to
its caller like the virtual bioreactor and the FMU plant. Each :meth:`OpcUaPlant.step` writes
one setpoint bundle (the unit must be in Remote: an operator grants it at the SCADA), then
waits until the plant's published process clock has passed the step and returns the
measurements that arrived.

The true state is not on the plant's interface. ``truth`` (a callable; e.g. the in-process
simulator's ``plant.true_values``) supplies it for scoring; without it :meth:`true_values`
returns the latest good measurements (and what the plug-in derives from them). The closed
loop's violation count and summary need every hard-limited state (the T-cell volume is not
measured online), so a batch over OPC UA is scored with ``truth``; without it the plant still
runs a controller step by step (``initial_measurements``, ``step``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from typing import Any, Self, TypeVar

from controller.numerics.measurements import Measurement
from controller.runtime.plant_io import (
    COMM_ERRORS,
    BatchContinuity,
    OpcUaConnection,
    OpcUaPlantIO,
    PlantStatus,
    ensure_client_certificate,
)
from controller.runtime.site import SiteConfig, canonical_units
from plant_models.errors import ConfigError, ModelError, PlantIOError
from plant_models.process import ProcessPlugin, get_process

__all__ = ["OpcUaPlant"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_HAND_BACK_ERRORS: tuple[type[BaseException], ...] = (PlantIOError, *COMM_ERRORS)

#: process-clock slack when comparing published times with step ends, h
_CLOCK_TOL_H = 1e-6


class OpcUaPlant:
    """One unit of a site file, over OPC UA, as a synchronous closed-loop plant.

    Args:
        site: the validated site file (endpoints, security, tag map).
        unit: the unit's name in the site file.
        process: the process specification (default: the plug-in's packaged file); it gives
            the limits the violation count checks and the media the summary adds up.
        truth: the true state, for scoring only (never given to the controller).
        pace: called with the end of each step (process hours) before waiting for it: a
            simulator held on a gated clock advances to there (lock-step); None for a plant
            whose clock runs on its own.
        timeout_s: wall seconds to wait for a connection, for Remote, and for each step.
    """

    def __init__(
        self,
        site: SiteConfig,
        unit: str,
        *,
        process: Any = None,
        truth: Callable[[], Mapping[str, float]] | None = None,
        pace: Callable[[float], None] | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ConfigError(f"timeout_s must be positive and finite, got {timeout_s!r}")
        self.site = site
        self.config = site.unit(unit)
        self.plugin: ProcessPlugin = get_process(self.config.model)
        self.kind = self.plugin.name
        self.process = process if process is not None else self.plugin.load_process()[0]
        names = self.plugin.model(self.plugin.load_parameters()[0], self.process).input_names
        setpoints = {sp.variable for sp in self.config.setpoints}
        missing = [n for n in names if n not in setpoints]
        if missing:
            raise ConfigError(
                f"{site.path} unit {unit}: the {self.plugin.name} model's inputs {missing} have "
                f"no setpoint in the tag map; the closed loop writes every input."
            )
        self._input_names = tuple(names)
        self._truth = truth
        self._pace = pace
        self.timeout_s = float(timeout_s)
        self.time_h = 0.0
        self.bounds: dict[str, tuple[float, float]] = {}
        self.clamped_inputs = 0
        self.refused_writes = 0
        self._latest: dict[str, float] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opcua-plant")
        self._thread.daemon = True
        self._connection: OpcUaConnection | None = None
        self._io: OpcUaPlantIO | None = None
        self._opened = False
        self._plant_id = self.config.batch_id or self.config.name
        self._continuity = BatchContinuity()

    # -- life cycle --------------------------------------------------------------------
    def open(self) -> Self:
        """Connect, wait for the plant's clock, limits and values, start the heartbeat and
        wait until the operator grants Remote. Raises :class:`PlantIOError` on time-out."""
        if self._opened:
            return self
        if self._thread.ident is not None:
            raise PlantIOError(f"{self.unit}: this plant was closed; make a new OpcUaPlant")
        self._thread.start()
        self._opened = True
        try:
            self._call(ensure_client_certificate(self.site.security))
            self._connection = OpcUaConnection(self.site, self.config.endpoint)
            self._io = self._connection.add_unit(self.config)
            self._call(self._connection.__aenter__())
            self._io.set_alive(True)
            self._call(self._wait(self._ready, "a connection with clock, limits and values"))
            self._call(self._wait(lambda: self._status().remote, "Remote mode"))
        except BaseException:
            self.close()
            raise
        self._set_bounds()
        self.time_h = self._status().clock_h
        self._plant_id = self._status().batch_id
        self._continuity.check(self._status())  # marks the batch
        return self

    def close(self) -> None:
        """Hand the unit back to Local (when it is in Remote), disconnect, stop the thread."""
        if not self._opened:
            return
        self._opened = False
        io, conn = self._io, self._connection
        try:
            if io is not None and conn is not None and io.status().remote:
                status = self._call(io.hand_back())
                log.info("%s: handed back to Local (%s)", self.config.name, status)
        except _HAND_BACK_ERRORS as exc:
            log.warning("%s: hand-back failed (%s); the plant's watchdog sheds", self.unit, exc)
        finally:
            if io is not None:
                io.set_alive(False)
            if conn is not None:
                self._call(conn.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeout_s)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the Plant protocol ------------------------------------------------------------
    @property
    def unit(self) -> str:
        return self.config.name

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._input_names

    @property
    def plant_id(self) -> str:
        """The plant's batch id (the site file's, or the plant's ``BatchId``)."""
        return self._plant_id

    def status(self) -> PlantStatus:
        """Connection, mode and clock as the client sees them now (no I/O)."""
        return self._status()

    def initial_measurements(self) -> list[Measurement]:
        """The values the plant published so far (the subscription's initial values)."""
        return self._take()

    def step(self, inputs: Mapping[str, float], dt_h: float) -> list[Measurement]:
        """Write ``inputs`` (clamped to the bounds) as one bundle, let the plant run
        ``dt_h`` process hours and return the measurements that arrived.

        Raises :class:`PlantIOError` when the unit is no longer in Remote (its watchdog
        shed the controller, or an operator took it back) or the plant's clock does not
        reach the end of the step within ``timeout_s``."""
        if not (dt_h > 0 and math.isfinite(dt_h)):
            raise ModelError(f"step length must be positive and finite, got {dt_h!r}")
        io = self._plant_io()
        status = self._status()
        if not status.remote:
            raise PlantIOError(
                f"{self.unit}: not in Remote (fallback={status.fallback}); the controller may "
                "not write. An operator grants Remote at the SCADA."
            )
        self._check_same_batch(status)
        missing = [n for n in self._input_names if n not in inputs]
        if missing:
            raise ModelError(f"{self.unit}: inputs {missing} missing; nothing written")
        held: dict[str, float] = {}
        for name in self._input_names:
            low, high = self.bounds[name]
            value = float(inputs[name])
            if not math.isfinite(value):
                raise ModelError(f"{self.unit}: input {name} is {value!r}; nothing written")
            clamped = min(max(value, low), high)
            self.clamped_inputs += clamped != value
            held[name] = clamped
        statuses = self._call(io.write_setpoints(held))
        refused = {k: v for k, v in statuses.items() if v != "Good"}
        if refused:
            self.refused_writes += 1
            log.warning("%s: the plant refused %s at %.2f h", self.unit, refused, self.time_h)
        end = self.time_h + dt_h
        if self._pace is not None:
            self._pace(end)
        self._call(
            self._wait(
                lambda: self._status().clock_h >= end - _CLOCK_TOL_H, f"process time {end:g} h"
            )
        )
        self._check_same_batch(self._status())
        self.time_h = end
        return self._take()

    def _check_same_batch(self, status: PlantStatus) -> None:
        """The plant must still run the batch the loop started on (the runtime's
        :class:`BatchContinuity`): a restarted plant ends the step with an error instead of
        continuing the record on another culture."""
        why = self._continuity.check(status)
        if why:
            raise PlantIOError(
                f"{self.unit}: {why}: the plant restarted or was reset; this batch's record "
                "ends here."
            )

    def true_values(self) -> dict[str, float]:
        """The true state from ``truth`` or, without it, the latest good measurements;
        with what the plug-in derives from them (viability, total viable cells)."""
        values = dict(self._truth()) if self._truth is not None else dict(self._latest)
        try:
            values.update(self.plugin.derived_values(values))
        except (KeyError, ZeroDivisionError) as exc:
            log.debug("%s: derived values unavailable (%s)", self.unit, exc)
        return values

    def true_rates(self, inputs: Mapping[str, float]) -> dict[str, float]:
        """Not on the plant's interface: empty."""
        return {}

    def variable_units(self) -> dict[str, str]:
        return dict(canonical_units(self.config.model))

    # -- internals ---------------------------------------------------------------------
    def _plant_io(self) -> OpcUaPlantIO:
        if self._io is None or not self._opened:
            raise PlantIOError(f"{self.unit}: not connected (call open() first)")
        return self._io

    def _status(self) -> PlantStatus:
        return self._plant_io().status()

    def _ready(self) -> bool:
        io = self._plant_io()
        status = io.status()
        online = [t for t in self.config.inputs if t.source == "online" and t.required]
        latest = io.inputs()
        return (
            status.connected
            and math.isfinite(status.clock_h)
            and io.limits() is not None
            and all(t.key in latest for t in online)
        )

    def _set_bounds(self) -> None:
        limits = self._plant_io().limits()
        if limits is None:  # _ready waited for them
            raise PlantIOError(f"{self.unit}: the plant published no setpoint limits")
        by_variable = {sp.variable: sp for sp in self.config.setpoints}
        for name in self._input_names:
            sp = by_variable[name]
            own_low = sp.low if sp.low is not None else -math.inf
            own_high = sp.high if sp.high is not None else math.inf
            low = max(limits.low.get(name, -math.inf), own_low)
            high = min(limits.high.get(name, math.inf), own_high)
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise PlantIOError(f"{self.unit}: no finite limits for setpoint {name}")
            self.bounds[name] = (low, high)

    def _take(self) -> list[Measurement]:
        out = self._plant_io().take_measurements()
        for m in out:
            if m.source != "assay" and m.quality == "good" and math.isfinite(m.value):
                self._latest[m.name] = m.value
        return out

    async def _wait(self, predicate: Callable[[], bool], what: str) -> None:
        io = self._plant_io()
        deadline = time.monotonic() + self.timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PlantIOError(
                    f"{self.unit}: no {what} within {self.timeout_s:g} s "
                    f"({self._connection.last_error if self._connection else ''})"
                )
            await io.wait_change(min(remaining, 0.5))

    def _call(self, coro: Awaitable[T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return future.result(self.timeout_s + 30.0)
