"""Stop strings: the incremental TextStream (decodes and searches only a tail window per token) against its
slow twin (decode the whole output and search all of it, every token), on random outputs and stop strings,
with the tiny model's character tokenizer and with a byte-level BPE whose tokens split UTF-8 characters."""
import random

import pytest

from indexcache.serving.detokenizer import TextStream
from indexcache.model.tiny import CharTokenizer

TEXTS = ["Grüße aus Zürich — naïve café ☕ und 日本語のテキスト 🙂🙃 stop here",
         "the index cache shares top-k indices between layers; déjà vu 💡 42 €",
         "Ελληνικά και русский текст, 中文 and plain ASCII text\nwith newlines"]


def whole_output(decode, ids, stops):
    """The slow, obviously right twin: -> (text up to the first stop string, tokens consumed when it hit,
    or None). Unfinished trailing characters (U+FFFD until their bytes arrive) are not matched until the end."""
    text = ""
    for n in range(1, len(ids) + 1):
        text = decode(ids[:n])
        if n < len(ids):
            text = text.rstrip("\ufffd")
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[:min(hits)], n
    return text, None


def incremental(decode, ids, stops):
    """-> (streamed text, tokens consumed when a stop string hit, or None), feeding TextStream token by token."""
    stream, pieces = TextStream(decode, stops), []
    for n, token in enumerate(ids, start=1):
        delta, stopped = stream.push(token, final=n == len(ids))
        pieces.append(delta)
        if stopped:
            return "".join(pieces), n
    return "".join(pieces), None


def random_stops(rng, text, alphabet):
    """1-4 stop strings: substrings of the output (so they hit) and random strings (which mostly miss)."""
    stops = []
    for _ in range(rng.randint(1, 4)):
        if text and rng.random() < 0.7:
            i = rng.randrange(len(text))
            s = text[i:i + rng.randint(1, 6)].replace("\ufffd", "")
        else:
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
        if s:
            stops.append(s)
    return stops


def check_twins(decode, outputs, alphabet, seed):
    rng = random.Random(seed)
    hits = 0
    for ids in outputs:
        stops = random_stops(rng, decode(ids), alphabet)
        want = whole_output(decode, ids, stops)
        assert incremental(decode, ids, stops) == want, (ids, stops)
        hits += want[1] is not None
    return hits


def test_char_tokenizer_cuts_like_the_whole_output_check():
    tok = CharTokenizer()
    rng = random.Random(0)
    alphabet = "abc de"
    outputs = [[rng.choice(tok.encode(alphabet)) for _ in range(rng.randint(0, 60))] for _ in range(400)]
    hits = check_twins(tok.decode, outputs, alphabet, seed=1)
    assert 100 < hits < 400   # both outcomes exercised: stops that hit and stops that never do


@pytest.fixture(scope="module")
def byte_bpe():
    """A small byte-level BPE trained on the spot (no download): tokens hold parts of UTF-8 characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def test_byte_level_bpe_cuts_like_the_whole_output_check(byte_bpe):
    decode = byte_bpe.decode
    rng = random.Random(2)
    real = [byte_bpe.encode(t).ids for t in TEXTS]
    assert any("\ufffd" in decode(ids[:n]) for ids in real for n in range(len(ids))), \
        "the BPE never splits a character: this test would not exercise unfinished characters"
    outputs = []
    for _ in range(150):   # pieces of real text (valid UTF-8 split mid-character) ...
        ids = rng.choice(real)
        i = rng.randrange(len(ids))
        outputs.append(ids[i:i + rng.randint(1, 40)])
    for _ in range(100):   # ... and random token soup (invalid UTF-8 too)
        outputs.append([rng.randrange(byte_bpe.get_vocab_size()) for _ in range(rng.randint(1, 30))])
    hits = check_twins(decode, outputs, "éü日🙂 ab", seed=3)
    assert hits > 50


def test_streamed_pieces_never_show_a_stop_string_or_its_start():
    """What a streaming client sees: no piece ever contains the stop string, and a prefix of it that turns
    out not to be a stop is released once it cannot be one."""
    tok = CharTokenizer()
    stream = TextStream(tok.decode, ["END"])
    pieces = [stream.push(t)[0] for t in tok.encode("abcEN")]
    assert "".join(pieces) == "abc"                    # "EN" held back: it may become "END"
    assert stream.push(tok.encode("x")[0]) == ("ENx", False)
    assert stream.push(tok.encode("E")[0]) == ("", False)
    assert stream.push(tok.encode("N")[0]) == ("", False)
    assert stream.push(tok.encode("D")[0]) == ("", True)
