"""Simulators the data builders record in and the evaluation runs the policy in."""
