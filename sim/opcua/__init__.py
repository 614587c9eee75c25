"""OPC UA plant simulators: LADS bioreactors, an additive-manufacturing bioprinter, the
plant-side APC handshake (heartbeat watchdog, modes, setpoint bundles) and security.
See docs/opcua.md."""
