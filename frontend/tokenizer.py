"""The model's tokenizer and chat template, loaded from local files only."""

from __future__ import annotations

import os
import re

from shared.models import ModelFiles

# Roles every chat client sends (OpenAI's, with "tool" and "developer"); a template may know more.
STANDARD_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# A role a template names literally: `message['role'] == 'ipython'`, `role == "tool"` ...
_ROLE_IN_TEMPLATE = re.compile(r"""role['"]?\]?\s*==\s*['"]([A-Za-z_][\w-]*)['"]""")


class Tokenizer:
    """Wraps a Hugging Face tokenizer: prompt text or chat messages -> token ids, ids -> text."""

    def __init__(self, files: ModelFiles):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import AutoTokenizer  # heavy: import only in the frontend process

        kwargs = {"gguf_file": files.gguf_file} if files.gguf_file else {}
        self.hf = AutoTokenizer.from_pretrained(files.directory, **kwargs)
        self.eos_token_id = self.hf.eos_token_id
        template = getattr(self.hf, "chat_template", None)
        self.has_chat_template = bool(template)
        self.chat_roles = chat_roles(template if isinstance(template, str) else "")

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template renders special tokens itself, so none are added on encoding."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template: send a prompt instead of messages")
        check_roles(messages, self.chat_roles)
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.hf.encode(text, add_special_tokens=False))

    def serialized(self) -> str:
        """The tokenizer as Hugging Face `tokenizers` JSON (what llguidance reads in the scheduler),
        or "" when it is not a fast tokenizer (structured output then fails with that reason)."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        return backend.to_str() if backend is not None else ""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)


def chat_roles(template: str) -> frozenset[str]:
    """The roles a chat template takes: the standard ones and any it names itself. (A template
    such as ChatML renders any role string, but a role the model never saw in training, say
    "wizard", is a client's mistake, not a request to honour.)"""
    return STANDARD_ROLES | frozenset(_ROLE_IN_TEMPLATE.findall(template))


class UnknownRole(ValueError):
    """A chat message's role that the model's chat template does not take."""


def check_roles(messages: list[dict[str, str]], roles: frozenset[str]) -> None:
    for i, message in enumerate(messages):
        if message["role"] not in roles:
            raise UnknownRole(f"messages[{i}].role {message['role']!r} is not a role this model's chat template "
                              f"takes: use one of {', '.join(sorted(roles))}")
