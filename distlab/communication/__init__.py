"""Lab 01 · collectives from send/recv, the α-β cost model, an injected network.

``collectives`` (ring, recursive doubling, naive), ``all_to_all`` (pairwise exchange beside
``dist.all_to_all_single``), ``alpha_beta`` (every cost formula of the
course), ``cost_model`` (the formulas fitted to measurements), ``netsim`` (injected latency and
bandwidth).
"""
