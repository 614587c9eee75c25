"""``hmpc-sim bench campaign-results``: what returning a campaign run's files through Ray
costs per run (docs/benchmarks.md, "Campaigns on a cluster").

A campaign run (:func:`sim.campaign.run_one`) sends its ``trajectory.csv``, ``assays.csv``
and ``summary.json`` back to the driver zlib-compressed; the driver writes them. Per run
this adds, against a run that wrote its own files: compressing them on the node, moving
them through Ray, and decompressing them in the driver (the writing itself only moved).
The benchmark times each part on the files of one real batch:

- ``compress_s``: zlib of the three files on the node;
- ``transfer_s``: median time of a Ray task that returns those files minus that of a task
  returning nothing, tasks one at a time, the two kinds interleaved (``--address``: on a
  cluster, pinned to a node other than the driver's, so the files cross between nodes);
- ``write_s``: the driver's decompression and atomic writes (:func:`sim.campaign.write_run`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from plant_models.process import DEFAULT_PROCESS
from sim.campaign import COHORT_STRIDE, RESULT_COMPRESSION, RunOutput, run_one, write_run
from sim.patients import PatientCohort

__all__ = ["add_bench_campaign", "measure_result_overhead"]


def _returns(output: RunOutput | None) -> RunOutput | None:
    """The body of the timed tasks: hand back what it was given."""
    return output


def measure_result_overhead(
    output: RunOutput, *, repeats: int, address: str | None
) -> dict[str, Any]:
    """Per-run figures (seconds, bytes) of sending ``output`` back through Ray."""
    import ray

    texts = output.texts()
    raw = sum(len(text.encode("utf-8")) for _, text in texts)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for _, text in texts:
            zlib.compress(text.encode("utf-8"), RESULT_COMPRESSION)
    compress_s = (time.perf_counter() - t0) / repeats

    with tempfile.TemporaryDirectory(prefix="hmpc-bench-") as tmp:
        t0 = time.perf_counter()
        for i in range(repeats):
            write_run(Path(tmp) / str(i), output)
        write_s = (time.perf_counter() - t0) / repeats

    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        others = [
            n["NodeID"]
            for n in ray.nodes()
            if n.get("Alive") and n["NodeID"] != here and n.get("Resources", {}).get("CPU", 0)
        ]
        task: Any = ray.remote(num_cpus=1, max_retries=0)(_returns)
        if others:  # on a cluster: on another node than this driver's, so the files cross
            task = task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(others[0], soft=False)
            )
        ref: Any = ray.put(output)  # the task gets it once from the store; it returns a copy
        ray.get([task.remote(None), task.remote(ref)])  # warm the worker
        with_files: list[float] = []
        empty: list[float] = []
        for _ in range(repeats):
            for payload, times in ((ref, with_files), (None, empty)):
                t0 = time.perf_counter()
                ray.get(task.remote(payload))
                times.append(time.perf_counter() - t0)
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
    finally:
        if started:
            ray.shutdown()
    return {
        "raw_bytes": raw,
        "compressed_bytes": output.compressed_bytes,
        "compress_s": compress_s,
        "task_with_files_median_s": statistics.median(with_files),
        "task_empty_median_s": statistics.median(empty),
        "transfer_s": statistics.median(with_files) - statistics.median(empty),
        "write_s": write_s,
        "overhead_per_run_s": compress_s
        + statistics.median(with_files)
        - statistics.median(empty)
        + write_s,
        "repeats": repeats,
        "ray_nodes": nodes,
        "task_on_another_node": bool(others),
        "load_average_1min": os.getloadavg()[0],
    }


def add_bench_campaign(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "campaign-results",
        help="per-run cost of returning a campaign run's files through Ray",
    )
    p.add_argument("--days", type=float, default=8.0, help="batch length of the sample run")
    p.add_argument("--repeats", type=int, default=50, help="timed repetitions of each part")
    p.add_argument("--address", default=None, help="Ray cluster (default: a local Ray)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.set_defaults(func=cmd_bench_campaign)


def cmd_bench_campaign(args: argparse.Namespace) -> int:
    if args.repeats < 1 or not args.days > 0:
        raise ValueError("--repeats must be at least 1 and --days positive")
    patient = next(iter(PatientCohort(1, 1)))
    t0 = time.perf_counter()
    output = run_one("rule", patient, 0, COHORT_STRIDE, args.days, 1.0, b"", None)
    run_s = time.perf_counter() - t0
    figures = measure_result_overhead(output, repeats=args.repeats, address=args.address)
    figures = {"model": DEFAULT_PROCESS, "days": args.days, "sample_run_s": run_s, **figures}
    for key, value in figures.items():
        shown = f"{value:.6f}" if isinstance(value, float) else str(value)
        print(f"{key:28s} {shown}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    sys.stdout.flush()
    return 0
