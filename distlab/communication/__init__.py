"""Lab 01 · collectives from send/recv, the α-β cost model, an injected network.

``collectives`` (ring, recursive doubling, naive), ``alpha_beta`` (every cost formula of the
course), ``cost_model`` (the formulas fitted to measurements), ``netsim`` (injected latency and
bandwidth).
"""
