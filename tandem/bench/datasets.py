"""Prompt sets for the benchmark: ``random``, ``shared-prefix`` (multi-tenant) and ``sharegpt``.

Lengths are token counts. Without a tokenizer they are approximated by words: prompts are built
from common short English words, which byte-level BPE vocabularies (GPT-2, Llama, SmolLM) mostly
encode as one token each (" the", " water", ...), so N words is close to N tokens. The benchmark
never trusts these estimates for its results: token counts come from the server's ``usage``.
With a tokenizer (``tokenizer.json``) the prompts are cut to the exact token count.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from tandem.bench.config import BenchConfig, BenchError

# Output length used by the synthetic datasets when none is given.
DEFAULT_OUTPUT_LEN = 128

# ShareGPT filtering (same bounds as vLLM's benchmark): drop tiny turns and conversations that
# would not fit a 2k-context model.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048

# Common short English words; each is a single token (with its leading space) in the usual BPE
# vocabularies, which is what makes "one word ~ one token" a fair approximation.
WORDS = (
    "the of and to in is was for on that with as by at from his her they this be are have not but had "
    "one all were when we there can an which their said if do will each about how up out them then "
    "she many some so these would other into has more two like him see time could no make than first "
    "been its who now people my made over did down only way find use may water long little very after "
    "words called just where most know get through back much before go good new write our used me man "
    "too any day same right look think also around another came come work three word must because does "
    "part even place well such here take why things help put years different away again off went old "
    "number great tell men say small every found still between name should home big give air line set "
    "own under read last never us left end along while might next sound below saw something thought "
    "both few those always looked show large often together asked house world going want school "
    "important until form food keep children feet land side without boy once animals life enough took "
    "sometimes four head above kind began almost live page got earth need far hand high year mother "
    "light parts country father let night following picture being study second eyes soon times story "
    "boys since white days ever paper hard near sentence better best across during today others sure "
    "means early"
).split()


@dataclass(slots=True, frozen=True)
class SampledRequest:
    """One request to send: an optional system prompt, the user text and the wanted output length.

    ``expected_prompt_len`` is the dataset's estimate (words or tokenizer tokens, before any chat
    template); ``group`` names the tenant for ``shared-prefix``.
    """

    user: str
    expected_prompt_len: int
    output_len: int
    system: str | None = None
    group: str | None = None

    def completion_prompt(self) -> str:
        """The text sent as ``prompt`` to ``/v1/completions``: system prompt, blank line, user text."""
        return f"{self.system}\n\n{self.user}" if self.system else self.user

    def chat_messages(self) -> list[dict[str, str]]:
        """The ``messages`` sent to ``/v1/chat/completions``."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": self.user})
        return messages


class TextLengths:
    """Counts and builds text of a given length, in tokenizer tokens or (without one) in words."""

    def __init__(self, tokenizer_path: str | None) -> None:
        self._tokenizer = _load_tokenizer(tokenizer_path) if tokenizer_path else None

    @property
    def unit(self) -> str:
        """``"tokens"`` with a tokenizer, ``"words"`` without."""
        return "tokens" if self._tokenizer is not None else "words"

    def count(self, text: str) -> int:
        """Length of ``text`` in this object's unit."""
        if self._tokenizer is None:
            return len(text.split())
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def random_text(self, rng: random.Random, length: int) -> str:
        """Random common words, exactly ``length`` long in this object's unit."""
        if self._tokenizer is None:
            return " ".join(rng.choice(WORDS) for _ in range(length))
        # Every word is at least one token, so `length` words are enough; cut at `length` tokens.
        words = " ".join(rng.choice(WORDS) for _ in range(length))
        ids = self._tokenizer.encode(words, add_special_tokens=False).ids[:length]
        return self._tokenizer.decode(ids)


