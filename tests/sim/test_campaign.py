"""Campaigns on Ray: reproducible tables, resumption, manifest, summary metrics.

Campaigns here are tiny (2 patients, the baselines, 2 days) and share one local Ray
instance; the MPC and residual-training tests are marked slow.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from plant_models.errors import ConfigError
from plant_models.gp import GPResidual
from sim.campaign import (
    COHORT_STRIDE,
    HYBRID_ADAPT_RESIDUAL_SOURCE,
    CampaignSpec,
    _Pool,
    check_targets,
    paired_comparisons,
    parse_controllers,
    run_campaign,
    summarize_campaign,
    train_historical_residual,
)

ray = pytest.importorskip("ray")

TINY = CampaignSpec(patients=2, controllers=("recipe", "rule"), seed=3, days=2.0)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance for the module (campaigns reuse an initialised Ray)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _run_cli(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sim.cli",
            "campaign",
            "--patients",
            "2",
            "--controllers",
            "rule,recipe",
            "--seed",
            "3",
            "--days",
            "2",
            "--workers",
            "2",
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
    )


# ------------------------------------------------------------------ pure functions


def test_parse_controllers_canonical_order_and_errors() -> None:
    assert parse_controllers("oracle, rule,recipe") == ("recipe", "rule", "oracle")
    with pytest.raises(ConfigError, match="Did you mean 'hybrid-mpc'"):
        parse_controllers("recipe,hybrid_mpc")
    with pytest.raises(ConfigError, match="twice"):
        parse_controllers("rule,rule")
    with pytest.raises(ConfigError, match="empty"):
        CampaignSpec(patients=1, controllers=(), seed=0, days=1.0)


def _run_row(controller: str, patient: str, cells: float, dose_day: float | None) -> dict:
    return {
        "controller": controller,
        "patient": patient,
        "cells_at_harvest": cells,
        "primary_objective": min(1.0, cells / 15.0),
        "dose_reached_by_harvest": dose_day is not None,
        "days_to_dose": dose_day,
        "viability_at_harvest": 0.9,
        "lactate_time_in_spec": 1.0,
        "glucose_time_in_spec": 0.5,
        "media_used": 2.0,
        "hard_constraint_violations": 0 if controller != "recipe" else 3,
        "mpc_failures": None if controller == "recipe" else 1,
    }


def test_summary_metrics_and_ratio_to_oracle() -> None:
    runs = pd.DataFrame(
        [
            _run_row("oracle", "A", 18.0, 7.0),
            _run_row("oracle", "B", 16.0, 7.5),
            _run_row("recipe", "A", 30.0, 6.0),
            _run_row("recipe", "B", 6.0, None),
        ]
    )
    table = summarize_campaign(runs).set_index("controller")
    assert list(table.index) == ["recipe", "oracle"]  # canonical order
    recipe, oracle = table.loc["recipe"], table.loc["oracle"]
    assert oracle["primary_objective"] == pytest.approx(1.0)
    assert recipe["primary_objective"] == pytest.approx((1.0 + 0.4) / 2)
    assert recipe["primary_ratio_to_oracle"] == pytest.approx(0.7)
    assert oracle["primary_ratio_to_oracle"] == pytest.approx(1.0)
    assert recipe["dose_attainment"] == pytest.approx(0.5)
    assert recipe["days_to_dose_median"] == pytest.approx(6.0)
    assert oracle["days_to_dose_median"] == pytest.approx(7.25)
    assert recipe["cells_at_harvest_cv"] == pytest.approx(np.std([30, 6], ddof=1) / 18.0)
    assert recipe["hard_violation_steps"] == 6 and recipe["patients_with_hard_violations"] == 2
    assert math.isnan(recipe["mpc_failures"]) and oracle["mpc_failures"] == 2


def test_targets_are_judged_from_the_table() -> None:
    runs = pd.DataFrame(
        [
            _run_row("oracle", "A", 18.0, 7.0),
            _run_row("oracle", "B", 16.0, 7.5),
            _run_row("hybrid-mpc", "A", 17.0, 7.2),
            _run_row("hybrid-mpc", "B", 15.5, 7.9),
            _run_row("recipe", "A", 30.0, 6.0),
            _run_row("recipe", "B", 6.0, None),
        ]
    )
    verdicts = {name: met for name, met, _ in check_targets(summarize_campaign(runs))}
    assert verdicts["hybrid MPC >= 95 % of the oracle on the primary objective"] is True
    assert verdicts["hybrid MPC beats recipe on dose attainment (higher)"] is True
    assert verdicts["hybrid MPC beats recipe on CV of cells at harvest (lower)"] is True
    assert verdicts["hybrid MPC beats mechanistic-mpc on dose attainment (higher)"] is None
    assert verdicts["hybrid MPC: zero hard-constraint violations"] is True


def _paired_runs(hybrid: list[float], other: list[float]) -> pd.DataFrame:
    rows = []
    for c, cells in (("hybrid-mpc", hybrid), ("mechanistic-mpc", other)):
        for i, x in enumerate(cells):
            rows.append(_run_row(c, f"P{i:03d}", x, 7.0 if x >= 15.0 else None))
    return pd.DataFrame(rows)


def test_paired_comparison_tells_a_difference_from_the_luck_of_the_cohort() -> None:
    # twelve patients: the hybrid MPC reaches the dose on all, the other on none, and the
    # hybrid's cells are tight where the other's spread: both a difference
    hybrid = [16.0 + 0.1 * (i % 3) for i in range(12)]
    other = [6.0 + 1.5 * i for i in range(12)]
    other = [min(x, 14.9) for x in other]
    comp = paired_comparisons(_paired_runs(hybrid, other))
    row = comp.set_index("controller").loc["mechanistic-mpc"]
    assert row["patients"] == 12
    assert (row["dose_only_hybrid"], row["dose_only_other"]) == (12, 0)
    assert row["dose_sign_test_p"] == pytest.approx(2 * 0.5**12)
    cv_h = np.std(hybrid, ddof=1) / np.mean(hybrid)
    cv_o = np.std(other, ddof=1) / np.mean(other)
    assert row["cv_difference"] == pytest.approx(cv_h - cv_o)
    assert row["cv_difference_low"] <= row["cv_difference"] <= row["cv_difference_high"] < 0
    assert 0 < row["primary_difference_low"] <= row["primary_difference"]
    verdicts = {
        n: d for n, _, d in check_targets(summarize_campaign(_paired_runs(hybrid, other)), comp)
    }
    assert (
        "(a difference)" in verdicts["hybrid MPC beats mechanistic-mpc on dose attainment (higher)"]
    )
    # the same runs give the same table (fixed bootstrap seed)
    pd.testing.assert_frame_equal(comp, paired_comparisons(_paired_runs(hybrid, other)))


def test_paired_comparison_of_days_to_dose_and_media() -> None:
    # ten patients; the hybrid MPC reaches the dose about half a day sooner on the nine that
    # reach it under both, and on a tenth the other never does (left out of days to dose);
    # it uses about a litre less media on every patient
    rows = []
    sooner, less = [], []
    for i in range(10):
        jitter = 0.05 if i % 2 else -0.05
        other_day = 6.5 + 0.1 * i if i < 9 else None
        hybrid_day = 6.0 + 0.1 * i + jitter if i < 9 else 7.9
        h = _run_row("hybrid-mpc", f"P{i:03d}", 16.0, hybrid_day) | {"media_used": 4.0 + jitter}
        o = _run_row("mechanistic-mpc", f"P{i:03d}", 16.0 if i < 9 else 14.0, other_day)
        o["media_used"] = 5.0 + 0.1 * i
        rows += [h, o]
        less.append(h["media_used"] - o["media_used"])
        if i < 9:
            sooner.append(hybrid_day - other_day)
    row = paired_comparisons(pd.DataFrame(rows)).set_index("controller").loc["mechanistic-mpc"]
    assert row["days_to_dose_difference"] == pytest.approx(np.mean(sooner))
    assert row["days_to_dose_difference_low"] <= row["days_to_dose_difference"]
    assert row["days_to_dose_difference"] <= row["days_to_dose_difference_high"] < 0
    assert row["media_difference"] == pytest.approx(np.mean(less))
    assert row["media_difference_low"] <= row["media_difference"]
    assert row["media_difference"] <= row["media_difference_high"] < 0


def test_paired_comparison_one_patient_apart_is_a_tie() -> None:
    # 50 patients, one apart on the dose and the cells otherwise the same: the cohort cannot
    # tell them apart, though the table's "beats" would say so
    base = [12.0 + 0.25 * i for i in range(50)]
    hybrid = list(base)
    other = list(base)
    i = next(k for k, x in enumerate(base) if x >= 15.0)
    other[i] = 14.9
    runs = _paired_runs(hybrid, other)
    row = paired_comparisons(runs).set_index("controller").loc["mechanistic-mpc"]
    assert (row["dose_only_hybrid"], row["dose_only_other"]) == (1, 0)
    assert row["dose_sign_test_p"] == pytest.approx(1.0)
    assert row["cv_difference_low"] <= 0 <= row["cv_difference_high"]
    targets = {
        n: (m, d) for n, m, d in check_targets(summarize_campaign(runs), paired_comparisons(runs))
    }
    met, detail = targets["hybrid MPC beats mechanistic-mpc on dose attainment (higher)"]
    assert met is True and "not distinguishable from a tie" in detail
    # without the hybrid MPC there is nothing to compare
    assert paired_comparisons(runs[runs["controller"] != "hybrid-mpc"]).empty


# ------------------------------------------------------------------ campaigns on Ray


def test_same_seed_gives_the_same_table(tmp_path: Path, local_ray: None) -> None:
    """The CLI (its own local Ray, 2 workers) and the API (the shared Ray) give identical
    summaries and per-patient tables for the same seed."""
    proc = _run_cli(tmp_path / "cli")
    assert proc.returncode == 0, proc.stderr
    assert "4 runs (4 run now, 0 already complete)" in proc.stdout
    result = run_campaign(TINY, tmp_path / "api", workers=2)
    assert result.executed == 4 and result.skipped == 0
    for name in ("summary.csv", "patients/recipe.csv", "patients/rule.csv"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()
    summary = pd.read_csv(tmp_path / "api" / "summary.csv")
    assert list(summary["controller"]) == ["recipe", "rule"]
    assert (summary["patients"] == 2).all()
    assert summary["cells_at_harvest_mean"].gt(0).all()
    assert summary["viability_at_harvest_mean"].between(0, 1).all()
    assert (tmp_path / "api" / "distributions.png").stat().st_size > 0
    assert "| recipe | 2 |" in (tmp_path / "api" / "summary.md").read_text()
    # every run left a batch record hmpc fit can read
    for controller in ("recipe", "rule"):
        for i in range(2):
            run = tmp_path / "api" / "runs" / controller / f"S3-P{i:03d}"
            assert {"trajectory.csv", "assays.csv", "summary.json"} <= {
                p.name for p in run.iterdir()
            }


def test_resume_runs_only_what_is_missing(tmp_path: Path, local_ray: None) -> None:
    first = run_campaign(TINY, tmp_path, workers=2)
    before = (tmp_path / "summary.csv").read_bytes()
    # an interrupted run: no completion marker
    (tmp_path / "runs" / "rule" / "S3-P001" / "summary.json").unlink()
    again = run_campaign(TINY, tmp_path, workers=1)
    assert (again.executed, again.skipped) == (1, 3)
    assert (tmp_path / "summary.csv").read_bytes() == before
    pd.testing.assert_frame_equal(first.summary, again.summary)
    done = run_campaign(TINY, tmp_path, workers=1)
    assert (done.executed, done.skipped) == (0, 4)


def test_manifest_refuses_other_arguments(tmp_path: Path, local_ray: None) -> None:
    run_campaign(TINY, tmp_path, workers=2)
    other = CampaignSpec(patients=3, controllers=("recipe", "rule"), seed=3, days=2.0)
    with pytest.raises(ConfigError, match=r"patients=2 there, 3 now.*new --out"):
        run_campaign(other, tmp_path, workers=2)
    # the CLI says the same in one line, without a traceback
    proc = _run_cli(tmp_path, "--historical", "4")  # same results-relevant arguments: ok
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sim.cli",
            "campaign",
            "--patients",
            "2",
            "--controllers",
            "recipe",
            "--seed",
            "3",
            "--days",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "other arguments" in proc.stderr and "Traceback" not in proc.stderr


def test_truth_file_sets_the_plant_and_is_part_of_the_manifest(
    tmp_path: Path, local_ray: None
) -> None:
    """``--truth``: every run is simulated on that plant. Under the fixed recipe (open loop,
    the same inputs on both plants) stronger lactate inhibition can only slow growth, so no
    patient ends with more cells; a folder of one plant refuses to resume with the other,
    and a bad file is refused before anything is written."""
    strong = Path(__file__).parents[2] / "plant_models" / "data" / "tcell_truth_lactate20.toml"
    base = CampaignSpec(patients=3, controllers=("recipe",), seed=3, days=8.0)
    default = run_campaign(base, tmp_path / "default", workers=2)
    stronger = run_campaign(
        dataclasses.replace(base, truth=str(strong)), tmp_path / "strong", workers=2
    )
    a = default.runs.set_index("patient")["cells_at_harvest"]
    b = stronger.runs.set_index("patient")["cells_at_harvest"]
    assert (b <= a * (1 + 1e-9)).all() and (b < 0.99 * a).any(), (a, b)
    assert "--truth " in (tmp_path / "strong" / "summary.md").read_text()
    with pytest.raises(ConfigError, match=r"truth_sha256=None there"):
        run_campaign(dataclasses.replace(base, truth=str(strong)), tmp_path / "default")
    bad = tmp_path / "bad.toml"
    bad.write_text(strong.read_text().replace("lactate_inhibition_hill", "lactate_hill"))
    with pytest.raises(ConfigError, match="lactate_hill"):
        run_campaign(dataclasses.replace(base, truth=str(bad)), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_historical_residual_is_trained_on_disjoint_patients(
    tmp_path: Path, local_ray: None
) -> None:
    spec = CampaignSpec(
        patients=2, controllers=("hybrid-mpc",), seed=3, days=3.0, historical_patients=3
    )
    pool = _Pool(2, None)
    path = train_historical_residual(spec, tmp_path, pool)
    gp = GPResidual.load(path)
    assert gp.is_fitted and gp.n_observations_ > 0
    records = sorted(p.name for p in (tmp_path / "historical").iterdir() if p.name != "fit")
    assert records == [f"S{spec.historical_seed}-P{i:03d}" for i in range(3)]
    held_out = {spec.seed * COHORT_STRIDE + i for i in range(spec.patients)}
    historical = {spec.historical_seed * COHORT_STRIDE + i for i in range(3)}
    assert not held_out & historical
    # resumable: an existing residual is kept, not re-fitted
    stamp = path.stat().st_mtime_ns
    assert train_historical_residual(spec, tmp_path, pool) == path
    assert path.stat().st_mtime_ns == stamp
    # a residual of the other kind (copied in from a campaign without --hybrid-adapt) is
    # refused: the adapted hybrid MPC needs one fitted against adapted models
    adapt = dataclasses.replace(spec, hybrid_adapt=True)
    with pytest.raises(ConfigError, match="with a batch effect.*--adapt auto"):
        train_historical_residual(adapt, tmp_path, pool)
    # a residual this hmpc cannot read (another version) is refused, not silently re-fitted
    path.write_bytes(b"not a residual")
    with pytest.raises(ConfigError, match="new --out"):
        train_historical_residual(spec, tmp_path, pool)


@pytest.mark.slow
def test_oracle_ratio_on_a_short_mpc_campaign(tmp_path: Path, local_ray: None) -> None:
    spec = CampaignSpec(patients=1, controllers=("recipe", "oracle"), seed=5, days=0.5)
    result = run_campaign(spec, tmp_path, workers=2)
    table = result.summary.set_index("controller")
    assert table.loc["oracle", "primary_ratio_to_oracle"] == pytest.approx(1.0)
    assert table.loc["recipe", "primary_ratio_to_oracle"] > 0
    assert table.loc["oracle", "hard_violation_steps"] == 0
    runs = pd.read_csv(tmp_path / "patients" / "oracle.csv")
    assert runs.loc[0, "mpc_steps"] == 12


@pytest.mark.slow
def test_hybrid_adapt_campaign_fits_patient_parameters(tmp_path: Path, local_ray: None) -> None:
    """``--hybrid-adapt``: the residual comes from ``hmpc fit --adapt auto`` (no batch
    effect) and the hybrid MPC fits the running batch's patient parameters; the manifest
    records it, so a campaign folder never mixes the two."""
    import json

    spec = CampaignSpec(
        patients=1,
        controllers=("hybrid-mpc",),
        seed=3,
        days=2.0,
        historical_patients=3,
        hybrid_adapt=True,
    )
    result = run_campaign(spec, tmp_path, workers=2)
    assert len(result.runs) == 1
    manifest = json.loads((tmp_path / "campaign.json").read_text())
    assert manifest["hybrid_patient_parameters"] == [
        "mu_max",
        "exhaustion_threshold",
        "lag_time",
    ]
    assert "--adapt auto" in manifest["hybrid_residual"]
    assert not GPResidual.load(tmp_path / "residual.npz").has_batch_effect
    fit = json.loads((tmp_path / "historical" / "fit" / "validation.json").read_text())
    assert [p["name"] for p in fit["adapted_parameters"]] == manifest["hybrid_patient_parameters"]
    summary_md = (tmp_path / "summary.md").read_text()
    assert "--hybrid-adapt" in summary_md
    assert HYBRID_ADAPT_RESIDUAL_SOURCE in summary_md
    plain = CampaignSpec(
        patients=1, controllers=("hybrid-mpc",), seed=3, days=2.0, historical_patients=3
    )
    with pytest.raises(ConfigError, match="hybrid_patient_parameters"):
        run_campaign(plain, tmp_path, workers=2)


# ------------------------------------------------------------------ failures and results


def test_runs_take_no_path_and_send_their_files_back(tmp_path: Path) -> None:
    """A run is given no path of the driver's: the tuning and residual arrive as bytes, and
    its files come back compressed for the driver to write (here: without Ray at all)."""
    import inspect
    import zlib

    from sim.campaign import RunOutput, run_one, write_run
    from sim.patients import PatientCohort

    params = inspect.signature(run_one).parameters
    assert not {"out", "folder", "path"} & set(params)
    patient = next(iter(PatientCohort(1, 3)))
    output = run_one("rule", patient, 0, 3 * COHORT_STRIDE, 1.0, 1.0, b"", None)
    assert isinstance(output, RunOutput)
    names = [name for name, _ in output.files]
    assert names == ["record.toml", "assays.csv", "trajectory.csv", "summary.json"]
    raw = sum(len(zlib.decompress(data)) for _, data in output.files)
    assert output.compressed_bytes < raw / 2  # compressed
    write_run(tmp_path, output)
    trajectory = pd.read_csv(tmp_path / "trajectory.csv")
    assert len(trajectory) == 25 and trajectory.columns[0].startswith("time")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left no temporary file


def test_pool_retries_a_failed_run_once_then_records_it(
    tmp_path: Path, local_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job that fails once is retried and its result arrives; one that fails every time
    is returned with its traceback after the second attempt, never dropped; the progress
    bar counts them."""
    marker = tmp_path / "attempted"

    def flaky(n: int) -> int:
        # fails on its first attempt only (the marker survives the worker)
        if not marker.exists():
            marker.touch()
            raise RuntimeError("first attempt fails")
        return n * 10

    def broken(n: int) -> int:
        raise ValueError(f"run {n} cannot work")

    pool = _Pool(2, None)
    results: dict[str, int] = {}
    failures = pool.run(
        [("flaky/a", {"n": 1})],
        desc="test",
        total=1,
        done=0,
        on_result=results.__setitem__,
        function=flaky,
    )
    assert failures == [] and results == {"flaky/a": 10}
    failures = pool.run(
        [("broken/b", {"n": 2}), ("flaky/c", {"n": 3})],
        desc="test",
        total=2,
        done=0,
        on_result=results.__setitem__,
        function=broken,
    )
    assert results == {"flaky/a": 10}  # nothing of the broken jobs
    assert sorted(f.label for f in failures) == ["broken/b", "flaky/c"]
    (b, _) = sorted(failures, key=lambda f: f.label)
    assert b.attempts == 2
    assert b.error == "ValueError: run 2 cannot work"
    assert b.traceback.count("Traceback (most recent call last)") == 1
    assert "in broken" in b.traceback and 'raise ValueError(f"run {n}' in b.traceback
    err = capsys.readouterr().err
    assert "failed=2" in err and "retried=" in err


