"""Lab 09 · where the time goes.

``flops`` (the FLOPs of a training step, counted two ways, the machine's measured peak
matmul rate, and the model FLOPs utilization, MFU), ``trace`` (a ``torch.profiler`` trace
of one DDP step and one FSDP step, exported for Perfetto, and the exposed communication
read from it beside distlab's own timeline).
"""
