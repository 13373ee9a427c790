"""Tractor fleet simulator, scenarios, CSV replay and ground truth."""
