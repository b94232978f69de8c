"""Processes and devices: one process per GPU (DDP), device choice, stopping on signals."""
