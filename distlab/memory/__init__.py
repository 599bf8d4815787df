"""Memory, measured (lab 09).

``activations`` (Korthikanti et al.'s activation formula, and the TinyTransformer's own),
``measure`` (the peak memory of a training step per rank and phase, traced, by what the bytes
are for), ``recompute`` (activation checkpointing, full and selective, and what it costs),
``accumulation`` (k micro-batches per step under DDP's ``no_sync``: one all-reduce per step).
"""
