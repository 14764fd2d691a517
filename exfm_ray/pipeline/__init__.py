"""The whole ExFM loop as one job: its config and its report (actors/pipeline.py runs it)."""
