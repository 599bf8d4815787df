"""Lab 05 · model parallelism.

``tensor_parallel`` (Megatron column/row-parallel layers), ``pipeline`` (GPipe, 1F1B),
``mesh`` (a DP × TP grid of process groups).
"""
