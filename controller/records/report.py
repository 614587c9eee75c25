"""The batch report: ``hmpc report --batch ID --out DIR`` writes ``DIR/report.html`` (one
self-contained file: plots embedded as PNG, styles inline, no scripts, no external
resources) and exports the batch's tables to ``DIR/<table>.csv`` and ``DIR/<table>.parquet``.

What a process engineer reads at a glance, per unit: the state trajectories (estimates with
their uncertainty band, measurements accepted and rejected, MPC predictions with their
bands at a few steps, limits), the setpoints written and requested within their bounds, the
solver's health (status, iterations, solve time, fallbacks), the estimator's model-mismatch
diagnostic (innovation statistics, probe gains), the alarms and events, the
printer timeline, and the audit trail of the batch with the chain's verification.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from controller.records.audit import (
    AuditRecord,
    AuditTrail,
    AuditVerification,
    RecordVerification,
    verify_records,
)
from controller.records.historian import Historian, canonical_json, default_url
from controller.records.steps import EventRecord, StepRecord
from plant_models.errors import HistorianError

__all__ = ["EXPORTED_TABLES", "VerificationFailed", "add_report_parser", "write_report"]


class VerificationFailed(HistorianError):
    """The batch's records or the audit trail failed verification: no report is written
    (``hmpc report --flagged`` writes one marked as failed)."""


log = logging.getLogger(__name__)

#: Tables exported next to the report (CSV and Parquet each).
EXPORTED_TABLES = ("steps", "measurements", "setpoints", "predictions", "events", "audit")
#: MPC plans drawn on the trajectory plots (evenly spaced over the batch).
PLANS_SHOWN = 4

_SEVERITY_COLOURS = {"info": "#1f77b4", "warning": "#ff7f0e", "alarm": "#d62728"}
_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #2a7a2a; font-weight: bold; } .bad { color: #c00; font-weight: bold; }
.warning { background: #fff4e0; } .alarm { background: #fde0e0; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
.small { color: #666; font-size: 0.85em; }
"""


# ------------------------------------------------------------------------------ helpers


def _days(hours: Sequence[float]) -> list[float]:
    return [h / 24.0 for h in hours]


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _stamp(wall_time: float) -> str:
    if not math.isfinite(wall_time):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(wall_time)) + "Z"


