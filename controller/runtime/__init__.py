"""The deployable controller runtime, and the only importer of asyncua: site file, plant and
printer I/O over OPC UA, the per-unit control loop, restart and the ``hmpc run`` service
(docs/runtime.md).

The names below are the public API; the modules are the implementation."""

from __future__ import annotations

from controller.runtime.loop import UnitLoop, run_control_loop
from controller.runtime.plant_io import OpcUaPlantIO, PlantIO
from controller.runtime.printing import PrinterCoordinator
from controller.runtime.restart import StateStore
from controller.runtime.service import serve
from controller.runtime.site import SiteConfig, UnitConfig, load_site

__all__ = [
    "OpcUaPlantIO",
    "PlantIO",
    "PrinterCoordinator",
    "SiteConfig",
    "StateStore",
    "UnitConfig",
    "UnitLoop",
    "load_site",
    "run_control_loop",
    "serve",
]
