"""Mixed precision: 16-bit compute and storage, fp32 master weights, dynamic loss scaling.

``loss_scaling`` (the dynamic loss scaler, overflow detection agreed by every rank),
``mixed`` (fp32, bf16 autocast and fp16 with fp32 master weights, data parallel). ZeRO's
16-bit parameters and gradients with sharded fp32 master weights are an option of
:class:`distlab.sharding.zero.ShardedOptimizer` (``master_weights=True``).
"""
