"""bench/RESULTS.md's summary table is generated from the raw result files (bench/summary.py): the committed
table matches what the files say, a number changed in a file changes the table, and every raw result file
is cited somewhere a reader looks (RESULTS.md or docs/)."""
import fnmatch
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_summary", ROOT / "bench" / "summary.py")
summary = importlib.util.module_from_spec(_spec)
sys.modules["bench_summary"] = summary          # dataclasses look their module up there
_spec.loader.exec_module(summary)


def test_the_committed_summary_table_is_what_the_result_files_say():
    assert summary.main(["--check"]) == 0, "run: python bench/summary.py"


def test_a_number_changed_in_a_result_file_changes_the_table(tmp_path):
    row = summary.ROWS[0]
    data = json.loads((ROOT / row.source).read_text())
    before = row.cells()[1]
    summary.lookup(data, "rows[context=200000,pattern=all-F]")["prefill_s"] = 12.345
    moved = tmp_path / "model.json"
    moved.write_text(json.dumps(data))
    changed = summary.Row(row.metric, str(moved), row.render, row.target, row.command).cells()[1]
    assert changed != before and changed.startswith("12.35 s /")


def test_lookup_names_the_path_it_could_not_follow():
    data = {"rows": [{"context": 1, "x": 2}], "top": [{"a": 1}]}
    assert summary.lookup(data, "rows[context=1].x") == 2
    with pytest.raises(KeyError, match=r"rows\[context=7\].x: no element"):
        summary.lookup(data, "rows[context=7].x")
    assert summary.lookup([{"c": 3, "v": 9}], "[c=3].v") == 9


def test_every_raw_result_file_is_cited():
    """A raw file nothing names is noise for a newcomer: cite it in RESULTS.md or docs/, or delete it."""
    texts = [(ROOT / "bench" / "RESULTS.md").read_text(), (ROOT / "bench" / "summary.py").read_text()]
    texts += [p.read_text() for p in (ROOT / "docs").rglob("*.md")]
    texts += [p.read_text() for p in (ROOT / "bench" / "results").glob("*.md")]
    cited = set(re.findall(r"[\w.*-]+\.(?:jsonl|json|log|md)", "\n".join(texts)))
    uncited = [p.name for p in sorted((ROOT / "bench" / "results").iterdir())
               if not any(fnmatch.fnmatch(p.name, pattern) for pattern in cited)]
    assert not uncited, f"bench/results files cited nowhere: {uncited}"
