"""Lab 05 · model parallelism.

``tensor_parallel`` (Megatron column/row-parallel layers), ``pipeline`` (GPipe, 1F1B) and
``timeline`` (what its stages record: the bubble, the activations kept), ``mesh`` (a DP × TP
grid of process groups).
"""
