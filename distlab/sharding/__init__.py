"""Lab 04 · distributed Adam and ZeRO.

``zero`` (ZeRO-1/2 sharded optimizers), ``fsdp`` (ZeRO-3), ``memory`` (the ZeRO paper's formulas).
"""
