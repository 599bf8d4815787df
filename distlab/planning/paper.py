"""On paper: the published model-state memory figures, beside the planner's memory model.

* **7.5B on 64 devices** (Rajbhandari et al. 2020, "ZeRO", Figure 1): mixed-precision Adam,
  K = 12, Ψ = 7.5·10⁹, N = 64: 120 GB (baseline), 31.4 GB (P_os), 16.6 GB (P_os+g),
  1.9 GB (P_os+g+p), the paper's numbers in GB = 10⁹ bytes.
* **70B** (the Ultra-Scale Playbook, Tazi et al. 2025, "Memory usage in Transformers":
  mixed precision keeps 2Ψ of bf16 parameters, 2Ψ of gradients, 4Ψ of fp32 master weights
  and 8Ψ of Adam's moments, 16 bytes per parameter): 1120 GB unsharded is the Playbook's
  rule at Ψ = 70·10⁹. The three ZeRO rows on 64 devices are *derived* here from ZeRO's
  formula (section 5: 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N), not quoted: 293.1, 155.3, 17.5 GB.

Activations and temporary buffers are left out, as in both sources.
:func:`published_memory` returns the table; each row's ``planner_gb`` is
:func:`distlab.planning.planner.model_states` for the same Ψ and plan.
"""
from __future__ import annotations

from distlab.planning.planner import Plan, model_states

STAGES = ("baseline", "P_os", "P_os+g", "P_os+g+p")
"""ZeRO's names for stages 0 to 3 (Figure 1)."""

ZERO_PAPER = (7.5e9, 64, (120.0, 31.4, 16.6, 1.9),
              "Rajbhandari et al. 2020 (ZeRO), Figure 1")
PLAYBOOK_70B = (70e9, 64, (1120.0, 293.1, 155.3, 17.5),
                "Ultra-Scale Playbook: 16 bytes/param -> 1120 GB (quoted); ZeRO rows on 64 "
                "devices derived from ZeRO section 5")


def published_memory() -> list[dict]:
    """One row per model and ZeRO stage: ``model, num_params, devices, stage, published_gb,
    planner_gb, source`` (GB = 10⁹ bytes, model states per device, mixed-precision Adam).

    Example: ``[r["planner_gb"] for r in published_memory()][:4]`` is about
    ``[120, 31.4, 16.6, 1.9]``.
    """
    rows = []
    for name, (psi, devices, published, source) in (("7.5B", ZERO_PAPER),
                                                    ("70B", PLAYBOOK_70B)):
        for stage, gb in enumerate(published):
            states = model_states(psi, Plan(dp=devices, zero_stage=stage), mixed_precision=True)
            rows.append(dict(model=name, num_params=psi, devices=devices, stage=STAGES[stage],
                             published_gb=gb, planner_gb=sum(states.values()) / 1e9,
                             source=source))
    return rows
