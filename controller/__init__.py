"""The deployable controller (``hmpc``). Its folders are its layers, each importing only the
ones before it (docs/architecture.md): ``numerics`` <- ``records`` <- ``training`` <- ``laws``
<- ``runtime`` (the only importer of asyncua) <- ``cli``."""
