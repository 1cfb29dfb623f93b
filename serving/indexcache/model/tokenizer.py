"""The tokenizer and chat template of a checkpoint directory (tokenizer.json + tokenizer_config.json).

Loaded with transformers' AutoTokenizer, which reads the files only: it works for `llama_dsa`
checkpoints whose config.json model_type transformers does not know.
"""
from __future__ import annotations

import functools
from pathlib import Path


class CheckpointTokenizer:
    """Text <-> token ids for one checkpoint, plus its chat template and stop tokens."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.bos_token_id = hf_tokenizer.bos_token_id
        self.eos_token_id = hf_tokenizer.eos_token_id
        self.pad_token_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None \
            else hf_tokenizer.eos_token_id
        self.vocab_size = len(hf_tokenizer)

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation ends at any of these (the template's end-of-turn and the end-of-text token)."""
        return list(self._stop_token_ids)

    @functools.cached_property
    def _stop_token_ids(self) -> tuple[int, ...]:
        # once per tokenizer: get_vocab() builds a dict of the whole vocabulary (50 ms for SmolLM2's 49K
        # tokens here, holding the GIL the engine thread needs, on every request before this was cached)
        vocab = self.hf.get_vocab()
        ids = {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return tuple(sorted(ids))

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, no special tokens added (SmolLM2 adds no BOS)."""
        # verbose=False: long documents are windowed by the caller; the length warning is noise.
        return self.hf.encode(text, add_special_tokens=False, verbose=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.hf(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """OpenAI-style messages -> prompt ids, rendered with the checkpoint's own template."""
        if not self.chat_template:
            raise ValueError("this checkpoint's tokenizer has no chat template; "
                             "use /v1/completions with a plain prompt instead")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.encode(text)


def load_tokenizer(checkpoint_dir) -> CheckpointTokenizer:
    """The tokenizer saved in checkpoint_dir (written by `indexcache convert`)."""
    from transformers import AutoTokenizer, PretrainedConfig

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir} has no tokenizer.json; write the checkpoint with "
            "`indexcache convert smollm2 --out DIR` or copy the model's tokenizer files into it")
    # config=: the tokenizer files say which tokenizer this is; without it transformers also reads config.json,
    # does not know model_type `llama_dsa`, and warns that the "model" may be incompatible (no model is built)
    return CheckpointTokenizer(AutoTokenizer.from_pretrained(str(checkpoint_dir), config=PretrainedConfig()))
