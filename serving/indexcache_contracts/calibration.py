"""The calibration result: what `indexcache calibrate` writes (`--out` file, and the ConfigMap
`<job>-result` under RESULT_KEY with `--report-configmap`) and what the operator reads back to gate and
roll out a pattern (docs/contracts.md, "Calibration result")."""
from __future__ import annotations

import json
import math
from typing import Any

from .pattern import pattern_problem

RESULT_KEY = "result.json"          # the ConfigMap data key (and the Job's --out file name)


def result_configmap_name(job_name: str) -> str:
    """The ConfigMap a recalibration Job reports to."""
    return f"{job_name}-result"


# key -> the JSON types it may hold (NoneType: may be null). The operator reads pattern, loss_delta and
# num_layers; the rest is what a person reads in the file (summary table, overlap, provenance).
_NUMBER, _NULL = (float, int), type(None)
REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "pattern": (str,), "full_layers": (int,), "num_layers": (int,), "target_full": _NUMBER,
    "loss_all_full": _NUMBER, "loss": _NUMBER, "loss_delta": _NUMBER, "step_losses": (list,),
    "uniform_pattern": (str,), "uniform_loss": _NUMBER + (_NULL,), "uniform_loss_delta": _NUMBER + (_NULL,),
    "overlap": (dict,), "num_samples": (int,), "num_tokens": (int,), "model_id": (str,),
    "duration_s": _NUMBER, "passes": (int,), "passes_saved": (int,), "version": (str,),
}
# written by every current calibrate, absent from older results; readers ignore keys they do not know
OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "flip_order": (list,), "skipped_samples": (int,), "seed": (int,), "activation_reuse": (bool,),
    "resumed_at_step": (int, _NULL),
}


def check_calibration_result(result: Any) -> dict:
    """A calibration result with every field of the right kind, a pattern that fits num_layers and a
    finite loss_delta; returns it, or raises ValueError naming the field."""
    if not isinstance(result, dict):
        raise ValueError(f"a calibration result is a JSON object, got {type(result).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in result]
    if missing:
        raise ValueError(f"calibration result lacks {missing}")
    for key, kinds in {**REQUIRED_FIELDS, **OPTIONAL_FIELDS}.items():
        if key not in result:
            continue
        value = result[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(f"calibration result.{key} has the wrong type: {value!r}")
    why = pattern_problem(result["pattern"], result["num_layers"], field="calibration result.pattern",
                          num_layers_field="num_layers")
    if why:
        raise ValueError(why)
    if result["full_layers"] != result["pattern"].count("F"):
        raise ValueError(f"calibration result.full_layers is {result['full_layers']} but the pattern has "
                         f"{result['pattern'].count('F')} F layers")
    if not math.isfinite(result["loss_delta"]):
        raise ValueError(f"calibration result.loss_delta must be a finite number, got {result['loss_delta']!r}")
    return result


def read_calibration_result(raw: str) -> dict:
    """The ConfigMap's (or file's) text -> a checked result."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"calibration result is not JSON: {exc}") from None
    return check_calibration_result(data)
