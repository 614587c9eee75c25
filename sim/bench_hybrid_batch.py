"""Campaign-like figures of the hybrid MPC (issue 25), printed as one JSON line.

``python -m sim.bench_hybrid_batch loop CONTROLLER [--residual FILE]``: one 10-day batch
(hourly tuning ``configs/mpc_tcell_hourly.toml``, virtual patient of seed 7, in-batch
learning of the residual as deployed): wall time, the MPC's share, the calls of
``NonlinearMPC.refresh_residual`` and the per-step residual work (``_uncertainty`` +
``_linearisation``), dose figures and hard violations.

``python -m sim.bench_hybrid_batch memory CONTROLLER --units K [--residual FILE]``: K
controllers built in one process (as ``hmpc run`` holds one control law per unit), each
stepped 3 times; the resident set size after each, and the median growth per extra unit.

Timing wrappers are installed on the class for the run only; nothing is changed in the
controllers' behaviour.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from controller.config_files import config_file
from controller.numerics import mpc as mpc_module
from plant_models.process import DEFAULT_PROCESS
from sim.closed_loop import run_closed_loop
from sim.mpc_controllers import make_mpc_controller
from sim.patients import VirtualPatient, load_cohort_spec
from sim.plant import VirtualBioreactor

__all__ = ["batch_figures", "memory_figures"]


def _timed(store: list[float], fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store.append(time.perf_counter() - start)

    return wrapper


def batch_figures(controller: str, residual: Path | None, days: float = 10.0) -> dict[str, Any]:
    """One campaign-like batch of ``controller`` (see the module docstring)."""
    cls = mpc_module.NonlinearMPC
    names = ("refresh_residual", "_uncertainty", "_linearisation", "step")
    times: dict[str, list[float]] = {name: [] for name in names}
    originals = {name: getattr(cls, name) for name in names}
    for name in names:
        setattr(cls, name, _timed(times[name], originals[name]))
    try:
        plant = VirtualBioreactor.for_process(
            DEFAULT_PROCESS, VirtualPatient.draw(7, load_cohort_spec()[0])
        )
        start = time.perf_counter()
        law = make_mpc_controller(
            controller, plant, config_file("mpc_tcell_hourly.toml"), residual=residual
        )
        built = time.perf_counter()
        df = run_closed_loop(plant, law, days=days)
        done = time.perf_counter()
    finally:
        for name in names:
            setattr(cls, name, originals[name])
    refresh = times["refresh_residual"]
    at_harvest = int(np.argmin(np.abs(df["time"].to_numpy(float) - 192.0)))
    cells = df["total_viable_cells"].to_numpy(float)
    return {
        "controller": controller,
        "residual": str(residual) if residual else None,
        "days": days,
        "build_s": built - start,
        "loop_s": done - built,
        "total_s": done - start,
        "mpc_step_sum_s": sum(times["step"]),
        "solve_median_s": statistics.median(r.solve_time_s for r in law.results),
        "failures": sum(not r.success for r in law.results),
        "refresh_calls": len(refresh),
        "refresh_residual_median_s": statistics.median(refresh) if refresh else None,
        "refresh_residual_sum_s": sum(refresh),
        "uncertainty_linearisation_sum_s": sum(times["_uncertainty"])
        + sum(times["_linearisation"]),
        "total_viable_cells_at_192h": float(cells[at_harvest]),
        "media_used_l": float(df["media_used"].iloc[-1]),
        "hard_violations": int(df["hard_violation"].sum()),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_figures(controller: str, units: int, residual: Path | None) -> dict[str, Any]:
    """RSS growth per unit for ``units`` controllers in one process (module docstring)."""
    keep: list[Any] = []
    rss = [_rss_mb()]
    for _ in range(units):
        plant = VirtualBioreactor.for_process(DEFAULT_PROCESS, VirtualPatient.nominal())
        law = make_mpc_controller(
            controller, plant, config_file("mpc_tcell_hourly.toml"), residual=residual
        )
        run_closed_loop(plant, law, days=3 / 24)
        keep.append((plant, law))
        gc.collect()
        rss.append(_rss_mb())
    growth = [b - a for a, b in itertools.pairwise(rss)]
    extra = growth[1:]
    return {
        "controller": controller,
        "units": units,
        "rss_mb": rss,
        "per_unit_mb": growth,
        "per_extra_unit_mb_median": statistics.median(extra) if extra else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.bench_hybrid_batch")
    parser.add_argument("what", choices=("loop", "memory"))
    parser.add_argument("controller", choices=("mechanistic-mpc", "hybrid-mpc"))
    parser.add_argument("--residual", type=Path, default=None, help="hmpc fit output (.npz)")
    parser.add_argument("--units", type=int, default=4, help="memory: controllers built")
    parser.add_argument("--days", type=float, default=10.0, help="loop: batch length")
    args = parser.parse_args(argv)
    if args.what == "loop":
        out = batch_figures(args.controller, args.residual, args.days)
    else:
        out = memory_figures(args.controller, args.units, args.residual)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
