"""Lab 06 · communication-efficient training.

``compression`` (top-k, random-k, sign, low precision, error feedback), ``local_sgd``
(local SGD: average every H steps), ``fedavg`` (federated averaging), ``local_training``
(what those two share: shards, minibatches, evaluation, the traffic meter), ``optimizers``
(LAMB, 1-bit Adam).
"""
