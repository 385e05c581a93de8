"""Part 2 of ``analyze_issue164``: the record's pre-registered decision rules, applied to the results object."""

from __future__ import annotations


def decisions(data: dict) -> dict:
    """The record's pre-registered rules (thresholds of #164) applied to the results object."""
    rules = data["record_rules"]
    target, falsification, gate = rules["em_target_alpha"], rules["h2_falsification_alpha"], rules["judge_gap_gate"]
    evaluated = [r for r in data["conditions"] if r["role"] == "condition"]
    em_rows = [r for r in data["conditions"] if r["role"] == "em_reference"]
    return {
        "em_target_alpha": target, "h2_falsification_alpha": falsification, "judge_gap_gate": gate,
        "measured_em_reference_alpha": em_rows[0]["alpha_primary"] if em_rows else None,
        "conditions_above_em_target": [r["condition"] for r in evaluated
                                       if r["alpha_primary"] is not None and r["alpha_primary"] > target],
        "conditions_at_or_below_falsification": [r["condition"] for r in evaluated
                                                 if r["alpha_primary"] is not None
                                                 and r["alpha_primary"] <= falsification],
        "conditions_over_judge_gap_gate": [r["condition"] for r in evaluated
                                           if r["gap"] is not None and abs(r["gap"]) >= gate],
        "conditions_without_alpha": [r["condition"] for r in evaluated if r["alpha_primary"] is None],
    }
