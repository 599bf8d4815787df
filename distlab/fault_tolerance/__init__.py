"""Lab 07 · fault tolerance.

``faults`` (injected failures), ``checkpoint`` (crash-safe distributed checkpoints),
``elastic`` (a job that resumes from its latest checkpoint: ``train``, ``reference``,
``start``, ``run``), ``agent`` (the loop that restarts it on the survivors).
"""
