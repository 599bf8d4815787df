"""Lab 02 · synchronous data parallelism.

``ddp`` (naive, flat, overlapped and bucketed DDP), ``sync_sgd`` (synchronous SGD on a sharded
dataset, linear learning-rate scaling with warmup).
"""
