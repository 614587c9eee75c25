"""Composed control laws and policies: estimator + MPC + in-batch learning built from a
:class:`ControllerSpec` (``control``), and the print-job policy (``printer``).

The names below are the public API; the modules are the implementation."""

from __future__ import annotations

from controller.laws.control import (
    CONTROLLER_KINDS,
    ControllerSpec,
    EstimatingMPC,
    build_controller,
    build_model,
    default_mpc_config,
)
from controller.laws.printer import (
    JobSpec,
    PrinterCommand,
    PrintEvent,
    PrintPolicy,
    PrintPolicyConfig,
)

__all__ = [
    "CONTROLLER_KINDS",
    "ControllerSpec",
    "EstimatingMPC",
    "JobSpec",
    "PrintEvent",
    "PrintPolicy",
    "PrintPolicyConfig",
    "PrinterCommand",
    "build_controller",
    "build_model",
    "default_mpc_config",
]
