"""Helpers of the runtime integration tests (a uniquely named module): free loopback
ports, the PKI, and the recorded plant side (:mod:`sim.opcua.recording`, re-exported)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from sim.bench_loop import prepare_pki
from sim.opcua.recording import GatedMonotonic, PlantStep, PlantThread, PlantWrite

__all__ = [
    "PASSWORDS",
    "GatedMonotonic",
    "PlantStep",
    "PlantThread",
    "PlantWrite",
    "free_ports",
    "make_pki",
    "stop_process",
    "wait_ready",
    "wait_until",
]

PASSWORDS = {"apc": "apc-secret", "operator": "op-secret"}


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def make_pki(folder: Path) -> Path:
    return prepare_pki(folder, PASSWORDS)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until true; an AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_ready(proc: subprocess.Popen[str], timeout_s: float = 120.0) -> None:
    """Read ``hmpc-sim serve``'s stdout until it prints ``ready``."""
    deadline = time.monotonic() + timeout_s
    if proc.stdout is None:
        raise AssertionError("hmpc-sim serve was started without stdout=PIPE")
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"hmpc-sim serve ended early (exit {proc.poll()})")
        if line.strip() == "ready":
            return
    raise AssertionError("hmpc-sim serve did not become ready")


def stop_process(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` (if still running), wait up to 30 s, then kill; close its pipes."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