def test_failed_runs_go_to_failures_csv_and_the_others_are_kept(
    tmp_path: Path, local_ray: None
) -> None:
    """A run that fails on the node (here the oracle's solver, allowed one iteration with
    ``on_failure = "raise"``) is tried twice, then listed in failures.csv with the node's
    traceback; the other runs are saved and no summary is written over a partial cohort.
    A later successful call removes failures.csv."""
    from plant_models.errors import HmpcError

    config = Path(__file__).parents[2] / "configs" / "mpc_tcell_hourly.toml"
    strict = tmp_path / "strict.toml"
    strict.write_text(
        config.read_text()
        .replace('on_failure = "shift"', 'on_failure = "raise"')
        .replace("max_iter = 300", "max_iter = 1")
    )
    spec = CampaignSpec(
        patients=1, controllers=("recipe", "oracle"), seed=3, days=0.5, mpc_config=str(strict)
    )
    out = tmp_path / "campaign"
    with pytest.raises(HmpcError, match=r"1 of 2 runs failed twice.*failures\.csv"):
        run_campaign(spec, out, workers=2)
    failures = pd.read_csv(out / "failures.csv")
    assert list(failures["run"]) == ["oracle/S3-P000"]
    assert list(failures["attempts"]) == [2]
    assert "SolverFailedError" in failures.loc[0, "error"]
    assert "Traceback (most recent call last)" in failures.loc[0, "traceback"]
    assert "SolverFailedError" in failures.loc[0, "traceback"]
    assert (out / "runs" / "recipe" / "S3-P000" / "summary.json").exists()
    assert not (out / "runs" / "oracle" / "S3-P000").exists()
    assert not (out / "summary.csv").exists()
    # the baseline alone in another folder: no failures, no failures.csv
    ok = run_campaign(dataclasses.replace(spec, controllers=("recipe",)), tmp_path / "ok")
    assert ok.executed == 1 and not (tmp_path / "ok" / "failures.csv").exists()


