"""The promotion gate: promote a round's model to policy, or keep the current policy.

The eval's win rate against the current policy (or an end of its 95% interval, see
`eval.gate_statistic`) must reach `eval.min_win_rate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flywheel.config import EvalConfig

#: The code version of this stage's output; part of its fingerprint.
CODE_VERSION = "0.1.0+1"

#: The eval column each gate statistic reads.
COLUMN = {"point": "win_rate", "ci_low": "ci_low", "ci_high": "ci_high"}


def decide(ev: Mapping[str, Any], cfg: EvalConfig, *, model: str, eval_version: str,
           policy: str, policy_eval: str) -> dict[str, Any]:
    """The gate's row for a candidate `model` whose eval row is `ev` (wins, losses, ties,
    win_rate, ci_low, ci_high): promoted or not, why, and the policy the next round starts
    from (with the eval that holds that policy's answers)."""
    raw = ev[COLUMN[cfg.gate_statistic]]
    value = None if raw is None or (isinstance(raw, float) and math.isnan(raw)) else float(raw)
    label = "win rate" if cfg.gate_statistic == "point" else f"win rate {cfg.gate_statistic}"
    if cfg.min_win_rate == 0:
        promoted, reason = True, "eval.min_win_rate is 0: every model is promoted"
    elif value is None:
        promoted, reason = False, f"no {label} to compare (the eval has no comparison)"
    else:
        promoted = value >= cfg.min_win_rate
        sign = ">=" if promoted else "<"
        reason = (f"{label} {value:.3f} {sign} eval.min_win_rate {cfg.min_win_rate:.3f} "
                  f"(wins {ev['wins']}, losses {ev['losses']}, ties {ev['ties']})")
    if not promoted:
        reason += f"; the next round starts from {policy} again"
    return {"model_version": model, "eval_version": eval_version, "promoted": promoted,
            "reason": reason, "statistic": cfg.gate_statistic, "value": value,
            "threshold": cfg.min_win_rate,
            "policy_version": model if promoted else policy,
            "policy_eval": eval_version if promoted else policy_eval}
