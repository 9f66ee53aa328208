"""Deployment definitions (weekly cron, on-demand) and the runner entry point."""
