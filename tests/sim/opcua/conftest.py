"""Fixtures of the OPC UA simulator tests (defined in opcua_testkit.py)."""

from __future__ import annotations

from opcua_testkit import pki, sim

__all__ = ["pki", "sim"]
