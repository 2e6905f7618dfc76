"""The model's tokenizer and chat template, loaded from local files only."""

from __future__ import annotations

import os

from shared.models import ModelFiles


class Tokenizer:
    """Wraps a Hugging Face tokenizer: prompt text or chat messages -> token ids, ids -> text."""

    def __init__(self, files: ModelFiles):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import AutoTokenizer  # heavy: import only in the frontend process

        kwargs = {"gguf_file": files.gguf_file} if files.gguf_file else {}
        self.hf = AutoTokenizer.from_pretrained(files.directory, **kwargs)
        self.eos_token_id = self.hf.eos_token_id
        self.has_chat_template = bool(getattr(self.hf, "chat_template", None))

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template renders special tokens itself, so none are added on encoding."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template: send a prompt instead of messages")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)
