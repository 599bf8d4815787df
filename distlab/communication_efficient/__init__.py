"""Communication-efficient training (labs 06 and 10).

Lab 06: ``compression`` (top-k, random-k, sign, low precision, error feedback), ``local_sgd``
(local SGD: average every H steps), ``fedavg`` (federated averaging, with
``federated_clients``: Dirichlet non-IID shards, dropouts, SCAFFOLD's control variates),
``local_training`` (what those share: shards, minibatches, evaluation, the traffic meter),
``optimizers`` (LAMB, 1-bit Adam).

Lab 10, the frontier: ``diloco`` (DiLoCo: inner AdamW steps, an outer Nesterov step on the
averaged pseudo-gradient), ``streaming_diloco`` (fragments on a staggered schedule,
overlapped and quantized), ``powersgd`` (PowerSGD, side by side with PyTorch's own hook),
``compressed_all_reduce`` (the two-phase error-compensated all-reduce of 1-bit Adam, bytes
per rank independent of N), ``budget`` (the methods compared at equal steps on an injected
network).
"""