def _table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] = ()
) -> str:
    out = ["<table><tr>", *(f"<th>{html.escape(h)}</th>" for h in header), "</tr>"]
    for k, row in enumerate(rows):
        cls = f' class="{classes[k]}"' if k < len(classes) and classes[k] else ""
        out.append(f"<tr{cls}>")
        for cell in row:
            num = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            out.append(f"<td{' class=num' if num else ''}>{html.escape(_fmt(cell))}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _png(fig: Any) -> str:
    """The figure as an embedded ``<img>`` (PNG, base64)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Any, alt: str, plot_id: str) -> str:
    return (
        f'<img class="plot" id="{html.escape(plot_id)}" alt="{html.escape(alt)}" '
        f'src="data:image/png;base64,{_png(fig)}">'
    )


def _figure(rows: int, cols: int, height: float) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2 * cols, height * rows), constrained_layout=True)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _limits(events: Sequence[EventRecord]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """State limits and input bounds of the latest ``config`` event (see
    :func:`controller.records.historian.config_event`)."""
    state: dict[str, dict[str, Any]] = {}
    inputs: dict[str, Any] = {}
    for e in events:
        if e.kind == "config":
            state = dict(e.data.get("state_limits", state))
            inputs = dict(e.data.get("input_bounds", inputs))
    return state, inputs


def _plans(steps: Sequence[StepRecord]) -> list[StepRecord]:
    """Up to :data:`PLANS_SHOWN` steps with predictions, evenly spaced."""
    with_plan = [s for s in steps if s.predictions.get("time_h")]
    if len(with_plan) <= PLANS_SHOWN:
        return with_plan
    idx = {round(k * (len(with_plan) - 1) / (PLANS_SHOWN - 1)) for k in range(PLANS_SHOWN)}
    return [with_plan[i] for i in sorted(idx)]


# ------------------------------------------------------------------------------ plots


def _trajectory_plot(
    unit: str, steps: Sequence[StepRecord], limits: Mapping[str, Mapping[str, Any]]
) -> str:
    names = list(dict.fromkeys(n for s in steps for n in s.estimate))
    measured = {m.name for s in steps for m in s.measurements}
    names += sorted(n for n in measured if n not in names)
    if not names:
        return "<p>No estimates or measurements recorded.</p>"
    cols = 2
    rows = math.ceil(len(names) / cols)
    fig, axes = _figure(rows, cols, 2.6)
    t = _days([s.process_time_h for s in steps])
    units = {m.name: m.unit for s in steps for m in s.measurements}
    plans = _plans(steps)
    colours = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    for ax, name in zip(axes, names, strict=False):
        est = [s.estimate.get(name, math.nan) for s in steps]
        sd = [s.estimate_std.get(name, 0.0) for s in steps]
        span: list[float] = _finite(est)
        if _finite(est):
            ax.plot(t, est, color="black", lw=1.4, label="estimate")
            lo = [e - 2 * d for e, d in zip(est, sd, strict=True)]
            hi = [e + 2 * d for e, d in zip(est, sd, strict=True)]
            if any(d > 0 for d in _finite(sd)):
                ax.fill_between(t, lo, hi, color="grey", alpha=0.3, label="estimate ±2σ")
                span += _finite(lo) + _finite(hi)
        for k, plan in enumerate(plans):
            pt = _days(plan.predictions["time_h"])
            pv = plan.predictions.get(name)
            if not pv or not _finite(pv):
                continue
            colour = colours[k % len(colours)]
            label = "MPC plans (±2σ)" if k == 0 else None
            ax.plot(pt, pv, ls="--", lw=1.0, color=colour, label=label)
            psd = plan.predictions.get(f"{name}_std", ())
            if len(psd) == len(pv) and any(v > 0 for v in _finite(psd)):
                lo = [v - 2 * d for v, d in zip(pv, psd, strict=True)]
                hi = [v + 2 * d for v, d in zip(pv, psd, strict=True)]
                ax.fill_between(pt, lo, hi, color=colour, alpha=0.15)
            span += _finite(pv)
        acc = [
            (m.sample_time_h / 24.0, m.value, m.source)
            for s in steps
            for m in s.measurements
            if m.name == name and m.accepted
        ]
        rej = [
            (m.sample_time_h / 24.0, m.value)
            for s in steps
            for m in s.measurements
            if m.name == name and not m.accepted
        ]
        online = [(x, y) for x, y, src in acc if src != "assay"]
        assays = [(x, y) for x, y, src in acc if src == "assay"]
        if online:
            ax.plot(*zip(*online, strict=True), ".", ms=4, color="#1f77b4", label="online")
        if assays:
            ax.plot(*zip(*assays, strict=True), "D", ms=5, color="#ff7f0e", label="assay")
        span += _finite([y for _, y, _ in acc])
        lim = limits.get(name, {})
        for key, style, colour in (
            ("low", "-", "#d62728"),
            ("high", "-", "#d62728"),
            ("low_soft", "--", "#ff7f0e"),
            ("high_soft", "--", "#ff7f0e"),
        ):
            value = lim.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                hard = "soft" not in key
                ax.axhline(
                    value,
                    ls=style,
                    lw=1.0,
                    color=colour,
                    label=f"{'hard' if hard else 'soft'} limit",
                )
                span.append(float(value))
        if span:
            low, high = min(span), max(span)
            pad = 0.08 * (high - low) if high > low else max(abs(high) * 0.1, 1.0)
            ax.set_ylim(low - pad, high + pad)
            if rej:
                # rejected readings (even non-finite or far off) at the plot's edge
                edge = high + pad * 0.5
                clip = [
                    (x, min(max(y, low - pad * 0.5), edge) if math.isfinite(y) else edge)
                    for x, y in rej
                ]
                ax.plot(*zip(*clip, strict=True), "x", ms=6, color="#d62728", label="rejected")
        ax.set_title(f"{unit}: {name}", fontsize=10)
        ax.set_ylabel(units.get(name, ""))
        ax.set_xlabel("culture age [d]")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    return _img(fig, f"{unit} trajectories with MPC predictions", f"trajectories-{unit}")


def _setpoint_plot(unit: str, steps: Sequence[StepRecord], bounds: Mapping[str, Any]) -> str:
    names = list(dict.fromkeys(sp.name for s in steps for sp in s.setpoints))
    if not names:
        return "<p>No setpoints recorded.</p>"
    fig, axes = _figure(len(names), 1, 2.0)
    t = _days([s.process_time_h for s in steps])
    for ax, name in zip(axes, names, strict=True):
        value, requested, unit_name, failed = [], [], "", []
        for s, day in zip(steps, t, strict=True):
            sp = next((p for p in s.setpoints if p.name == name), None)
            value.append(sp.value if sp else math.nan)
            requested.append(sp.requested if sp else math.nan)
            if sp:
                unit_name = sp.unit
                if sp.status != "Good":
                    failed.append((day, sp.value))
        ax.step(t, value, where="post", color="#1f77b4", lw=1.4, label="written")
        ax.step(t, requested, where="post", color="#7f7f7f", lw=1.0, ls=":", label="requested")
        if failed:
            ax.plot(*zip(*failed, strict=True), "x", color="#d62728", ms=7, label="not written")
        bound = bounds.get(name)
        if bound is not None and len(bound) == 2:
            for b in bound:
                ax.axhline(float(b), color="#d62728", lw=1.0, label="bound")
        ax.set_title(f"{unit}: {name}", fontsize=10)
        ax.set_ylabel(unit_name)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    axes[-1].set_xlabel("culture age [d]")
    return _img(fig, f"{unit} setpoints", f"setpoints-{unit}")


def _solver_plot(unit: str, steps: Sequence[StepRecord]) -> str:
    solved = [s for s in steps if s.solver]
    if not solved:
        return "<p>No optimiser results recorded (controller without an optimiser).</p>"
    fig, axes = _figure(3, 1, 1.9)
    t = _days([s.process_time_h for s in solved])
    ok = [bool(s.solver.get("success")) for s in solved]
    fallback = [bool(s.solver.get("fallback_used")) for s in solved]
    colours = ["#d62728" if not o else "#2ca02c" for o in ok]
    times = [float(s.solver.get("solve_time_s", math.nan)) for s in solved]
    iters = [float(s.solver.get("iterations", math.nan)) for s in solved]
    axes[0].scatter(t, times, c=colours, s=12)
    axes[0].set_ylabel("solve time [s]")
    axes[0].set_title(f"{unit}: solver health (green: success, red: failed)", fontsize=10)
    axes[1].scatter(t, iters, c=colours, s=12)
    axes[1].set_ylabel("iterations")
    statuses = sorted({str(s.solver.get("status", "")) for s in solved})
    lane = {st: k for k, st in enumerate(statuses)}
    axes[2].scatter(t, [lane[str(s.solver.get("status", ""))] for s in solved], c=colours, s=12)
    fb = [
        (d, lane[str(s.solver.get("status", ""))])
        for d, s, f in zip(t, solved, fallback, strict=True)
        if f
    ]
    if fb:
        axes[2].plot(*zip(*fb, strict=True), "s", mfc="none", mec="#ff7f0e", ms=9, label="fallback")
        axes[2].legend(fontsize=7, loc="best")
    axes[2].set_yticks(range(len(statuses)), statuses, fontsize=7)
    axes[2].set_ylim(-0.7, len(statuses) - 0.3)
    axes[2].set_xlabel("culture age [d]")
    for ax in axes:
        ax.grid(alpha=0.3)
    return _img(fig, f"{unit} solver health", f"solver-{unit}")


def _mismatch_section(unit: str, steps: Sequence[StepRecord]) -> str:
    """The estimator's model-mismatch diagnostic (controller.numerics.mismatch): each
    innovation statistic over its band's upper end (above 1: the model does not explain
    those measurements), the probe gains, and the alarms seen."""
    with_diag = [s for s in steps if s.diagnostics]
    if not with_diag:
        return "<p>No model-mismatch figures recorded (control law without an estimator).</p>"
    t = _days([s.process_time_h for s in with_diag])
    keys = sorted({k[4:] for s in with_diag for k in s.diagnostics if k.startswith("nis.")})
    gains = sorted({k[5:] for s in with_diag for k in s.diagnostics if k.startswith("gain.")})
    fig, axes = _figure(2, 1, 2.2)
    for key in keys:
        ratio = [
            s.diagnostics.get(f"nis.{key}", math.nan)
            / s.diagnostics.get(f"nis_high.{key}", math.nan)
            for s in with_diag
        ]
        axes[0].plot(t, ratio, lw=1.2, label=key)
    axes[0].axhline(1.0, color="#d62728", ls="--", lw=1, label="band (alarm above)")
    axes[0].set_ylabel("NIS / upper band")
    axes[0].set_title(f"{unit}: innovation statistics (windowed, chi-square band)", fontsize=10)
    for name in gains:
        gain = [s.diagnostics.get(f"gain.{name}", math.nan) for s in with_diag]
        axes[1].plot(t, gain, label=name)
    axes[1].axhline(1.0, color="grey", ls=":", lw=1)
    axes[1].set_ylabel("probe gain")
    axes[1].set_xlabel("culture age [d]")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for s in with_diag:
        for k in s.diagnostics:
            if k.startswith("alarm."):
                first.setdefault(k[6:], s.process_time_h)
                last[k[6:]] = s.process_time_h
    alarms = (
        _table(
            ["alarm", "first seen [h]", "last seen [h]"],
            [[k, first[k], last[k]] for k in sorted(first)],
            ["warning"] * len(first),
        )
        if first
        else "<p>No model-mismatch alarm.</p>"
    )
    return _img(fig, f"{unit} model mismatch", f"mismatch-{unit}") + alarms


def _timeline_plot(
    title: str, events: Sequence[EventRecord], plot_id: str, *, annotate: bool
) -> str:
    if not events:
        return "<p>No events.</p>"
    kinds = list(dict.fromkeys(e.kind for e in events))
    lanes = {k: i for i, k in enumerate(kinds)}
    fig, axes = _figure(1, 1, 0.5 + 0.45 * len(kinds) + (1.2 if annotate else 0.0))
    ax = axes[0]
    start = min(_finite([e.wall_time for e in events]), default=0.0)
    # process time where known, else the controller clock relative to the first event
    xs = [
        e.process_time_h / 24.0
        if math.isfinite(e.process_time_h)
        else (e.wall_time - start) / 86400.0
        for e in events
    ]
    ax.scatter(
        xs,
        [lanes[e.kind] for e in events],
        c=[_SEVERITY_COLOURS.get(e.severity, "#7f7f7f") for e in events],
        s=30,
        zorder=3,
    )
    if annotate:
        for k, (x, e) in enumerate(zip(xs, events, strict=True)):
            ax.annotate(
                e.message[:40],
                (x, lanes[e.kind]),
                xytext=(4, 8 + 10 * (k % 3)),
                textcoords="offset points",
                fontsize=7,
            )
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_ylim(-0.7, len(kinds) - 0.3 + (0.9 if annotate else 0.0))
    ax.set_xlabel("culture age [d]")
    ax.set_title(f"{title} (blue: info, orange: warning, red: alarm)", fontsize=10)
    ax.grid(alpha=0.3)
    return _img(fig, title, plot_id)


# ------------------------------------------------------------------------------ report


def _unit_summary(
    unit: str, steps: Sequence[StepRecord], events: Sequence[EventRecord]
) -> list[Any]:
    solved = [s for s in steps if s.solver]
    times = sorted(_finite([float(s.solver.get("solve_time_s", math.nan)) for s in solved]))
    success = sum(1 for s in solved if s.solver.get("success"))
    rejected = sum(1 for s in steps for m in s.measurements if not m.accepted)
    return [
        unit,
        len(steps),
        steps[0].process_time_h / 24.0 if steps else math.nan,
        steps[-1].process_time_h / 24.0 if steps else math.nan,
        f"{100.0 * success / len(solved):.1f} %" if solved else "",
        times[len(times) // 2] if times else math.nan,
        times[-1] if times else math.nan,
        sum(1 for s in solved if s.solver.get("fallback_used")),
        sum(1 for e in events if e.severity == "alarm"),
        rejected,
    ]


def _audit_section(records: Sequence[AuditRecord], check: AuditVerification, url: str) -> list[str]:
    out = ["<h2 id='audit'>Audit trail</h2>"]
    if check.ok:
        out.append(
            f"<p class='ok'>Hash chain intact: {check.records} records in the historian, head "
            f"#{check.head_seq} <code>{html.escape(check.head_hash)}</code>.</p>"
        )
    else:
        out.append(
            f"<p class='bad'>Hash chain TAMPERED: {len(check.issues)} problem(s); run "
            f"<code>hmpc audit verify --historian {html.escape(url)}</code>.</p><ul>"
        )
        out += [f"<li>{html.escape(str(i))}</li>" for i in check.issues[:50]]
        out.append("</ul>")
    counts: dict[str, int] = {}
    for r in records:
        counts[r.action] = counts.get(r.action, 0) + 1
    out.append("<h3>Records of this batch by action</h3>")
    out.append(_table(["action", "records"], sorted(counts.items())))
    shown = [r for r in records if r.action != "setpoint_write"]
    out.append(
        "<h3>Changes, logins and updates</h3><p class='small'>Setpoint writes are counted "
        "above and exported in audit.csv.</p>"
    )
    out.append(
        _table(
            ["#", "time", "user", "action", "target", "old", "new", "reason"],
            [
                [
                    r.seq,
                    _stamp(r.wall_time),
                    r.user,
                    r.action,
                    r.target,
                    canonical_json(r.old_value),
                    canonical_json(r.new_value),
                    r.reason,
                ]
                for r in shown[:500]
            ],
        )
    )
    return out


def _verification_banner(failures: Sequence[str], check: RecordVerification) -> list[str]:
    if not failures:
        anchored = (
            f", anchored head #{check.anchored_seq}"
            if check.anchored_seq is not None
            else " (no anchor given: a cut tail or a wiped historian is not detectable here)"
        )
        return [
            f"<p class='ok' id='verification'>Records verified: record chain of "
            f"{check.entries} entries intact, head #{check.head_seq}{anchored}.</p>"
        ]
    return [
        "<div id='verification' class='bad' style='border:3px solid #c00;padding:8px'>"
        f"<p>VERIFICATION FAILED: {len(failures)} problem(s). The records below may have "
        "been altered after they were written; do not use this report for release.</p><ul>",
        *[f"<li>{html.escape(f)}</li>" for f in failures[:100]],
        "</ul></div>",
    ]


def _audit_frame(records: Sequence[AuditRecord]) -> Any:
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "seq": r.seq,
                "wall_time": r.wall_time,
                "user": r.user,
                "action": r.action,
                "target": r.target,
                "old_value": canonical_json(r.old_value),
                "new_value": canonical_json(r.new_value),
                "reason": r.reason,
                "batch_id": r.batch_id,
                "unit": r.unit,
                "prev_hash": r.prev_hash,
                "hash": r.hash,
            }
            for r in records
        ],
        columns=[
            "seq",
            "wall_time",
            "user",
            "action",
            "target",
            "old_value",
            "new_value",
            "reason",
            "batch_id",
            "unit",
            "prev_hash",
            "hash",
        ],
    )


def _safe_state_section(events: Sequence[Any]) -> list[str]:
    """The plant's safe state on shed as checked at each engagement (the engagement events'
    ``fallback`` data: what the plant published and what the site file declared)."""
    rows = []
    classes = []
    for e in events:
        fallback = (e.data or {}).get("fallback") if isinstance(e.data, dict) else None
        if not (e.kind == "mode" and isinstance(fallback, dict)):
            continue
        for name, pair in fallback.items():
            plant, site = pair.get("plant"), pair.get("site")
            held = "held (none)" if plant is None else plant
            ok = site is None or (plant is not None and abs(plant - site) <= 1e-9)
            rows.append([e.process_time_h, name, held, "-" if site is None else site])
            classes.append("" if ok else "alarm")
    if not rows:
        return []
    return [
        "<h3>Safe state on shed (checked at engagement)</h3>",
        _table(["culture age [h]", "setpoint", "plant fallback", "site declares"], rows, classes),
    ]


def write_report(
    historian: Historian,
    batch_id: str,
    out_dir: str | Path,
    *,
    anchor: str | None = None,
    anchor_key: str | None = None,
    flag_failures: bool = False,
) -> Path:
    """Write ``report.html`` and the CSV/Parquet tables of ``batch_id`` into ``out_dir``,
    after verifying the audit trail and the batch's records (record chain, with ``anchor``
    when given).

    Returns:
        The report's path.
    Raises:
        VerificationFailed: verification failed and ``flag_failures`` is False (nothing is
            written). With ``flag_failures`` the report is written with a banner naming the
            failures at its top and a ``VERIFICATION_FAILED.txt`` beside it.
        ValueError: unknown batch (the message lists the known ones).
        HistorianError: the database cannot be read.
        OSError: the folder cannot be written.
    """
    tables = historian.to_dataframes(batch_id)  # raises for an unknown batch
    trail = AuditTrail(historian)
    check = trail.verify()
    records_check = verify_records(
        historian, batch_id=batch_id, anchor=anchor, anchor_key=anchor_key
    )
    failures = [f"audit trail: {i}" for i in check.issues] + list(records_check.issues)
    if failures and not flag_failures:
        raise VerificationFailed(
            f"batch {batch_id!r} in {historian.display_url} failed verification "
            f"({len(failures)} problem(s)); no report written:\n  "
            + "\n  ".join(failures[:50])
            + "\nInvestigate with `hmpc audit verify`; `hmpc report --flagged` writes a "
            "report marked as failed"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "VERIFICATION_FAILED.txt"
    if failures:
        marker.write_text("\n".join(failures) + "\n", encoding="utf-8")
    elif marker.exists():
        marker.unlink()
    all_steps = historian.steps(batch_id)
    all_events = historian.events(batch_id)
    walls = _finite([s.wall_time for s in all_steps] + [e.wall_time for e in all_events])
    records = trail.records(
        batch_id, since=min(walls, default=None), until=max(walls, default=None)
    )
    tables["audit"] = _audit_frame(records)
    for name in EXPORTED_TABLES:
        tables[name].to_csv(out / f"{name}.csv", index=False)
        tables[name].to_parquet(out / f"{name}.parquet", index=False)

    units = historian.units(batch_id)
    body: list[str] = [
        f"<h1>Batch report: {html.escape(batch_id)}</h1>",
        *_verification_banner(failures, records_check),
        f"<p class='small'>Historian {html.escape(historian.display_url)}; controller time "
        f"{_stamp(min(walls, default=math.nan))} to {_stamp(max(walls, default=math.nan))}; "
        f"written {_stamp(time.time())}. Tables: "
        + ", ".join(f"<code>{n}.csv</code>/<code>.parquet</code>" for n in EXPORTED_TABLES)
        + ".</p>",
        "<h2>Summary</h2>",
        _table(
            [
                "unit",
                "steps",
                "from [d]",
                "to [d]",
                "solver success",
                "median solve [s]",
                "max solve [s]",
                "fallbacks",
                "alarms",
                "rejected readings",
            ],
            [
                _unit_summary(
                    u, [s for s in all_steps if s.unit == u], [e for e in all_events if e.unit == u]
                )
                for u in units
            ],
        ),
    ]
    for unit in units:
        steps = [s for s in all_steps if s.unit == unit]
        events = [e for e in all_events if e.unit == unit]
        limits, bounds = _limits(events)
        body += [
            f"<h2 id='unit-{html.escape(unit)}'>Unit {html.escape(unit)}</h2>",
            "<h3>Trajectories, measurements and MPC predictions</h3>",
            _trajectory_plot(unit, steps, limits),
            "<h3>Setpoints</h3>",
            _setpoint_plot(unit, steps, bounds),
            "<h3>Solver health</h3>",
            _solver_plot(unit, steps),
            "<h3>Model mismatch</h3>",
            _mismatch_section(unit, steps),
            "<h3>Events</h3>",
            _timeline_plot(
                f"{unit}: events",
                [e for e in events if e.kind != "printer"],
                f"events-{unit}",
                annotate=False,
            ),
        ]
        body += _safe_state_section(events)
        notable = [e for e in events if e.severity in ("warning", "alarm") or e.kind == "fallback"]
        body.append("<h3>Fallbacks, faults and alarms</h3>")
        body.append(
            _table(
                ["culture age [h]", "time", "kind", "severity", "message"],
                [
                    [e.process_time_h, _stamp(e.wall_time), e.kind, e.severity, e.message]
                    for e in notable[:300]
                ],
                [e.severity if e.severity in ("warning", "alarm") else "" for e in notable[:300]],
            )
            if notable
            else "<p>None.</p>"
        )
    printer = [e for e in all_events if e.kind == "printer"]
    body += [
        "<h2 id='printer'>Printer timeline</h2>",
        _timeline_plot("printer", printer, "printer-timeline", annotate=True),
    ]
    if printer:
        body.append(
            _table(
                ["unit", "culture age [h]", "time", "severity", "message"],
                [
                    [e.unit, e.process_time_h, _stamp(e.wall_time), e.severity, e.message]
                    for e in printer
                ],
            )
        )
    body += _audit_section(records, check, historian.display_url)
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Batch {html.escape(batch_id)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    log.info("batch report of %s written to %s", batch_id, path)
    return path


# ------------------------------------------------------------------------------ command line


def add_report_parser(sub: Any) -> None:
    """Register ``hmpc report`` on the ``hmpc`` sub-command parser."""
    report = sub.add_parser(
        "report", help="batch report (report.html) and CSV/Parquet export of one batch"
    )
    report.add_argument("--batch", required=True, help="batch id")
    report.add_argument("--out", type=Path, required=True, help="folder to write into")
    report.add_argument(
        "--historian",
        default=None,
        help=f"historian URL (default $HMPC_HISTORIAN or {default_url()})",
    )
    report.add_argument(
        "--anchor", default=None, help="anchor file of the record chain (see hmpc audit verify)"
    )
    report.add_argument("--anchor-key", default=None, help="file with the anchor's HMAC key")
    report.add_argument(
        "--flagged",
        action="store_true",
        help="write the report even when verification fails, marked as failed",
    )
    report.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    with Historian(args.historian or default_url(), create=False) as hist:
        try:
            path = write_report(
                hist,
                args.batch,
                args.out,
                anchor=args.anchor,
                anchor_key=args.anchor_key,
                flag_failures=args.flagged,
            )
        except VerificationFailed as exc:
            print(f"hmpc report: REFUSED: {exc}")
            return 1
    if (Path(args.out) / "VERIFICATION_FAILED.txt").exists():
        print(f"hmpc report: VERIFICATION FAILED; {path} is marked as failed")
        return 1
    print(
        f"wrote {path} and {len(EXPORTED_TABLES)} tables as CSV and Parquet in {args.out} "
        f"({', '.join(EXPORTED_TABLES)})"
    )
    return 0