def _load_tokenizer(path: str):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file or a folder holding one."""
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise BenchError(f"tokenizer not found: {file} (pass a tokenizer.json or a folder holding one)")
    try:
        return Tokenizer.from_file(file)
    except Exception as exc:  # the tokenizers library raises a bare Exception on bad files
        raise BenchError(f"cannot load tokenizer {file}: {exc}") from None


def sample_requests(config: BenchConfig) -> tuple[list[SampledRequest], list[str]]:
    """Build ``config.num_prompts`` requests for ``config.dataset``, deterministic in ``config.seed``.

    Returns the requests and a list of warnings (e.g. a ShareGPT file with too few conversations).
    """
    lengths = TextLengths(config.tokenizer)
    rng = random.Random(config.seed)
    if config.dataset == "random":
        return _random_requests(config, lengths, rng), []
    if config.dataset == "shared-prefix":
        return _shared_prefix_requests(config, lengths, rng), []
    return _sharegpt_requests(config, lengths, rng)


def _jittered(rng: random.Random, length: int, range_ratio: float) -> int:
    """A length drawn uniformly from ``[length * (1 - r), length * (1 + r)]``, at least 1."""
    low = max(1, round(length * (1.0 - range_ratio)))
    high = max(low, round(length * (1.0 + range_ratio)))
    return rng.randint(low, high)


def _random_requests(config: BenchConfig, lengths: TextLengths, rng: random.Random) -> list[SampledRequest]:
    output_len = config.output_len or DEFAULT_OUTPUT_LEN
    requests = []
    for _ in range(config.num_prompts):
        input_len = _jittered(rng, config.input_len, config.range_ratio)
        requests.append(
            SampledRequest(
                user=lengths.random_text(rng, input_len),
                expected_prompt_len=input_len,
                output_len=_jittered(rng, output_len, config.range_ratio),
            )
        )
    return requests


def _shared_prefix_requests(
    config: BenchConfig, lengths: TextLengths, rng: random.Random
) -> list[SampledRequest]:
    """Multi-tenant traffic: ``num_prefixes`` tenants, each with one long system prompt of
    ``prefix_len``, and many short questions of ``input_len`` spread evenly over the tenants in a
    random order (so a prefix cache sees interleaved tenants, as in real traffic)."""
    output_len = config.output_len or DEFAULT_OUTPUT_LEN
    system_prompts = []
    for tenant in range(config.num_prefixes):
        # The tenant's name comes first so two tenants' prompts differ from the first token.
        header = f"Tenant {tenant}: you are the support assistant of company number {tenant}."
        body_len = max(0, config.prefix_len - lengths.count(header))
        system_prompts.append(f"{header} {lengths.random_text(rng, body_len)}".rstrip())
    tenants = [i % config.num_prefixes for i in range(config.num_prompts)]
    rng.shuffle(tenants)
    requests = []
    for tenant in tenants:
        question_len = _jittered(rng, config.input_len, config.range_ratio)
        system = system_prompts[tenant]
        requests.append(
            SampledRequest(
                user=lengths.random_text(rng, question_len) + "?",
                expected_prompt_len=lengths.count(system) + question_len,
                output_len=_jittered(rng, output_len, config.range_ratio),
                system=system,
                group=f"tenant-{tenant}",
            )
        )
    return requests


# Speaker names used by ShareGPT dumps (and by the role/content variant some dumps use).
_HUMAN = {"human", "user"}
_ASSISTANT = {"gpt", "assistant", "chatgpt", "bard", "bing"}


def _first_exchange(entry: object) -> tuple[str, str] | None:
    """The first (human, assistant) pair of a ShareGPT entry, or None when it has none."""
    if not isinstance(entry, dict):
        return None
    turns = entry.get("conversations", entry.get("conversation"))
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    first, second = turns[0], turns[1]
    if not isinstance(first, dict) or not isinstance(second, dict):
        return None
    speaker1 = str(first.get("from", first.get("role", ""))).lower()
    speaker2 = str(second.get("from", second.get("role", ""))).lower()
    text1 = first.get("value", first.get("content"))
    text2 = second.get("value", second.get("content"))
    if speaker1 not in _HUMAN or speaker2 not in _ASSISTANT:
        return None
    if not isinstance(text1, str) or not isinstance(text2, str):
        return None
    return text1, text2


def _sharegpt_requests(
    config: BenchConfig, lengths: TextLengths, rng: random.Random
) -> tuple[list[SampledRequest], list[str]]:
    """The first human turn of randomly chosen ShareGPT conversations; the output length is the
    length of the recorded reply unless ``--output-len`` is given."""
    path = config.dataset_path or ""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise BenchError(f"dataset file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchError(f"cannot read dataset file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BenchError(f"dataset file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise BenchError(f"dataset file {path} is not in ShareGPT format: expected a JSON list of conversations")

    order = list(range(len(data)))
    rng.shuffle(order)
    requests: list[SampledRequest] = []
    for index in order:
        if len(requests) == config.num_prompts:
            break
        exchange = _first_exchange(data[index])
        if exchange is None:
            continue
        prompt, reply = exchange
        prompt_len = lengths.count(prompt)
        output_len = config.output_len or lengths.count(reply)
        if prompt_len < SHAREGPT_MIN_LEN or output_len < SHAREGPT_MIN_LEN:
            continue
        if prompt_len > SHAREGPT_MAX_PROMPT_LEN or prompt_len + output_len > SHAREGPT_MAX_TOTAL_LEN:
            continue
        requests.append(SampledRequest(user=prompt, expected_prompt_len=prompt_len, output_len=output_len))

    if not requests:
        raise BenchError(
            f"dataset file {path} has no usable conversation: each entry needs 'conversations' starting with "
            f"a human turn then an assistant turn, between {SHAREGPT_MIN_LEN} and {SHAREGPT_MAX_PROMPT_LEN} "
            f"{lengths.unit} long"
        )
    warnings = []
    if len(requests) < config.num_prompts:
        warnings.append(
            f"dataset file {path} has only {len(requests)} usable conversations for {config.num_prompts} "
            "prompts: reusing them in order"
        )
        requests = [requests[i % len(requests)] for i in range(config.num_prompts)]
    return requests, warnings
