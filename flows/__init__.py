"""Prefect flows (flow code only: targets, fan-out per VM, results)."""