def test_result_overhead_bench_prints_its_parts(local_ray: None) -> None:
    """``hmpc-sim bench campaign-results``' figures: sizes and the three timed parts (no
    claim about their values: the machine is shared)."""
    from sim.bench_campaign import measure_result_overhead
    from sim.campaign import run_one
    from sim.patients import PatientCohort

    patient = next(iter(PatientCohort(1, 1)))
    output = run_one("rule", patient, 0, COHORT_STRIDE, 1.0, 1.0, b"", None)
    figures = measure_result_overhead(output, repeats=3, address=None)
    assert 0 < figures["compressed_bytes"] < figures["raw_bytes"]
    for key in ("compress_s", "write_s", "task_with_files_median_s", "task_empty_median_s"):
        assert figures[key] > 0, key
    assert figures["ray_nodes"] == 1 and figures["task_on_another_node"] is False
    assert ray.is_initialized()  # the shared instance was used, not shut down


def test_runtime_env_option_takes_a_json_object() -> None:
    from sim.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["campaign", "--out", "x", "--runtime-env", '{"py_modules": ["sim"]}'])
    assert args.runtime_env == {"py_modules": ["sim"]}
    for bad in ('["sim"]', "{py_modules: sim}"):
        with pytest.raises(SystemExit):
            parser.parse_args(["campaign", "--out", "x", "--runtime-env", bad])


def test_runs_in_flight_follow_the_cluster(local_ray: None) -> None:
    """At most ``--workers`` runs at once, and never more than the cluster's CPUs (read
    again while a campaign runs: a node may join)."""
    assert _Pool(1, None).in_flight == 1
    assert _Pool(None, None).in_flight == 2
    assert _Pool(8, None).in_flight == 2
