"""Judges: image scorers for evaluation."""
