"""Detokenising one request's output for streaming, cut at the first stop string (`TextStream`)."""


def _holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could still become a stop string and must not be streamed yet."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class TextStream:
    """One request's generated token ids -> text to stream, cut at the first stop string.

    The obvious way (decode all output ids and search all the text, every token) is quadratic in the
    output. Here each token costs work proportional to the stop strings and the last token or two:
      - decoding: only the tokens since the last point where the text was complete, with the tokens
        before it as context (a byte-level BPE token may hold half of a UTF-8 character, a SentencePiece
        token's leading space depends on its left neighbour); `text` grows by the difference;
      - searching: only `visible[searched - (longest stop - 1):]`, the new text plus the characters
        before it that a new match could start in (a match wholly inside the old text was found earlier).
    `visible` is the text so far without a trailing unfinished character (U+FFFD while its bytes are
    still coming); at the end everything is flushed. The slow twin in tests/serving/test_text_stream.py
    (decode and search everything each token) cuts at the same token and the same character.
    """

    def __init__(self, decode, stops=()):
        self.decode = decode
        self.stops = list(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.prefix = 0          # first token of the decoding context
        self.read = 0            # ids[:read] are decoded into `text`
        self.text = ""           # decode(ids[:read]): complete characters only
        self.tail = ""           # text of ids[read:], may end in unfinished characters
        self.searched = 0        # no stop string ends inside visible[:searched]
        self.sent = 0            # visible[:sent] has been streamed

    def push(self, token_id: int | None, final: bool = False) -> tuple[str, bool]:
        """Add one generated token (None: none, e.g. an end without a token); `final`: the request ended.
        Returns (text to stream now, whether a stop string ended the text; then nothing more comes)."""
        if token_id is not None:
            self.ids.append(token_id)
            context = self.decode(self.ids[self.prefix:self.read])
            self.tail = self.decode(self.ids[self.prefix:])[len(context):]
            if self.tail and not self.tail.endswith("\ufffd"):
                self.text += self.tail
                self.prefix, self.read, self.tail = self.read, len(self.ids), ""
        tail = self.tail if final else self.tail.rstrip("\ufffd")
        total = len(self.text) + len(tail)
        start = max(0, self.searched - max(self.longest - 1, 0))     # <= self.sent
        window = self.text[start:] + tail if start <= len(self.text) else tail[start - len(self.text):]
        self.searched = total
        cut = min((i for i in (window.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            end, stopped = start + cut, True
        else:
            end, stopped = (total if final else total - _holdback(window, self.stops)), False
        delta = window[self.sent - start:max(end, self.sent) - start]
        self.sent = max(end, self.sent)
        return delta, stopped
