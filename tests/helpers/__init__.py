"""Shared test helpers: one module per topic."""
