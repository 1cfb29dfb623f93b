"""IndexCache layer patterns, as the operator names them. The rule lives in `indexcache_contracts.pattern`,
shared with the serving model, so a spec's freq/offset gives the replicas' pattern letter for letter."""
from __future__ import annotations

from indexcache_contracts.pattern import full_layer_count as full_layers  # noqa: F401
from indexcache_contracts.pattern import pattern_from_freq  # noqa: F401
from indexcache_contracts.pattern import pattern_problem as _pattern_problem


def pattern_problem(pattern: str, num_layers: int | None) -> str | None:
    """Why `pattern` cannot run on a model of `num_layers` layers (spec.model.numLayers), or None if it can."""
    return _pattern_problem(pattern, num_layers, field="pattern", num_layers_field="model.numLayers")
