"""Prompt tokenization for routing, matching the engine token for token, without torch or transformers.

The engine tokenizes with transformers; the router must produce the same ids or its block hashes would never
match the engines'. So: completions encode the prompt with special tokens (like ``tokenizer(prompt)``), chat
renders the model's jinja chat template like ``apply_chat_template`` (same sandbox, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``) and encodes the text without adding special tokens again. Messages and
tools are brought to the template's input by the one normaliser the engine uses too (``tandem.protocol.chat``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from tandem.protocol.anthropic import from_raw
from tandem.protocol.chat import TemplateFeatures, chat_template_input
from tandem.protocol.errors import from_value_error
from tandem.router.errors import RequestError


class TemplateError(ValueError):
    """The chat template rejected the conversation (its ``raise_exception`` was called)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens either as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


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
        self.features = TemplateFeatures.of(template_text)

    def encode_prompt(self, text: str) -> list[int]:
        """Completion prompt -> ids, with the tokenizer's special tokens (``tokenizer(prompt).input_ids``)."""
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render the chat template for ``messages`` (already normalised) to the prompt text."""
        if self._template is None:
            raise TemplateError("the model has no chat template")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Chat messages -> ids, like ``apply_chat_template(messages, tokenize=True)``."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_chat_request(self, messages: Any, tools: Any = None, add_generation_prompt: bool = True,
                            chat_template_kwargs: Any = None) -> list[int]:
        """An OpenAI chat request's messages and tools -> prompt ids, exactly as the engine renders them.
        Raises ValueError naming the bad field (TemplateError when the template rejects the conversation)."""
        inp = chat_template_input(messages, tools, self.features, chat_template_kwargs)
        return self.encode_chat(inp.messages, add_generation_prompt=add_generation_prompt, **inp.template_kwargs())

    def decode(self, token_ids: list[int]) -> str:
        """Token ids -> text, special tokens kept (as the engine's ``/detokenize`` answers)."""
        return self._tokenizer.decode(token_ids, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)


def chat_token_ids(tokenizer: PromptTokenizer, body: dict[str, Any]) -> list[int]:
    """A chat request body's prompt ids, or a 400 ``RequestError`` naming the bad field."""
    add_generation_prompt = body.get("add_generation_prompt", True)
    if not isinstance(add_generation_prompt, bool):
        raise RequestError(400, "add_generation_prompt: must be a boolean", "add_generation_prompt")
    try:
        return tokenizer.encode_chat_request(body.get("messages"), body.get("tools"), add_generation_prompt,
                                             body.get("chat_template_kwargs"))
    except TemplateError as exc:
        raise RequestError(400, f"messages: chat template error: {exc}", "messages") from exc
    except (TypeError, ValueError) as exc:
        err = from_value_error(exc) if isinstance(exc, ValueError) else None
        if err is not None and err.param is not None:
            raise RequestError(400, err.message, err.param) from exc
        raise RequestError(400, f"messages: malformed messages: {exc}", "messages") from exc


def load_model_tokenizer(model: str) -> PromptTokenizer:
    """``model``'s tokenizer, its files found as the engine finds the model (``tandem.protocol.model_source``).

    A Hub model (``hf://ORG/NAME`` or ``ORG/NAME``) fetches only its tokenizer files, into the same Hugging Face
    cache the engine uses; a bundled GGUF model is converted once (in a child process: the router never loads
    torch). Raises ``ModelNotFoundError`` with one line when the files cannot be found or fetched.
    """
    from tandem.protocol.model_source import tokenizer_dir

    return PromptTokenizer(tokenizer_dir(model))


def messages_token_ids(tokenizer: PromptTokenizer, body: dict[str, Any]) -> list[int]:
    """An Anthropic Messages request's prompt ids (mapped to chat by ``tandem.protocol.anthropic``), or a 400."""
    try:
        chat = from_raw(body)
    except ValueError as exc:
        err = from_value_error(exc)
        raise RequestError(400, err.message, err.param or "messages") from exc
    return chat_token_ids(tokenizer, chat)
