"""The built-in process plug-ins (T-cell perfusion, CHO fed-batch), registered under the
``hmpc.processes`` entry point group like any site's own (plant_models.process)."""
