"""Ship a calibration result as the bundled SmolLM2 model's default IndexCache pattern.

    python tools/ship_pattern.py --result calibration_result.json --command "indexcache calibrate ..."

Writes serving/indexcache/artifacts/smollm2-dsa/pattern.json: the result as `indexcache calibrate` wrote it
(the contract's schema, checked), plus `indexer_sha256` (the sha256 of the artifact's indexer.safetensors,
which the result must have been calibrated with) and `calibration_command` (how to reproduce it).
`indexcache serve` then runs that pattern by default; loading refuses it (all-F, with a warning) if the
indexer file ever changes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serving"))

from indexcache.offline.smollm2 import PATTERN_FILE, artifact_dir, bundled_indexer, file_sha256  # noqa: E402
from indexcache_contracts.calibration import read_calibration_result  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--result", required=True, help="the calibration result JSON (indexcache calibrate --out)")
    p.add_argument("--command", required=True, help="the command lines that produced it (recorded as is)")
    args = p.parse_args(argv)
    result = read_calibration_result(Path(args.result).read_text())
    result["indexer_sha256"] = file_sha256(bundled_indexer())
    result["calibration_command"] = args.command
    out = artifact_dir() / PATTERN_FILE
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"# {result['pattern']} ({result['full_layers']}/{result['num_layers']} F) -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
