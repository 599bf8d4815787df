"""Labs 05 and 11 · model parallelism.

Lab 05: ``tensor_parallel`` (Megatron column/row-parallel layers), ``pipeline`` (GPipe, 1F1B)
and ``timeline`` (what its stages record: the bubble, the activations kept), ``mesh`` (a
DP × TP grid of process groups).

Lab 11, as it is practised now: ``experts`` and ``expert_parallel`` (a mixture of experts,
its experts spread over ranks, tokens moved by all-to-all); ``sequence_parallel``
(Korthikanti's g / g-bar around the norms), ``dtensor_tp`` (torch's DTensor tensor
parallelism beside the Megatron layers) and ``crossover`` (TP, SP and DP bytes, the
crossover, activation memory); ``ring_attention``, ``ulysses`` and ``context_parallel``
(the sequence split over ranks inside attention); ``schedules`` and ``torch_pipelining``
(interleaved 1F1B, zero bubble, PyTorch's own schedules); ``three_d`` and ``three_d_plan``
(DP × TP × PP, and the planner's prediction beside it).
"""
