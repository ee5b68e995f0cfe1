"""Evaluation: closed-loop Meta-World, offline metrics, latency."""
