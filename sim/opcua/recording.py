"""The plant side, recorded: the OPC UA simulators on their own event loop in a thread,
with every setpoint bundle as the plant received it and every integration step (inputs
applied, true state), optionally on a process clock that stays paused until released.
Used by the runtime's integration tests and by ``hmpc-sim bench faults``, which judge the
controller by what the plant saw, not by what the controller says it did."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, Self, TypeVar

from sim.opcua.clock import ProcessClock
from sim.opcua.server import SimulatorConfig, Simulators

__all__ = ["GatedMonotonic", "PlantStep", "PlantThread", "PlantWrite", "SimulatorThread"]

T = TypeVar("T")


class GatedMonotonic:
    """``time.monotonic`` that can be held still, or kept below a ``limit`` (the plant's
    process clock, its grid and its watchdog follow it)."""

    def __init__(self, paused: bool) -> None:
        self._lock = threading.Lock()
        self._offset = 0.0
        self._paused_at: float | None = time.monotonic() if paused else None
        self.limit: float | None = None

    def __call__(self) -> float:
        with self._lock:
            if self._paused_at is not None:
                return self._paused_at - self._offset
            value = time.monotonic() - self._offset
            return value if self.limit is None else min(value, self.limit)

    def resume(self) -> None:
        with self._lock:
            if self._paused_at is not None:
                self._offset += time.monotonic() - self._paused_at
                self._paused_at = None


@dataclasses.dataclass(frozen=True)
class PlantWrite:
    """One WriteSetpoints bundle as the plant received it."""

    unit: str
    process_h: float
    wall: float
    mode: str
    names: tuple[str, ...]
    values: tuple[float, ...]
    statuses: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PlantStep:
    """One plant integration step: inputs applied over [start, end] and the truth at end."""

    start_h: float
    end_h: float
    inputs: dict[str, float]
    truth: dict[str, float]


class SimulatorThread:
    """The simulators on their own event loop in a background thread: :meth:`start`,
    coroutines run on that loop with :meth:`run`, :meth:`close`. Subclasses prepare the
    simulators before they start (:meth:`_prepare`)."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.sims: Simulators | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="opcua-sims", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the calling thread
            self._error = exc
            self._ready.set()
        finally:
            self.loop.close()

    def _prepare(self, sims: Simulators) -> None:
        """Called with the simulators before they start (nothing by default)."""

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        sims = Simulators(self.config)
        self._prepare(sims)
        try:
            await sims.start()
            self.sims = sims
            self._ready.set()
            await self._stop.wait()
        finally:
            await sims.stop()
            # a server stopped by a restart fault leaves asyncua's session tasks behind
            leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in leftover:
                task.cancel()
            await asyncio.gather(*leftover, return_exceptions=True)

    def start(self) -> Self:
        self._thread.start()
        if not self._ready.wait(60) or self._error is not None:
            self.close()
            raise RuntimeError(f"simulators did not start: {self._error!r}")
        return self

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine on the simulators' loop (to inspect or change the plant side)."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(fn(), self.loop)  # type: ignore[arg-type]
        return future.result(60)

    def close(self) -> None:
        if self._stop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    @property
    def s(self) -> Simulators:
        if self.sims is None:
            raise RuntimeError("the simulators are not running (call start() first)")
        return self.sims

    @property
    def endpoint(self) -> str:
        return self.s.endpoint


class PlantThread(SimulatorThread):
    """The simulators in a thread, recording the plant side, on a process clock that can be
    held (:class:`GatedMonotonic`)."""

    def __init__(self, config: SimulatorConfig, *, paused: bool = False) -> None:
        super().__init__(config)
        self.gate = GatedMonotonic(paused)
        self.writes: list[PlantWrite] = []
        self.steps: dict[str, list[PlantStep]] = {}
        self.initial: dict[str, dict[str, float]] = {}

    def _prepare(self, sims: Simulators) -> None:
        sims.clock = ProcessClock(self.config.speed, monotonic=self.gate)
        self._instrument(sims)

    def _instrument(self, sims: Simulators) -> None:
        for unit in sims.units:
            self.steps[unit.name] = []
            self.initial[unit.name] = unit.plant.true_values()
            write = unit.apc.write_setpoints
            advance = unit.advance

            def recorded_write(
                names: Any,
                values: Any,
                role: Any,
                now: float,
                user: str,
                *,
                _u: Any = unit,
                _w: Any = write,
            ) -> Any:
                mode = _u.apc.mode.name
                out = _w(names, values, role, now, user)
                self.writes.append(
                    PlantWrite(
                        _u.name,
                        _u.plant.time_h,
                        time.monotonic(),
                        mode,
                        tuple(names),
                        tuple(float(v) for v in values),
                        tuple(s.value for s in out),
                    )
                )
                return out

            def recorded_advance(dt_h: float, *, _u: Any = unit, _a: Any = advance) -> None:
                start = _u.plant.time_h
                _a(dt_h)
                self.steps[_u.name].append(
                    PlantStep(start, _u.plant.time_h, dict(_u.apc.working), _u.plant.true_values())
                )

            unit.apc.write_setpoints = recorded_write  # type: ignore[method-assign]
            unit.advance = recorded_advance  # type: ignore[method-assign]
