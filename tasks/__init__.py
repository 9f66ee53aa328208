"""Prefect tasks: thin wrappers over memdump/ (retries, timeouts, concurrency live here)."""
