"""Evaluation: metrics, reliability diagram and confusion-matrix images, the ``evaluate`` command."""
