"""Evaluation on benchmark suites and lm-evaluation-harness tasks, shared by the evaluate stage and `milora eval`."""
