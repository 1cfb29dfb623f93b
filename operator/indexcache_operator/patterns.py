"""IndexCache layer patterns: one letter per layer, F runs its indexer, S reuses the top-k indices
of the nearest preceding F layer (upstream semantics, see docs/contracts.md)."""
from __future__ import annotations

import re

_PATTERN = re.compile(r"^F[FS]*$")


def pattern_from_freq(num_layers: int, freq: int, offset: int = 2) -> str:
    """Upstream rule: layer l is S iff max(l - offset + 1, 0) % freq != 0; layer 0 is always F.

    47 layers, freq 4, offset 2 -> F at 0, 1, 5, 9, ..., 45 (13 F)."""
    letters = ["S" if max(layer - offset + 1, 0) % freq != 0 else "F" for layer in range(num_layers)]
    letters[0] = "F"
    return "".join(letters)


def full_layers(pattern: str) -> int:
    return pattern.count("F")


def pattern_problem(pattern: str, num_layers: int | None) -> str | None:
    """Why `pattern` cannot run on a model of `num_layers` layers, or None if it can."""
    if not _PATTERN.match(pattern):
        return f"pattern {pattern[:40]!r} must use only F and S and start with F"
    if num_layers is not None and len(pattern) != num_layers:
        return (f"pattern has {len(pattern)} layers but model.numLayers is {num_layers}: "
                f"give one letter per layer")
    return None
