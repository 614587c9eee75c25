"""The external anchor of the historian's record chain: the chain head (sequence number and
hash) appended, after every committed record, to a file the historian's database writers
cannot rewrite (another volume, another host, an append-only or WORM share), optionally
signed with an HMAC-SHA256 key that only the controller holds.

A hash chain inside the database detects edits, deletions and insertions in the middle, but
not a cut tail or a full wipe: both leave a shorter chain that is consistent. The anchor
remembers how far the chain went; ``hmpc audit verify --anchor FILE`` then finds the
anchored head missing or different. See docs/historian.md, "Threat model".

File format: one JSON object per line, ``{"seq", "hash", "wall_time", "mac"}``; ``mac`` is
the HMAC-SHA256 (hex) of the canonical JSON of the other three fields under the key, or
``""`` when no key is configured. The head only moves forward, so the last line counts;
every line is checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import threading
import time
from pathlib import Path

from plant_models.errors import HistorianError

__all__ = ["ANCHOR_KEY_ENV", "Anchor", "AnchorHead", "read_anchor"]

#: Environment variable naming the anchor key file (when ``--anchor-key`` is not given).
ANCHOR_KEY_ENV = "HMPC_ANCHOR_KEY_FILE"


def _load_key(path: str | os.PathLike[str] | None) -> bytes | None:
    if path is None or str(path) == "":
        return None
    p = Path(path)
    try:
        key = p.read_bytes().strip()
    except OSError as exc:
        raise HistorianError(f"anchor key file {p}: cannot be read ({exc})") from exc
    if len(key) < 16:
        raise HistorianError(f"anchor key file {p}: the key is shorter than 16 bytes")
    return key


def _mac(key: bytes | None, seq: int, head: str, wall_time: float) -> str:
    if key is None:
        return ""
    text = json.dumps(
        {"hash": head, "seq": seq, "wall_time": wall_time}, sort_keys=True, separators=(",", ":")
    )
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclasses.dataclass(frozen=True)
class AnchorHead:
    """What an anchor file says: the highest head, every head it holds (line order), and
    what is wrong with it."""

    seq: int
    hash: str
    heads: tuple[tuple[int, str], ...]
    problems: tuple[str, ...]


class Anchor:
    """Appends the chain head to ``path`` (created when missing), fsynced, under a lock.

    Args:
        path: the anchor file.
        key_file: file holding the HMAC key (None: ``$HMPC_ANCHOR_KEY_FILE`` or unsigned).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, key_file: str | os.PathLike[str] | None = None
    ) -> None:
        self.path = Path(path)
        if key_file is None:
            key_file = os.environ.get(ANCHOR_KEY_ENV) or None
        self._key = _load_key(key_file)
        self._lock = threading.Lock()
        if not self.path.parent.is_dir():
            raise HistorianError(
                f"anchor file {self.path}: folder {self.path.parent} does not exist"
            )

    @property
    def signed(self) -> bool:
        return self._key is not None

    def publish(self, seq: int, head: str) -> None:
        """Append the head (after the transaction that made it committed).

        Raises:
            HistorianError: the file cannot be written."""
        wall = round(time.time(), 6)
        line = json.dumps(
            {
                "seq": int(seq),
                "hash": head,
                "wall_time": wall,
                "mac": _mac(self._key, seq, head, wall),
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, (line + "\n").encode("utf-8"))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise HistorianError(f"anchor file {self.path}: cannot append ({exc})") from exc


def read_anchor(
    path: str | os.PathLike[str], *, key_file: str | os.PathLike[str] | None = None
) -> AnchorHead:
    """Read an anchor file: its heads, with every malformed, unsigned or wrongly signed
    line named in ``problems``.

    Raises:
        HistorianError: the file cannot be read (a missing anchor is itself a finding for
            the caller to report)."""
    p = Path(path)
    if key_file is None:
        key_file = os.environ.get(ANCHOR_KEY_ENV) or None
    key = _load_key(key_file)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise HistorianError(f"anchor file {p}: cannot be read ({exc})") from exc
    problems: list[str] = []
    seq, head = 0, "0" * 64
    heads: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            s, h, w, m = int(item["seq"]), str(item["hash"]), float(item["wall_time"]), item["mac"]
        except (ValueError, KeyError, TypeError):
            problems.append(f"anchor line {n} is malformed")
            continue
        if key is not None and not hmac.compare_digest(str(m), _mac(key, s, h, w)):
            problems.append(f"anchor line {n} (head #{s}) has a wrong or missing signature")
            continue
        heads.append((s, h))
        if s >= seq:  # several writer processes may append out of order
            seq, head = s, h
    return AnchorHead(seq, head, tuple(heads), tuple(problems))
