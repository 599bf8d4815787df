"""Lab 04 · distributed Adam and ZeRO.

``zero`` (stage 0 and the ZeRO-1/2 sharded optimizer), ``fsdp`` and ``fsdp_units`` (ZeRO-3),
``fsdp_mixed`` (16-bit shards with sharded fp32 master weights), ``zero_checkpoint`` (the
sharded state saved and loaded),
``layout`` (how tensors are cut into shards, and the collectives that move them),
``memory`` (the ZeRO paper's formulas, and what a rank really holds).
"""
