"""What is trained: datasets, models, the tiny transformer and its text, workloads."""
