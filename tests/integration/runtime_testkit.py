"""Helpers of the runtime integration tests (a uniquely named module): free loopback
ports, the PKI, and the recorded plant side (:mod:`sim.opcua.recording`, re-exported)."""

from __future__ import annotations

import socket
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
