"""Lab 06 · communication-efficient training.

``compression`` (top-k, random-k, sign, low precision, error feedback), ``local_sgd``
(local SGD: average every H steps), ``fedavg`` (federated averaging), ``optimizers``
(LAMB, 1-bit Adam).
"""
