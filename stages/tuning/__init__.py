"""Tuning: the search space, one trial, and the tune stage (nested Optuna studies)."""
