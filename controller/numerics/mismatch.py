"""Model-mismatch diagnostic of the estimator: innovation statistics and probe-gain drift.

A Kalman filter whose model is right sees innovations ``nu`` with variance ``s`` (its own
prediction): the normalised innovation squared ``nis = nu^2 / s`` is chi-square with one
degree of freedom, and the mean of ``N`` of them is ``chi2(N) / N``. A model that is wrong
shows up as a window mean above the band ``chi2.ppf(1 - alpha, N) / N``, per measured
variable and source. Each value is capped at the gate squared first (a single spike the
gate rejects cannot raise the alarm alone; a persistent bias does).

A filter can also hide its model's error in a slow state that nothing else observes: on the
CHO FMU the viable-cell probe's gain drifted to 1.3-1.5 while the model under-predicted the
growth. A probe gain further than ``gain_drift_alarm`` from 1 raises the second alarm.

Alarms are per episode (:class:`MismatchMonitor`): logged once at warning level when one
starts, at info level when it clears, with hysteresis (a statistic clears below the middle
of 1 and its band's upper end, a gain within 75 % of the drift limit).
:class:`MismatchReport` carries the figures of every update (``values()`` for the
historian). The window starts empty after a restart from a
snapshot (the statistics are a diagnostic, not part of the filter state).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping

__all__ = ["MismatchMonitor", "MismatchReport", "chi2_band"]

log = logging.getLogger(__name__)


def chi2_band(samples: int, alpha: float) -> tuple[float, float]:
    """Two-sided ``1 - alpha`` band of the mean of ``samples`` chi-square(1) values."""
    from scipy.stats import chi2

    return (
        float(chi2.ppf(alpha / 2.0, samples)) / samples,
        float(chi2.ppf(1.0 - alpha / 2.0, samples)) / samples,
    )


@dataclasses.dataclass(frozen=True)
class MismatchReport:
    """The diagnostic after one estimator update.

    Attributes:
        nis: ``"<source>.<variable>"`` -> mean normalised innovation squared over the
            window (the last ``samples`` values).
        samples: how many values that mean has.
        band: the same keys -> (low, high) of the band for that many samples.
        gains: probe variable -> estimated gain.
        alarms: keys with an active alarm (``nis.<source>.<variable>``,
            ``gain.<variable>``), sorted.
        started: alarms that started at this update.
        messages: alarm key -> one line saying what was seen.
    """

    nis: Mapping[str, float] = dataclasses.field(default_factory=dict)
    samples: Mapping[str, int] = dataclasses.field(default_factory=dict)
    band: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    gains: Mapping[str, float] = dataclasses.field(default_factory=dict)
    alarms: tuple[str, ...] = ()
    started: tuple[str, ...] = ()
    messages: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def values(self) -> dict[str, float]:
        """Flat figures for a step record: ``nis.<key>``, ``nis_high.<key>`` (the band's
        upper end), ``gain.<variable>`` and ``alarm.<alarm key>`` (1.0) for every active
        alarm."""
        out: dict[str, float] = {}
        for key, value in self.nis.items():
            out[f"nis.{key}"] = float(value)
            out[f"nis_high.{key}"] = float(self.band[key][1])
        for name, gain in self.gains.items():
            out[f"gain.{name}"] = float(gain)
        for key in self.alarms:
            out[f"alarm.{key}"] = 1.0
        return out


class MismatchMonitor:
    """Windows of normalised innovations and the alarm episodes of one estimator.

    Args:
        windows: source -> window length (number of values) of that source.
        alpha: false-alarm probability of the band per window (two-sided).
        caps: source -> cap of a single value (the gate squared).
        gain_drift: relative deviation of a probe gain from 1 that raises the alarm
            (0: off).
    """

    def __init__(
        self,
        windows: Mapping[str, int],
        alpha: float,
        caps: Mapping[str, float],
        gain_drift: float,
    ) -> None:
        self.windows = dict(windows)
        self.alpha = alpha
        self.caps = dict(caps)
        self.gain_drift = gain_drift
        #: (source, variable) -> sample time -> capped nis (overwritten on re-processing)
        self._values: dict[tuple[str, str], dict[float, float]] = {}
        self._active: set[str] = set()
        self._bands: dict[int, tuple[float, float]] = {}

    def _band(self, n: int) -> tuple[float, float]:
        if n not in self._bands:
            self._bands[n] = chi2_band(n, self.alpha)
        return self._bands[n]

    def record(self, source: str, name: str, time_h: float, nis: float) -> None:
        """One normalised innovation squared of a measurement sampled at ``time_h`` (a
        re-processed one replaces the value it had)."""
        cap = self.caps.get(source, math.inf)
        values = self._values.setdefault((source, name), {})
        values[float(time_h)] = min(float(nis), cap)
        keep = self.windows.get(source, 24)
        if len(values) > 2 * keep:  # bounded: the window and as many re-processable ones
            for t in sorted(values)[: len(values) - 2 * keep]:
                del values[t]

    def report(self, time_h: float, gains: Mapping[str, float]) -> MismatchReport:
        """The figures and alarm episodes after an update at ``time_h`` (h)."""
        nis: dict[str, float] = {}
        samples: dict[str, int] = {}
        band: dict[str, tuple[float, float]] = {}
        alarms: dict[str, str] = {}
        for (source, name), values in sorted(self._values.items()):
            window = self.windows.get(source, 24)
            recent = [values[t] for t in sorted(values)[-window:]]
            if not recent:
                continue
            key = f"{source}.{name}"
            n = len(recent)
            mean = sum(recent) / n
            nis[key], samples[key], band[key] = mean, n, self._band(n)
            # hysteresis: an active alarm clears only below the middle of 1 and the band's
            # upper end (a statistic near the band does not start a new episode every hour)
            upper = band[key][1]
            limit = 1.0 + 0.5 * (upper - 1.0) if f"nis.{key}" in self._active else upper
            if n >= window and mean > limit:
                alarms[f"nis.{key}"] = (
                    f"{source} {name}: mean normalised innovation squared {mean:.2f} over the "
                    f"last {n} values, above its band {band[key][1]:.2f} (chi-square, "
                    f"alpha {self.alpha:g}): the model does not explain these measurements"
                )
        for name, gain in gains.items():
            drift = self.gain_drift * (0.75 if f"gain.{name}" in self._active else 1.0)
            if self.gain_drift > 0 and abs(gain - 1.0) > drift:
                alarms[f"gain.{name}"] = (
                    f"the {name} probe's estimated gain is {gain:.3f} (more than "
                    f"{self.gain_drift:.0%} from 1): a drifting gain can be the model's error "
                    "absorbed by the probe's calibration; check the probe against the assays "
                    "and the model against the batch"
                )
        started = tuple(sorted(set(alarms) - self._active))
        for key in started:
            log.warning("model mismatch at %.4g h: %s", time_h, alarms[key])
        for key in sorted(self._active - set(alarms)):
            log.info("model mismatch alarm %s cleared at %.4g h", key, time_h)
        self._active = set(alarms)
        return MismatchReport(
            nis=nis,
            samples=samples,
            band=band,
            gains=dict(gains),
            alarms=tuple(sorted(alarms)),
            started=started,
            messages=alarms,
        )

    def forget(self, keys: Iterable[tuple[str, str]] = ()) -> None:
        """Drop the windows of ``keys`` (all when empty) and every active alarm."""
        keys = list(keys)
        if not keys:
            self._values.clear()
        for key in keys:
            self._values.pop(key, None)
        self._active.clear()
