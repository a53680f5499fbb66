"""The pipeline stages, by product: training, tuning, inference and report."""
