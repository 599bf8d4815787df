"""Lab 07 · fault tolerance.

``faults`` (injected failures), ``checkpoint`` (crash-safe distributed checkpoints),
``elastic`` (restarts on the survivors).
"""
