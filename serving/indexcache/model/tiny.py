"""A tiny random DSA model and a character tokenizer: the `--tiny` model of `indexcache serve`, for
tests and demos on machines without the SmolLM2 DSA checkpoint. Its text is gibberish; its numbers
(batching, pattern switches, metrics) are real. Deterministic for a given seed.
"""
from __future__ import annotations

import torch

from .config import ModelArgs
from .dsa import DSAForCausalLM

# ids 0 (<pad>) and 1 (<eos>), then printable ASCII 32..126 and newline: 98 tokens.
SPECIALS = ("<pad>", "<eos>")
CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"
TINY_CONFIG = dict(model_type="llama_dsa", vocab_size=len(SPECIALS) + len(CHARS), dim=64, n_layers=6,
                   max_seq_len=512, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=96, index_n_heads=16,
                   index_head_dim=16, index_rope_head_dim=8, index_topk=16, eos_token_id=1)
TINY_MODEL_NAME = "indexcache-tiny"


def tiny_model(seed: int = 0, **overrides) -> DSAForCausalLM:
    """Random weights, scaled so that logits are peaked enough for varied but stable greedy output.
    16 indexer heads make exact top-k score ties practically impossible."""
    gen = torch.Generator().manual_seed(seed)
    model = DSAForCausalLM(ModelArgs(**{**TINY_CONFIG, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


class CharTokenizer:
    """One token per character (printable ASCII and newline); the CheckpointTokenizer interface."""
    eos_token_id = 1
    bos_token_id = None
    pad_token_id = 0
    chat_template = "{role}: {content}\n ... assistant: "
    stop_token_ids = [1]
    name = "indexcache-tiny-chars"

    def __init__(self):
        self.vocab_size = len(SPECIALS) + len(CHARS)
        self._ids = {c: i + len(SPECIALS) for i, c in enumerate(CHARS)}

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self._ids})
        if unknown:   # say which characters, instead of silently dropping them
            raise ValueError(f"the tiny model's tokenizer knows printable ASCII only; "
                             f"the text contains {''.join(unknown[:10])!r}")
        return [self._ids[c] for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            if i < len(SPECIALS):
                if not skip_special_tokens:
                    out.append(SPECIALS[i])
            else:
                out.append(CHARS[i - len(SPECIALS)])
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(text + ("assistant: " if add_generation_prompt else ""))


# The same template as CharTokenizer.apply_chat_template, in the Jinja form checkpoints carry.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def save_char_tokenizer(path) -> None:
    """CharTokenizer as tokenizer.json + tokenizer_config.json, so that a tiny model written as a
    checkpoint (the bundled name `tiny` in `indexcache fetch/calibrate/...`) loads with load_tokenizer and
    encodes text exactly as the in-memory CharTokenizer does."""
    import json
    from pathlib import Path

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(SPECIALS)} | {c: i + len(SPECIALS) for i, c in enumerate(CHARS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")   # every character
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIALS))
    path = Path(path)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": SPECIALS[0], "eos_token": SPECIALS[1],
        "chat_template": CHAT_TEMPLATE}, indent=1))
