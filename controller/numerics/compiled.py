"""Compiled NLP solvers, cached on disk: generated C built once per problem, reused after.

:func:`compiled_nlpsol` builds a CasADi ``nlpsol`` whose functions (objective, constraints,
their derivatives, the Lagrangian Hessian: what the solver plugin needs) are generated C
compiled to a shared library. The library is kept in a cache directory under a key that
hashes everything its code depends on: the serialized NLP, the solver plugin, the
options that select the generated derivatives, the compiler flags and the CasADi version.
A second build of the same problem (a restart, a second unit in the process) loads the
library instead of compiling again.

Cache layout: ``<dir>/<prefix>-<key>.so`` and ``<dir>/<prefix>-<key>.sha256`` (the
library's own SHA-256). A library whose digest does not match, or that does not load, is
logged and rebuilt; files are written under temporary names and moved into place, so
processes sharing the directory never see a half-written library.

Cache directory: ``[solver] cache_dir`` of the MPC tuning, else ``$HMPC_CACHE_DIR``, else
``$XDG_CACHE_HOME/hmpc`` (``~/.cache/hmpc``), with a ``nlp`` sub-directory.

A cached library is code that runs inside the controller, so the cache must be the
service account's own: the directory is created private (0700) and refused (a
:class:`ConfigError` naming it) when another user owns it or group or others may write to
it; a library that is a symbolic link, another user's file or group/other-writable is not
loaded but rebuilt (logged); staged files get unpredictable names (``mkstemp``). The
SHA-256 sidecar detects corruption (a truncated copy, a disk error), not tampering: whoever
can write the library can write its sidecar, which is why the directory must be private.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import casadi as ca

from plant_models.errors import ConfigError

__all__ = ["CompileOutcome", "compiled_nlpsol", "default_cache_dir", "nlp_cache_key"]

log = logging.getLogger(__name__)

#: Options of the solver that change which derivative functions are generated.
_CODE_OPTIONS = ("hessian_approximation", "ipopt.hessian_approximation")


@dataclasses.dataclass(frozen=True)
class CompileOutcome:
    """How :func:`compiled_nlpsol` obtained its library.

    Attributes:
        path: the shared library.
        key: the cache key (hex SHA-256).
        action: ``"hit"`` (loaded from the cache), ``"built"`` (compiled, nothing cached
            before) or ``"rebuilt"`` (the cached library was corrupt or did not load).
        compile_s: wall time of code generation and compilation (0 on a hit).
    """

    path: Path
    key: str
    action: str
    compile_s: float = 0.0


def default_cache_dir() -> Path:
    """``$HMPC_CACHE_DIR``, else ``$XDG_CACHE_HOME/hmpc``, else ``~/.cache/hmpc``."""
    env = os.environ.get("HMPC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hmpc"


def _private_directory(directory: Path) -> Path:
    """Create ``directory`` (0700) if needed; refuse one that is not the process owner's
    own or that group or others may write to (a library placed there would run in the
    controller)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = directory.stat()
    except OSError as exc:
        raise ConfigError(f"compiled-NLP cache directory {directory}: {exc}") from exc
    problems = []
    if not stat.S_ISDIR(st.st_mode):
        problems.append("it is not a directory")
    if st.st_uid != os.getuid():
        problems.append(f"it is owned by uid {st.st_uid}, not by this process (uid {os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"group or others may write to it (mode {stat.S_IMODE(st.st_mode):o})")
    if problems:
        raise ConfigError(
            f"compiled-NLP cache directory {directory}: {'; '.join(problems)}. A library there "
            "runs inside the controller: use a directory only the service account can write "
            "(chmod 700), or set [solver] cache_dir / $HMPC_CACHE_DIR to one."
        )
    return directory


def _untrusted(path: Path) -> str:
    """Why the cached file ``path`` must not be loaded ('' when it may): a symbolic link,
    not a regular file, another user's, or writable by group or others."""
    try:
        st = path.lstat()
    except OSError as exc:
        return f"cannot stat it ({exc})"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if st.st_uid != os.getuid():
        return f"it is owned by uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"group or others may write to it (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _stage(directory: Path, target: Path, write: Any) -> None:
    """Write a file under an unpredictable name in ``directory`` (O_EXCL, 0600), then move
    it onto ``target``: never through a name another user could have planted."""
    fd, name = tempfile.mkstemp(prefix=".staging-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


def nlp_cache_key(
    plugin: str, nlp: Mapping[str, Any], options: Mapping[str, Any], flags: Sequence[str]
) -> str:
    """SHA-256 (hex) of what the generated code depends on."""
    args = [nlp["x"], nlp["p"]]
    fn = ca.Function("nlp", args, [nlp["f"], nlp["g"]], ["x", "p"], ["f", "g"])
    digest = hashlib.sha256()
    code_opts = {k: str(options[k]) for k in _CODE_OPTIONS if k in options}
    header = {
        "casadi": ca.CasadiMeta.version(),
        "plugin": plugin,
        "options": code_opts,
        "flags": list(flags),
        "format": 1,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(fn.serialize().encode())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _compiler() -> str:
    cc = os.environ.get("CC") or "gcc"
    found = shutil.which(cc)
    if found is None:
        raise ConfigError(
            f"[solver] jit = true needs a C compiler; {cc!r} is not on PATH (set CC or install "
            "gcc), or set jit = false."
        )
    return found


def _build_library(
    solver: ca.Function, target: Path, prefix: str, flags: Sequence[str], timeout_s: float
) -> None:
    """Generate the C code of ``solver``'s functions and compile it to ``target``."""
    cc = _compiler()
    with tempfile.TemporaryDirectory(prefix=f"{prefix}-", dir=target.parent) as tmp:
        source = "nlp_code.c"
        gen = ca.CodeGenerator(source, {"with_header": False})
        gen.add(solver.oracle())
        for name in solver.get_function():
            gen.add(solver.get_function(name))
        gen.generate(tmp + os.sep)
        lib = Path(tmp) / "nlp_code.so"
        cmd = [cc, "-fPIC", "-shared", *flags, str(Path(tmp) / source), "-o", str(lib)]
        try:
            # the compiler found on PATH (or $CC) on generated code: no shell, no user input
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)  # noqa: S603
        except subprocess.TimeoutExpired as exc:
            raise ConfigError(
                f"compiling the MPC's NLP took longer than {timeout_s:g} s ({' '.join(cmd)})"
            ) from exc
        if done.returncode != 0:
            raise ConfigError(
                f"compiling the MPC's NLP failed ({' '.join(cmd)}): {done.stderr.strip()[-2000:]}"
            )
        digest = _file_digest(lib)
        with lib.open("rb") as src:
            _stage(target.parent, target, lambda fh: shutil.copyfileobj(src, fh))
        side = target.with_suffix(".sha256")
        _stage(target.parent, side, lambda fh: fh.write((digest + "\n").encode()))


def compiled_nlpsol(
    name: str,
    plugin: str,
    nlp: Mapping[str, Any],
    options: Mapping[str, Any],
    *,
    cache_dir: Path | None = None,
    flags: Sequence[str] = ("-O2",),
    prefix: str = "mpc",
    timeout_s: float = 900.0,
) -> tuple[ca.Function, CompileOutcome]:
    """``ca.nlpsol(name, plugin, nlp, options)`` with its functions compiled and cached.

    Args:
        name, plugin, nlp, options: as for ``ca.nlpsol`` (``nlp`` has x, p, f, g).
        cache_dir: where the libraries are kept (default :func:`default_cache_dir` / nlp).
        flags: compiler flags (part of the key).
        prefix: file name prefix (readability only).
        timeout_s: compiler time limit.

    Returns:
        The solver and how its library was obtained.

    Raises:
        ConfigError: no C compiler, or compilation failed (a build problem, not a cache
            problem: a corrupt cached library is rebuilt, never raised).
    """
    import time

    directory = _private_directory((cache_dir or default_cache_dir() / "nlp").expanduser())
    key = nlp_cache_key(plugin, nlp, options, flags)
    path = directory / f"{prefix}-{key[:32]}.so"
    side = path.with_suffix(".sha256")
    action = "built"
    if path.exists() or path.is_symlink():
        problem = _untrusted(path) or _untrusted(side)
        try:
            expected = side.read_text().strip()
            if not problem and _file_digest(path) != expected:
                problem = "its SHA-256 does not match the recorded one"
        except OSError as exc:
            problem = f"cannot read it or its digest ({exc})"
        if not problem:
            try:
                solver = ca.nlpsol(name, plugin, str(path), dict(options))
                log.debug("MPC: compiled NLP loaded from cache %s", path)
                return solver, CompileOutcome(path, key, "hit")
            except RuntimeError as exc:
                problem = f"it does not load ({str(exc).splitlines()[0][:200]})"
        log.warning("MPC: cached compiled NLP %s is not loaded (%s); rebuilding it", path, problem)
        action = "rebuilt"
    t0 = time.perf_counter()
    symbolic = ca.nlpsol(name, plugin, dict(nlp), dict(options))
    _build_library(symbolic, path, prefix, flags, timeout_s)
    compile_s = time.perf_counter() - t0
    log.info("MPC: compiled NLP %s in %.1f s (%s)", path, compile_s, action)
    solver = ca.nlpsol(name, plugin, str(path), dict(options))
    return solver, CompileOutcome(path, key, action, compile_s)
