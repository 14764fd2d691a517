"""The whole ExFM loop as one job: its config and its report (jobs/orchestrator.py runs it)."""
