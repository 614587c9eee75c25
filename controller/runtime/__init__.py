"""The deployable controller runtime: site file, plant I/O over OPC UA, the per-unit control
loop and the ``hmpc run`` service (docs/runtime.md)."""
