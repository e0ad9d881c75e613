"""Prompt tokenization for routing, matching the engine token for token, without torch or transformers.

The engine tokenizes with transformers; the router must produce the same ids or its block hashes would never
match the engines'. So: completions encode the prompt with special tokens (like ``tokenizer(prompt)``), chat
renders the model's jinja chat template like ``apply_chat_template`` (same sandbox, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``) and encodes the text without adding special tokens again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TemplateError(ValueError):
    """The chat template rejected the conversation (its ``raise_exception`` was called)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens either as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def flatten_content(content: Any) -> Any:
    """OpenAI content parts -> one string (text parts joined by newlines), as vLLM does for text models."""
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return "\n".join(texts)
    return content


class PromptTokenizer:
    """The model's tokenizer and chat template, loaded from a directory with tokenizer.json."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template_text = None
        template_path = directory / "chat_template.jinja"
        if template_path.exists():
            template_text = template_path.read_text()
        elif isinstance(config.get("chat_template"), str):
            template_text = config["chat_template"]
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        self._template = env.from_string(template_text) if template_text else None

    def encode_prompt(self, text: str) -> list[int]:
        """Completion prompt -> ids, with the tokenizer's special tokens (``tokenizer(prompt).input_ids``)."""
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render the chat template for ``messages`` to the prompt text."""
        if self._template is None:
            raise TemplateError("the model has no chat template")
        conversation = [{**m, "content": flatten_content(m.get("content"))} for m in messages]
        return self._template.render(
            messages=conversation,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Chat messages -> ids, like ``apply_chat_template(messages, tokenize=True)``."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self._tokenizer.encode(text, add_special_tokens=False).ids
