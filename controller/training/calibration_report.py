"""Files of ``hmpc calibrate``: the calibrated parameter file, the HTML report and its JSON.

* :func:`write_parameter_file`: a parameter TOML of the same form as the input (loadable by
  :func:`plant_models.config.load_parameters`): every parameter of the input file, the
  calibrated ones with their MAP values, their intervals in ``note`` and the source
  ``[calibration]``; ``[meta]`` says what was done and when, ``[sources]`` keeps the
  input's sources and adds the method (``calibration``) and one entry per data file with
  its SHA-256 (``data_1``, ...).
* :func:`write_report`: one self-contained HTML page (the batch report's style and figure
  helpers, :mod:`controller.records.report`): the estimates with their priors and
  intervals, the identifiability report, the profiles, the fits of the training batches,
  the 24 h-ahead check on the held-out batches, the data files.
* :func:`summary`: the figures as a JSON-ready dict (``calibration.json`` beside the report).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from controller.training.calibration import CHI2_95, CalibrationResult
from plant_models.config import ParameterFile, load_toml

__all__ = ["data_files", "file_sha256", "summary", "write_parameter_file", "write_report"]


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def data_files(record_paths: Sequence[str | Path]) -> list[dict[str, str]]:
    """Each record file and its ``assays.csv`` (when present) with their SHA-256."""
    out = []
    for p in record_paths:
        path = Path(p)
        entry = {"record": str(path), "sha256": file_sha256(path)}
        assays = path.with_name("assays.csv")
        if assays.exists():
            entry["assays"] = str(assays)
            entry["assays_sha256"] = file_sha256(assays)
        out.append(entry)
    return out


def _toml_string(text: str) -> str:
    # JSON's string escapes are valid TOML basic-string escapes
    return json.dumps(text, ensure_ascii=False)


def _toml_number(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"cannot write the non-finite number {value!r} to a parameter file")
    return repr(float(value))


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def write_parameter_file(
    path: str | Path,
    provenance: ParameterFile,
    result: CalibrationResult,
    files: Sequence[Mapping[str, str]],
    *,
    date: str,
    command: str,
) -> Path:
    """Write the calibrated parameter file (module docstring) and return its path.

    Args:
        provenance: the input parameter file (the priors' centres), as loaded.
        result: the calibration.
        files: :func:`data_files` of the training records.
        date: the calibration date (ISO), for ``[meta]`` and ``[sources]``.
        command: the command line, recorded in ``[sources] calibration``.
    """
    source_path = Path(provenance.path)
    data = load_toml(source_path)
    meta = data["meta"]
    table: Mapping[str, Any] = data["parameters"]
    calibrated = {e.name: e for e in result.estimates}
    settings = result.settings
    lines = [
        f"# Calibrated by `hmpc calibrate` on {date} from {source_path.name} and "
        f"{len(files)} batch record(s).",
        "# Each calibrated parameter's note holds its 95 % intervals (Laplace and profile",
        "# likelihood); docs/calibration.md describes the method.",
        "",
        "[meta]",
        f"model = {_toml_string(str(meta['model']))}",
        f"title = {_toml_string(str(meta['title']) + f' (calibrated {date})')}",
        "description = "
        + _toml_string(
            f"Maximum a posteriori calibration of {', '.join(settings.parameters)} to "
            f"{len(files)} batch record(s) on {date} (hmpc calibrate; initial states "
            f"{settings.initial}); the other parameters as in {source_path.name}."
        ),
    ]
    if "version" in meta:
        lines.append(f"version = {_toml_string(str(meta['version']))}")
    lines += ["", "[sources]"]
    for key, text in dict(data.get("sources", {})).items():
        lines.append(f"{key} = {_toml_string(str(text))}")
    data_keys = [f"data_{k + 1}" for k in range(len(files))]
    method = (
        f"hmpc calibrate on {date}: maximum a posteriori over {len(files)} batch record(s) "
        f"({', '.join(data_keys)}), initial states {settings.initial}, log-normal priors "
        f"centred on {source_path.name} (sha256 {file_sha256(source_path)}) with each "
        "parameter's declared range as ~95 % range; Levenberg-Marquardt with CasADi "
        "sensitivities; 95 % intervals from the Laplace approximation and the profile "
        f"likelihood (chi-square {CHI2_95:.2f}). Command: {command}"
    )
    lines.append(f"calibration = {_toml_string(method)}")
    for key, entry in zip(data_keys, files, strict=True):
        text = f"{entry['record']} sha256:{entry['sha256']}"
        if "assays" in entry:
            text += f"; {entry['assays']} sha256:{entry['assays_sha256']}"
        lines.append(f"{key} = {_toml_string(text)}")
    lines += ["", "[parameters]"]
    for name, entry in table.items():
        if name in calibrated:
            e = calibrated[name]
            note = (
                f"prior centre {_fmt(e.prior.centre)} (source: {entry['source']}), sd(ln) "
                f"{e.prior.sd_log:.3g}; 95 % Laplace [{_fmt(e.laplace[0])}, "
                f"{_fmt(e.laplace[1])}]"
            )
            if e.profile is not None:
                note += f", profile [{_fmt(e.profile[0])}, {_fmt(e.profile[1])}]"
                if e.profile_open:
                    note += f" (not closed: {e.profile_open})"
            if e.flat:
                note += f"; profile flat ({e.flat}): the data barely constrain it"
            fields = [
                f"value = {_toml_number(e.value)}",
                f"unit = {_toml_string(str(entry['unit']))}",
                f"source = {_toml_string('[calibration]')}",
                f"note = {_toml_string(note)}",
            ]
        else:
            fields = [
                f"value = {_toml_number(float(entry['value']))}",
                f"unit = {_toml_string(str(entry['unit']))}",
                f"source = {_toml_string(str(entry['source']))}",
            ]
            if "note" in entry:
                fields.append(f"note = {_toml_string(str(entry['note']))}")
        lines.append(f"{name} = {{ {', '.join(fields)} }}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.floating | np.integer):
        return _json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary(
    result: CalibrationResult,
    validation: Mapping[str, Any] | None,
    files: Sequence[Mapping[str, str]],
    *,
    process: str,
    parameter_file: str,
    date: str,
) -> dict[str, Any]:
    """The calibration's figures (``calibration.json``); non-finite numbers as None."""
    out: dict[str, Any] = {
        "process": process,
        "parameter_file": parameter_file,
        "date": date,
        "parameters": {
            e.name: {
                "value": e.value,
                "unit": e.prior.unit,
                "prior_centre": e.prior.centre,
                "prior_sd_log": e.prior.sd_log,
                "prior_range95": list(e.prior.range95),
                "sd_log": e.sd_log,
                "laplace95": list(e.laplace),
                "profile95": list(e.profile) if e.profile is not None else None,
                "profile_open": e.profile_open,
                "flat": e.flat,
                "at_bound": e.at_bound,
                "identifiable": e.identifiable,
            }
            for e in result.estimates
        },
        "correlation": result.correlation,
        "flagged_pairs": [list(p) for p in result.flagged_pairs],
        "flat_parameters": list(result.flat_parameters),
        "initial_states": result.settings.initial,
        "observations": result.observations,
        "chi2_per_observation": result.chi2_data / max(result.observations, 1),
        "chi2_per_observation_nominal": result.chi2_data_nominal / max(result.observations, 1),
        "converged": result.converged,
        "message": result.message,
        "training_batches": [b.name for b in result.batches],
        "unused_measurements": list(result.unused_measurements),
        "data_files": list(files),
    }
    if validation is not None:
        out["validation_24h"] = {k: v for k, v in validation.items() if k != "rows"}
    return dict(_json_safe(out))


# -- the HTML report --------------------------------------------------------------------------


def _estimates_table(result: CalibrationResult) -> str:
    from controller.records.report import _table

    rows, classes = [], []
    for e in result.estimates:
        lo95, hi95 = e.prior.range95
        profile = (
            f"[{_fmt(e.profile[0])}, {_fmt(e.profile[1])}]"
            + (f" open: {e.profile_open}" if e.profile_open else "")
            if e.profile is not None
            else ""
        )
        flags = []
        if e.flat:
            flags.append(f"flat profile ({e.flat})")
        if e.at_bound:
            flags.append("at a search bound")
        flags += [
            f"|corr| with {b if a == e.name else a}"
            for a, b, _ in result.flagged_pairs
            if e.name in (a, b)
        ]
        rows.append(
            [
                e.name,
                e.prior.unit,
                e.prior.centre,
                f"[{_fmt(lo95)}, {_fmt(hi95)}]",
                e.value,
                f"[{_fmt(e.laplace[0])}, {_fmt(e.laplace[1])}]",
                profile,
                "; ".join(flags) or "identified",
            ]
        )
        classes.append("warning" if flags else "")
    return _table(
        [
            "parameter",
            "unit",
            "prior centre",
            "prior 95 %",
            "MAP",
            "Laplace 95 %",
            "profile 95 %",
            "identifiability",
        ],
        rows,
        classes,
    )


def _profile_plot(result: CalibrationResult) -> Any:
    from controller.records.report import _figure

    estimates = [e for e in result.estimates if e.name in result.profiles]
    if not estimates:
        return None
    cols = min(3, len(estimates))
    rows = math.ceil(len(estimates) / cols)
    fig, axes = _figure(rows, cols, 3.4)
    for ax in axes[len(estimates) :]:
        ax.set_visible(False)
    for ax, e in zip(axes, estimates, strict=False):
        prof = result.profiles[e.name]
        top = 3.0 * CHI2_95
        # the part of the profile below the plot's top, and its neighbours
        near = np.flatnonzero(prof.delta <= top)
        lo_i, hi_i = max(int(near.min()) - 1, 0), min(int(near.max()) + 1, prof.values.size - 1)
        x_lo, x_hi = float(prof.values[lo_i]), float(prof.values[hi_i])
        ax.plot(prof.values, prof.delta, "o-", color="C0", ms=3, label="profile (posterior)")
        ax.plot(prof.values, prof.delta_data, "s:", color="C2", ms=3, label="data's part")
        grid = np.exp(np.linspace(math.log(x_lo), math.log(x_hi), 100))
        if e.sd_log > 0:
            quad = ((np.log(grid) - math.log(e.value)) / e.sd_log) ** 2
            ax.plot(grid, quad, "--", color="C1", label="Laplace (quadratic)")
        ax.axhline(CHI2_95, color="C3", lw=0.8, label="chi2 95 % (3.84)")
        lo95, hi95 = e.prior.range95
        ax.axvspan(lo95, hi95, color="0.92", zorder=0, label="prior 95 % range")
        ax.axvline(e.value, color="k", lw=0.8)
        if x_hi / x_lo > 3.0:
            ax.set_xscale("log")
        margin = 0.05 * (x_hi - x_lo)
        ax.set_xlim(
            x_lo - margin if x_hi / x_lo <= 3.0 else x_lo / 1.1,
            x_hi + margin if x_hi / x_lo <= 3.0 else x_hi * 1.1,
        )
        ax.set_ylim(-0.5, top)
        ax.set_xlabel(f"{e.name} [{e.prior.unit}]")
        ax.set_ylabel("2 (cost - cost at MAP)")
        ax.set_title(e.name + (f"  (flat: {e.flat})" if e.flat else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return fig


def _correlation_plot(result: CalibrationResult) -> Any:
    from controller.records.report import _figure

    names = [e.name for e in result.estimates]
    size = max(3.0, 0.6 * len(names) + 2.0)
    fig, axes = _figure(1, 1, size)
    ax = axes[0]
    image = ax.imshow(result.correlation, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{result.correlation[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title("Laplace correlation of ln(parameters)")
    return fig


def _fit_plot(result: CalibrationResult, max_batches: int = 6) -> Any:
    from controller.records.report import _figure

    batches = result.batches[:max_batches]
    names: list[str] = []
    for b in batches:
        for n in b.observations["name"].tolist():
            if n not in names:
                names.append(str(n))
    fig, axes = _figure(len(batches), len(names), 2.6)
    for r, b in enumerate(batches):
        obs = b.observations
        for c, name in enumerate(names):
            ax = axes[r * len(names) + c]
            for source, marker in (("online", "."), ("assay", "o")):
                sel = (obs["name"] == name) & (obs["source"] == source)
                if sel.any():
                    ax.plot(
                        obs["time"][sel] / 24.0,
                        obs["value"][sel],
                        marker,
                        color="k" if source == "assay" else "0.6",
                        ms=4 if source == "assay" else 2,
                        label=f"{source}",
                    )
            sel = obs["name"] == name
            order = np.argsort(obs["time"][sel], kind="stable")
            tt = obs["time"][sel][order] / 24.0
            ax.plot(tt, b.predicted_nominal[sel][order], "--", color="C0", label="prior centre")
            ax.plot(tt, b.predicted[sel][order], "-", color="C3", label="calibrated")
            ax.set_title(f"{b.name}: {name}", fontsize=8)
            ax.grid(alpha=0.3)
            if r == len(batches) - 1:
                ax.set_xlabel("culture age [d]")
            if r == 0 and c == 0:
                ax.legend(fontsize=6)
    return fig


def _validation_plot(validation: Mapping[str, Any]) -> Any:
    from controller.records.report import _figure

    rows = validation["rows"]
    models = list(validation["models"])
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    cols = min(3, len(batches))
    fig, axes = _figure(math.ceil(len(batches) / cols), cols, 3.4)
    for ax in axes[len(batches) :]:
        ax.set_visible(False)
    for ax, name in zip(axes, batches, strict=False):
        sel = [r for r in rows if r["batch"] == name]
        days = np.array([r["time"] for r in sel]) / 24.0
        ax.plot(days, [r["measured"] for r in sel], "ko", ms=3, label="measured")
        for k, label in enumerate(models):
            rmse = validation["per_batch"][name][f"rmse_{label}"]
            ax.plot(
                days,
                [r[label] for r in sel],
                "s--" if k == 0 else "v-",
                ms=3,
                color=f"C{k}",
                label=f"{label} (RMSE {rmse:.3g})",
            )
        ax.set_title(f"{name}: 24 h ahead", fontsize=9)
        ax.set_xlabel("culture age at prediction target [d]")
        ax.set_ylabel("viable cells [1e6 cells/mL]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return fig


def write_report(
    path: str | Path,
    result: CalibrationResult,
    validation: Mapping[str, Any] | None,
    files: Sequence[Mapping[str, str]],
    *,
    title: str,
    command: str,
    parameter_file_out: str | None,
) -> Path:
    """Write the HTML report (module docstring) and return its path; each figure is also
    saved beside it as ``<report stem>-<figure>.png`` (profiles, correlation, fits,
    validation)."""
    from controller.records.report import _CSS, _img, _table

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)

    def figure(fig: Any, alt: str, plot_id: str) -> str:
        if fig is None:
            return f"<p>No {html.escape(alt)}.</p>"
        fig.savefig(out.with_name(f"{out.stem}-{plot_id}.png"), dpi=90)
        return _img(fig, alt, plot_id)

    e = html.escape
    body = [
        f"<h1>{e(title)}</h1>",
        f"<p class='small'>{e(command)}</p>",
        "<h2>Estimates</h2>",
        _estimates_table(result),
        "<p>MAP: maximum a posteriori (log-normal priors centred on the parameter file's "
        "values, each parameter's declared range as ~95 % range). Laplace: from the "
        "Gauss-Newton Hessian at the MAP, initial states marginalised. Profile: where twice "
        f"the rise of the cost, the others re-optimised, stays below {CHI2_95:.2f}. A flat "
        "profile does not rise by that much within the prior's 95 % range on that side "
        "from the data alone: the data do not constrain the parameter there.</p>",
        _table(
            ["", "value"],
            [
                ["observations", result.observations],
                [
                    "chi-square per observation, calibrated",
                    result.chi2_data / max(result.observations, 1),
                ],
                [
                    "chi-square per observation, prior centre",
                    result.chi2_data_nominal / max(result.observations, 1),
                ],
                ["initial states", result.settings.initial],
                ["fit", result.message],
                ["measurements the model does not predict", ", ".join(result.unused_measurements)],
                ["parameter file written", parameter_file_out or ""],
            ],
        ),
        "<p class='small'>A chi-square per observation well above 1 means the model does not "
        "explain the data within the declared measurement noise (model error): the intervals "
        "are then too narrow.</p>",
        "<h2>Identifiability</h2>",
        figure(_correlation_plot(result), "correlation matrix", "correlation"),
    ]
    if result.flagged_pairs:
        body.append(
            _table(
                ["parameter", "parameter", "correlation"],
                [[a, b, c] for a, b, c in result.flagged_pairs],
                ["warning"] * len(result.flagged_pairs),
            )
        )
        body.append(
            "<p>Flagged pairs: only a combination of the two is identified by these data "
            "(calibrate one of them, or add data that separate them).</p>"
        )
    else:
        body.append("<p>No pair has |correlation| above the threshold.</p>")
    body += [
        "<h2>Profile likelihoods</h2>",
        figure(_profile_plot(result), "profile likelihoods", "profiles"),
        "<h2>Training batches: prior centre and calibrated</h2>",
        figure(_fit_plot(result), "fits of the training batches", "fits"),
    ]
    if validation is not None:
        models = list(validation["models"])
        body += [
            "<h2>Held-out batches: 24 h-ahead viable cells</h2>",
            _table(
                ["model", "RMSE [1e6 cells/mL]", "RMSE vs true cells"],
                [
                    [
                        m,
                        validation[f"rmse_{m}"],
                        validation.get(f"rmse_{m}_true")
                        if validation.get(f"rmse_{m}_true") is not None
                        else "",
                    ]
                    for m in models
                ],
            ),
            f"<p>{validation['predictions']} predictions (every 12 h from day 1, each from the "
            "state reconstructed from the measurements up to its start, as hmpc fit's "
            "validation).</p>",
            figure(
                _validation_plot(validation),
                "24 h-ahead predictions on held-out batches",
                "validation",
            ),
        ]
    else:
        body.append("<h2>Held-out batches</h2><p>None given (--holdout).</p>")
    body += [
        "<h2>Data</h2>",
        _table(
            ["record", "sha256", "assays", "sha256"],
            [
                [f["record"], f["sha256"], f.get("assays", ""), f.get("assays_sha256", "")]
                for f in files
            ],
        ),
    ]
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    out.write_text(page, encoding="utf-8")
    return out
