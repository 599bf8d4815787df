"""Lab 08 · decentralized and hybrid training.

``topology`` (ring, 2-D torus and exponential graphs, their mixing matrices and spectral
gaps, one gossip round), ``dpsgd`` (decentralized parallel SGD, Lian et al. 2017: every rank
steps on its own shard and gossips with its neighbours), ``hybrid`` (synchronous all-reduce
inside groups, an asynchronous parameter server across them).
"""
