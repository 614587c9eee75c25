"""Plots and files of a simulated batch: trajectory.csv (+ units sidecar), assays.csv,
summary.json and trajectory.png."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: files only, never a window
import matplotlib.pyplot as plt
import pandas as pd

__all__ = ["plot_trajectory", "write_batch"]


def record_toml(plugin: Any, process: Any) -> str:
    """``record.toml`` of a simulated batch: the process values it ran with that batch
    records declare (the plug-in's ``feed_composition`` and the start volume), so
    ``hmpc fit`` / ``hmpc calibrate`` can check them against the process they are given."""
    meta = {f.name: f.metadata for f in dataclasses.fields(process)}
    names = [*plugin.feed_composition, "initial_volume"]
    lines = ["# process values this batch ran with (hmpc-sim)", "[process]"]
    for name in names:
        if name in meta:
            value = float(getattr(process, name))
            unit = str(meta[name].get("unit", ""))
            lines.append(f'{name} = {{ value = {value!r}, unit = "{unit}" }}')
    return "\n".join(lines) + "\n"


def write_batch(
    df: pd.DataFrame,
    summary: dict[str, Any],
    out: Path,
    *,
    title: str,
    record: str | None = None,
) -> None:
    """Write the batch's files into ``out`` (created if needed); ``record``: the text of
    its ``record.toml`` (:func:`record_toml`)."""
    out.mkdir(parents=True, exist_ok=True)
    if record is not None:
        (out / "record.toml").write_text(record)
    units: dict[str, str] = df.attrs.get("units", {})
    header = [f"{c} [{units[c]}]" if c in units else c for c in df.columns]
    df.to_csv(out / "trajectory.csv", index=False, header=header, float_format="%.6g")
    (out / "trajectory.units.json").write_text(
        json.dumps({c: units.get(c, "") for c in df.columns}, indent=2) + "\n"
    )
    assays = df.attrs.get("assays")
    if isinstance(assays, pd.DataFrame):
        assays.to_csv(out / "assays.csv", index=False, float_format="%.6g")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_trajectory(df, summary, out / "trajectory.png", title=title)


def plot_trajectory(df: pd.DataFrame, summary: dict[str, Any], path: Path, *, title: str) -> None:
    """Six panels a process engineer reads at a glance: cells, viability, metabolites,
    the kinetic rates, and the manipulated inputs, with limits as dashed lines."""
    days = df["time"] / 24.0
    assays = df.attrs.get("assays")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    fig.suptitle(title)

    def assay(ax: Any, name: str, scale: float = 1.0) -> None:
        if isinstance(assays, pd.DataFrame) and len(assays):
            sel = assays[assays["name"] == name]
            if len(sel):
                ax.plot(
                    sel["sample_time"] / 24.0,
                    sel["value"] * scale,
                    "ko",
                    ms=4,
                    label="assay (at sample time)",
                )

    ax = axes[0, 0]
    ax.plot(days, df["viable_cells"], label="viable (true)")
    if "measured_viable_cells" in df:
        ax.plot(days, df["measured_viable_cells"], ".", ms=2, alpha=0.5, label="online probe")
    assay(ax, "viable_cells")
    ax.set_ylabel(f"viable cells [{df.attrs['units'].get('viable_cells', '')}]")
    ax.set_title(f"Fold expansion {summary['fold_expansion']:.1f}")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    ax.plot(days, df["total_viable_cells"], label="total viable cells")
    if "dose_cells" in summary:
        ax.axhline(summary["dose_cells"], ls="--", c="g", label="patient dose")
    ax.set_ylabel("total viable cells [1e9 cells]")
    ax2 = ax.twinx()
    ax2.plot(days, df["viability"] * 100.0, c="tab:red", label="viability")
    assay(ax2, "viability", 100.0)
    ax2.set_ylabel("viability [%]", color="tab:red")
    ax2.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[0, 2]
    ax.plot(days, df["glucose"], label="glucose")
    ax.plot(days, df["lactate"], label="lactate")
    assay(ax, "glucose")
    assay(ax, "lactate")
    for col, c in (("glutamine", "tab:purple"), ("ammonia", "tab:brown")):
        if col in df:
            ax.plot(days, df[col], c=c, label=col)
    styles = {
        "glucose_low_hard": ("tab:blue", "--"),
        "glucose_low_soft": ("tab:blue", ":"),
        "lactate_high_hard": ("tab:orange", "--"),
        "lactate_high_soft": ("tab:orange", ":"),
        "ammonia_high_hard": ("tab:brown", "--"),
    }
    for key, value in summary.get("limits", {}).items():
        if key in styles:  # the metabolite limits (not volume, not the upper glucose one)
            color, style = styles[key]
            ax.axhline(value, color=color, ls=style, lw=1)
    ax.set_ylabel("concentration [mM]")
    ax.set_title("Metabolites (dashed: hard, dotted: soft limits)")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    ax.plot(days, df["growth_rate"] * 24.0, label="growth")
    ax.plot(days, df["death_rate"] * 24.0, label="death")
    ax.set_ylabel("specific rate [1/d]")
    ax.set_title("True kinetic rates")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    units = df.attrs.get("units", {})
    for name in df.attrs.get("inputs", ()):
        ax.step(days, df[name], where="post", label=f"{name} [{units.get(name, '')}]")
    ax.set_title("Manipulated inputs")
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    if "il2" in df:
        ax.plot(days, df["il2"], label="IL-2 [IU/mL]")
    ax.plot(days, df["media_used"], label="media used [L]")
    ax.set_title(f"Hard-limit violations: {summary['hard_constraint_violations']} steps")
    ax.legend(fontsize=8)
    for a in axes.flat:
        a.set_xlabel("culture age [d]")
        a.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
