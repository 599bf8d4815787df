"""Lab 01 · collectives from send/recv, the α-β cost model, an injected network.

``collectives`` (ring, recursive doubling, naive), ``cost_model`` (formulas, least-squares fit),
``netsim`` (injected latency and bandwidth).
"""
