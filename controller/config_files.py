"""Where the shipped configuration files (``configs/*.toml``) are.

In a source checkout (and an editable install) they are the repository's ``configs/``
folder; a wheel carries the same files as ``controller/configs/`` (``pyproject.toml``
maps that package-data folder onto ``configs/``). Every module that needs a shipped
tuning or site template asks :func:`config_file` rather than building a path itself.
"""

from __future__ import annotations

from pathlib import Path

from plant_models.errors import ConfigError

__all__ = ["config_dir", "config_file"]

_CANDIDATES = (
    Path(__file__).resolve().parents[1] / "configs",  # source checkout / editable install
    Path(__file__).resolve().parent / "configs",  # installed wheel
)


def config_dir() -> Path:
    """The folder of the shipped configuration files.

    Raises:
        ConfigError: neither a source checkout nor an installed wheel provides it.
    """
    for folder in _CANDIDATES:
        if (folder / "site_sim.toml").is_file():
            return folder
    raise ConfigError(
        "the shipped configuration files (configs/*.toml) were not found in "
        + " or ".join(str(c) for c in _CANDIDATES)
        + "; reinstall hmpc or pass the file's path explicitly."
    )


def config_file(name: str) -> Path:
    """The shipped configuration file ``name`` (e.g. ``"mpc_tcell.toml"``).

    Raises:
        ConfigError: no such shipped file (the message lists the ones there are).
    """
    folder = config_dir()
    path = folder / name
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in folder.glob("*.toml")))
        raise ConfigError(
            f"no shipped configuration file {name!r} in {folder}; there are: {known}."
        )
    return path
