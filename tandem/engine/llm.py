"""The offline Python API, shaped like vLLM's: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from collections.abc import Sequence

from tandem.engine.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig, parse_memory
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.outputs import CompletionOutput, RequestDelta, RequestOutput
from tandem.engine.sampling_params import SamplingParams

PromptType = str | list[int] | dict


class LLM:
    """An engine for offline batched generation.

    ``model`` is a Hugging Face id (the bundled ``HuggingFaceTB/SmolLM2-135M-Instruct`` by default),
    a local directory of safetensors weights, a ``.gguf`` file, or ``preset:tiny-llama`` (random).
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "bfloat16",
        device: str = "cpu",
        max_model_len: int = 4096,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int = 2048,
        kv_cache_memory: str | int | float | None = None,
        num_blocks: int | None = None,
        seed: int = 0,
        num_threads: int | None = None,
        speculative_config: dict | None = None,
        progress: bool = True,
        attention_backend: str = "auto",
        max_long_partial_prefills: int = 1,
        long_prefill_token_threshold: int = 0,
    ) -> None:
        config = EngineConfig(
            attention_backend=attention_backend,
            speculative=None if speculative_config is None else SpeculativeConfig.from_dict(speculative_config),
            model=model,
            dtype=dtype,
            device=device,
            seed=seed,
            num_threads=num_threads,
            cache=CacheConfig(
                block_size=block_size,
                kv_cache_memory=None if kv_cache_memory is None else parse_memory(kv_cache_memory),
                num_blocks=num_blocks,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens if enable_chunked_prefill else max(
                    max_num_batched_tokens, max_model_len),
                enable_chunked_prefill=enable_chunked_prefill,
                max_model_len=max_model_len,
                max_long_partial_prefills=max_long_partial_prefills,
                long_prefill_token_threshold=long_prefill_token_threshold,
            ),
        )
        self.engine = LLMEngine(config, progress=progress)
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = True) -> "LLM":
        """Build from a full ``EngineConfig`` (what the command line produces)."""
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config, progress=progress)
        llm.tokenizer = llm.engine.tokenizer
        return llm

    def _to_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.engine.tokenize(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return prompt["prompt"], self.engine.tokenize(prompt["prompt"])
        return None, list(prompt)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string, token ids, or ``{"prompt_token_ids": [...]}``)."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        )
        if len(params_list) != len(prompts):
            raise ValueError("sampling_params: need one per prompt, or a single one")
        order: list[str] = []
        results: dict[str, RequestOutput] = {}
        for prompt, params in zip(prompts, params_list):
            text, ids = self._to_ids(prompt)
            rid = self.engine.add_request(None, ids, params)
            order.append(rid)
            results[rid] = RequestOutput(
                request_id=rid,
                prompt=text,
                prompt_token_ids=ids,
                outputs=[CompletionOutput(i, "", [], None, logprobs=[] if params.logprobs is not None else None)
                         for i in range(params.n)],
                finished=False,
            )
        try:
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    self._merge(results[delta.request_id], delta)
        except BaseException:
            self.engine.abort_request(order)
            raise
        for out in results.values():
            out.finished = True
        return [results[rid] for rid in order]

    @staticmethod
    def _merge(result: RequestOutput, delta: RequestDelta) -> None:
        comp = result.outputs[delta.index]
        comp.token_ids.extend(delta.new_token_ids)
        comp.text += delta.new_text
        if delta.new_logprobs and comp.logprobs is not None:
            comp.logprobs.extend(delta.new_logprobs)
            comp.cumulative_logprob = (comp.cumulative_logprob or 0.0) + sum(
                lp[t] for lp, t in zip(delta.new_logprobs, delta.new_token_ids)
            )
        if delta.prompt_logprobs is not None:
            result.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            comp.finish_reason = delta.finish_reason
            comp.stop_reason = delta.stop_reason
        result.num_cached_tokens = max(result.num_cached_tokens, delta.num_cached_tokens)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {"prompt_token_ids": self.engine.apply_chat_template(conv, add_generation_prompt)}  # type: ignore[arg-type]
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params)
