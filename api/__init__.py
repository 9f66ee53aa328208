"""api: see ../shared/DESIGN.md; filled in by the orchestration issue."""
