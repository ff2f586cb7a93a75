"""Evaluation: long-context retrieval tasks over real text, the harness, reports, the canary model."""

from .tasks import TASKS, Sample, make_sample, score

__all__ = ["TASKS", "Sample", "make_sample", "score"]
