"""Intelligent scheduling: choose data x tensor x pipeline x ZeRO for a model and a cluster.

:mod:`~distlab.planning.cluster` describes the devices, links and model;
:mod:`~distlab.planning.planner` enumerates the plans, predicts each one's memory per rank
and step time from distlab's α-β and memory models, and ranks those that fit;
:mod:`~distlab.planning.validate` checks the ranking against real processes, and
:mod:`~distlab.planning.paper` against the published memory figures.
"""
