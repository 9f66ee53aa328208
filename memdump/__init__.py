"""memdump: forensic memory capture of running VMs. This package is the engine; it
imports neither Prefect nor FastAPI."""

__version__ = "0.1.0"
