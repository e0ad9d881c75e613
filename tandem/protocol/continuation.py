"""Mid-stream migration's contract between the router and the engines (torch-free).

``return_token_ids`` (vLLM's request field): every streamed choice carries the ``token_ids`` it adds, and the
first chunk the prompt's ``prompt_token_ids``; a whole response carries them on its choices. The router asks for
them on every single-choice stream it relays, and strips them unless its client asked too.

``tandem_continuation`` (internal; the router sends it, never a client): resume a request whose worker failed
mid-stream. Its ``prompt_token_ids`` replace the prompt (messages are not rendered again); the last
``num_output_tokens`` of them are the request's own earlier output, which penalties count as output, seeded
sampling skips the draws of, and the detokenizer and stop strings see as text so far; ``num_output_chars`` of
that text already reached the client, so the resumed stream starts after them (text an engine held back as a
possible stop string is sent, not lost).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

RETURN_TOKEN_IDS = "return_token_ids"
CONTINUATION_FIELD = "tandem_continuation"


class Continuation(BaseModel):
    """The ``tandem_continuation`` request field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_token_ids: list[StrictInt] = Field(min_length=1)
    num_output_tokens: StrictInt = Field(ge=0)
    num_output_chars: StrictInt = Field(ge=0)

    @model_validator(mode="after")
    def _output_within_prompt(self) -> "Continuation":
        if self.num_output_tokens >= len(self.prompt_token_ids):
            raise ValueError("tandem_continuation.num_output_tokens: must be less than the number of prompt_token_ids")
        return self
