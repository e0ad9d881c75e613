"""Structured output: the request parser (torch-free) and the engine's grammar-constrained sampling."""

from __future__ import annotations

import pytest

from tandem.protocol.structured_output import StructuredOutputSpec, parse_structured_output

SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


# ---- parsing the request fields ------------------------------------------------------------------
@pytest.mark.parametrize("body, kind", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}},
     "json"),
    ({"response_format": {"type": "json_object"}}, "json_object"),
    ({"structured_outputs": {"json": SCHEMA}}, "json"),
    ({"structured_outputs": {"regex": "[0-9]+"}}, "regex"),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice"),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar"),
    ({"structured_outputs": {"json_object": True}}, "json_object"),
    ({"guided_json": SCHEMA}, "json"),
    ({"guided_json": '{"type": "object"}'}, "json"),
    ({"guided_regex": "a|b"}, "regex"),
    ({"guided_choice": ["a", "b"]}, "choice"),
    ({"guided_grammar": 'root ::= "a"'}, "grammar"),
])
def test_parse_each_spelling(body, kind):
    spec = parse_structured_output(body)
    assert spec is not None and spec.kind == kind


def test_parse_nothing_asked():
    assert parse_structured_output({}) is None
    assert parse_structured_output({"response_format": {"type": "text"}, "guided_json": None}) is None
    assert parse_structured_output({"structured_outputs": {"json_object": False}}) is None


def test_spec_is_hashable_and_canonical():
    a = StructuredOutputSpec("json", {"type": "object", "b": 1})
    b = StructuredOutputSpec("json", '{"type": "object",  "b": 1}', field="guided_json")
    assert a == b and hash(a) == hash(b)  # one compiled grammar for equal schemas, whatever the field
    assert list(a.schema) == ["type", "b"]  # key order is kept: properties are generated in it
    assert StructuredOutputSpec("choice", ["x", "y"]).value == ("x", "y")


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": "y"}}},
     "response_format.json_schema.strict"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": "yes"}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["a", 3]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object"),
    ({"structured_outputs": []}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": 5}, "guided_grammar"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
])
def test_parse_errors_name_the_field(body, field):
    with pytest.raises(ValueError) as info:
        parse_structured_output(body)
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_protocol_module_imports_neither_torch_nor_xgrammar():
    import subprocess
    import sys

    code = ("import sys, tandem.protocol.structured_output; "
            "print(sorted(m for m in ('torch', 'xgrammar') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- the engine: real model, grammar-constrained sampling ------------------------------------------
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

import jsonschema  # noqa: E402

from tandem import LLM, SamplingParams  # noqa: E402

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}}, "required": ["name", "age"]}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]


@pytest.fixture(scope="module")
def llm(smol_dir):
    return LLM(model=str(smol_dir), dtype="float32", max_model_len=512, num_blocks=96, num_threads=1,
               progress=False)


def constrained(spec: StructuredOutputSpec, **params) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 40, **params}, structured_output=spec)


def chat_text(llm, params: SamplingParams, messages=ASK_PERSON) -> list:
    return llm.chat(messages, params)[0].outputs


@pytest.mark.slow
def test_json_schema_output_validates(llm):
    spec = parse_structured_output({"response_format": {"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON, "strict": True}}})
    (out,) = chat_text(llm, constrained(spec))
    jsonschema.validate(json.loads(out.text), PERSON)
    assert out.finish_reason == "stop"  # the grammar completed: the request ended there, not at max_tokens
    assert out.token_ids[-1] == llm.engine.eos_token_id
    free = chat_text(llm, SamplingParams(temperature=0, max_tokens=40))[0]
    with pytest.raises(ValueError):
        json.loads(free.text)  # the same prompt unconstrained is prose: the grammar made the difference


@pytest.mark.slow
def test_json_object_gives_an_object(llm):
    (out,) = chat_text(llm, constrained(parse_structured_output({"response_format": {"type": "json_object"}})))
    assert isinstance(json.loads(out.text), dict) and out.finish_reason == "stop"


@pytest.mark.slow
def test_regex_choice_and_ebnf_grammar(llm):
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    (out,) = chat_text(llm, constrained(StructuredOutputSpec("regex", pattern)))
    assert re.fullmatch(pattern, out.text) and out.finish_reason == "stop"
    choices = ["Paris", "London", "Rome"]
    (out,) = chat_text(llm, constrained(parse_structured_output({"guided_choice": choices})),
                       [{"role": "user", "content": "What is the capital of Italy?"}])
    assert out.text in choices and out.finish_reason == "stop"
    grammar = 'root ::= "The sky is " colour "."\ncolour ::= "blue" | "green" | "red"'
    (out,) = chat_text(llm, constrained(parse_structured_output({"structured_outputs": {"grammar": grammar}})),
                       [{"role": "user", "content": "What colour is the sky?"}])
    assert re.fullmatch(r"The sky is (blue|green|red)\.", out.text), out.text


@pytest.mark.slow
def test_n_samples_each_follow_the_grammar(llm):
    outs = chat_text(llm, constrained(StructuredOutputSpec("json", PERSON), temperature=1.0, n=3, seed=7,
                                      max_tokens=48))
    texts = [o.text for o in outs]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 1  # three matchers, three different samples


@pytest.mark.slow
def test_batch_mixing_grammar_and_free_requests(llm):
    pattern = r"(yes|no)"
    free = SamplingParams(temperature=0, max_tokens=12)
    prompts = [{"prompt_token_ids": llm.engine.apply_chat_template(ASK_PERSON)}] * 3
    alone = llm.generate(prompts[:1], free)[0].outputs[0]
    outs = llm.generate(prompts, [constrained(StructuredOutputSpec("regex", pattern)), free,
                                  constrained(StructuredOutputSpec("json", PERSON))])
    assert re.fullmatch(pattern, outs[0].outputs[0].text)
    assert outs[1].outputs[0].token_ids == alone.token_ids  # the masks left the free row alone
    jsonschema.validate(json.loads(outs[2].outputs[0].text), PERSON)


@pytest.mark.slow
def test_logit_bias_forces_and_bans_tokens(llm):
    prompt = "The capital of France is"
    baseline = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids
    forced = llm.engine.tokenize(" banana", add_special_tokens=False)[0]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, logit_bias={forced: 100}))[0].outputs[0]
    assert out.token_ids == [forced] * 4
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4,
                                              logit_bias={str(baseline[0]): -100}))[0].outputs[0]
    assert baseline[0] not in out.token_ids and out.token_ids != baseline
    # Sampled, not greedy: a banned token is never drawn either.
    out = llm.generate(prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=8,
                                              logit_bias={baseline[0]: -100}))[0].outputs[0]
    assert baseline[0] not in out.token_ids


@pytest.mark.slow
def test_logit_bias_cannot_break_the_grammar(llm):
    forced = llm.engine.tokenize(" banana", add_special_tokens=False)[0]
    (out,) = chat_text(llm, constrained(StructuredOutputSpec("choice", ["yes", "no"]), logit_bias={forced: 100}))
    assert out.text in ("yes", "no")


@pytest.mark.slow
@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": {"properties": {"a": {"$ref": "#/nowhere"}}, "type": "object"}}, "guided_json"),
    ({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs.regex"),
    ({"guided_regex": "(a"}, "guided_regex"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs.grammar"),
    ({"guided_grammar": 'root ::= undefined_rule'}, "guided_grammar"),
])
def test_invalid_specs_raise_naming_the_field(llm, body, field):
    spec = parse_structured_output(body)
    with pytest.raises(ValueError) as info:
        llm.generate("Hi", SamplingParams(max_tokens=2, structured_output=spec))
    assert str(info.value).startswith(field + ": "), str(info.value)
    assert "/project/cpp" not in str(info.value)  # xgrammar's source location is not the client's business
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.slow
def test_logit_bias_ids_are_checked_against_the_vocab(llm):
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match=r"^logit_bias: token id \d+ is not in the vocabulary"):
        llm.generate("Hi", SamplingParams(max_tokens=2, logit_bias={vocab: 1}))
    for bad in ({5: 100.5}, {"x": 1}, {-1: 0}):
        with pytest.raises(ValueError, match="^logit_bias: "):
            SamplingParams(logit_bias=bad)


@pytest.mark.slow
def test_stop_string_ends_a_structured_output(llm):
    spec = StructuredOutputSpec("json", PERSON)
    full = chat_text(llm, constrained(spec))[0].text
    cut = chat_text(llm, constrained(spec, stop=['"age"']))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == '"age"'
    assert full.startswith(cut.text) and full[len(cut.text):].startswith('"age"')  # what came before is intact


@pytest.mark.slow
def test_grammar_ends_the_request_even_with_ignore_eos_or_min_tokens(llm):
    spec = StructuredOutputSpec("choice", ["yes", "no"])
    (out,) = chat_text(llm, constrained(spec, ignore_eos=True))  # nothing may follow a complete grammar
    assert out.text in ("yes", "no") and out.finish_reason == "stop"
    (out,) = chat_text(llm, constrained(spec, min_tokens=6))  # the grammar wins over min_tokens' EOS ban
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


def test_compiled_grammars_are_cached_by_spec(smol_tokenizer):
    from tandem.engine.structured_output import StructuredOutputManager

    manager = StructuredOutputManager(smol_tokenizer, 49152, cache_size=2)
    first = manager.grammar_for(StructuredOutputSpec("regex", "[a-z]+", field="guided_regex"))
    again = manager.grammar_for(StructuredOutputSpec("regex", "[a-z]+", field="structured_outputs.regex"))
    assert again._future is first._future  # one compile, whatever field it came from
    assert again.wait(30) and first.ready and again.accept(smol_tokenizer.encode("abc")[0])
    assert not first.is_terminated  # ... but each sequence has its own matcher
    manager.grammar_for(StructuredOutputSpec("regex", "[0-9]+"))
    manager.grammar_for(StructuredOutputSpec("regex", "[A-Z]+"))  # the oldest entry is evicted (cache_size 2)
    assert manager.grammar_for(StructuredOutputSpec("regex", "[a-z]+"))._future is not first._future
    manager.shutdown()


@pytest.mark.slow
def test_logprobs_are_those_of_the_masked_distribution(llm):
    word = "absolutely"
    (out,) = chat_text(llm, constrained(StructuredOutputSpec("choice", [word]), logprobs=20))
    assert out.text == word and out.token_ids[-1] == llm.engine.eos_token_id
    decode = llm.tokenizer.decode
    done = ""
    for token, entry in zip(out.token_ids[:-1], out.logprobs):
        # Only tokens that continue the one allowed string are listed, and they share all the probability.
        assert all(word[len(done):].startswith(decode([t])) for t in entry), entry
        assert sum(math.exp(v) for v in entry.values()) <= 1 + 1e-4
        done += decode([token])
    # Once the string is complete, EOS is the only token the grammar allows: probability 1.
    assert out.logprobs[-1] == {llm.engine.eos_token_id: pytest.approx(0.0, abs=1e-5)}


@pytest.mark.slow
async def test_streaming_through_the_async_engine_while_a_slow_grammar_compiles(llm):
    import asyncio
    import gc

    from tandem.engine.async_engine import AsyncEngine

    engine = AsyncEngine(llm.engine.config, lambda _config: llm.engine)  # the module's engine, on its own thread
    engine.start()
    await engine.wait_ready(30)
    # 2,000 alternatives: ~0.2 s to compile here, far past add_request's short wait, so this request waits in
    # WAITING_FOR_GRAMMAR while the other one runs.
    slow = StructuredOutputSpec("regex", "(" + "|".join(f"item{i}[a-z]{{2,5}}" for i in range(2000)) + ")")
    prompt = llm.engine.apply_chat_template(ASK_PERSON)

    async def collect(request_id: str, params: SamplingParams) -> list:
        return [delta async for delta in engine.generate(request_id, prompt, params)]

    try:
        slow_deltas, json_deltas = await asyncio.wait_for(asyncio.gather(
            collect("slow", constrained(slow, max_tokens=12)),
            collect("json", constrained(StructuredOutputSpec("json", PERSON))),
        ), timeout=120)
    finally:
        engine.shutdown()
        gc.unfreeze()  # the engine thread froze the heap at start-up, as a server does; this process goes on
    assert re.fullmatch(r"item[0-9]+[a-z]{2,5}", "".join(d.new_text for d in slow_deltas))
    assert sum(1 for d in json_deltas if d.new_text) > 3  # streamed piece by piece, not in one final chunk
    jsonschema.validate(json.loads("".join(d.new_text for d in json_deltas)), PERSON)
    assert json_deltas[-1].finish_reason == slow_deltas[-1].finish_reason == "stop"


# ---- speculative decoding ------------------------------------------------------------------------
COLOURS = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 6, "maxItems": 6}
ASK_COLOURS = [{"role": "user", "content": 'Repeat this list exactly: ["red", "green", "blue", "red", "green", '
                                           '"blue"]'}]


def test_grammar_cuts_drafts_it_rejects(smol_tokenizer):
    from tandem.engine.structured_output import StructuredOutputManager

    manager = StructuredOutputManager(smol_tokenizer, 49152, eos_token_id=smol_tokenizer.eos_token_id)
    grammar = manager.grammar_for(StructuredOutputSpec("json", COLOURS))
    assert grammar.wait(30)
    good = smol_tokenizer.encode('["red", "green"', add_special_tokens=False)
    bad = smol_tokenizer.encode(', "purple"', add_special_tokens=False)
    drafts = good + bad
    kept = grammar.valid_prefix(drafts)
    assert len(good) < len(kept) < len(drafts) and kept == drafts[: len(kept)]
    # Cut at the first token that leaves the grammar: the start of "purple" (the '"' before it is allowed).
    assert smol_tokenizer.decode([drafts[len(kept)]]).startswith("p")
    assert grammar.valid_prefix(good) == good  # ... and the state did not move: the same drafts fit again
    manager.shutdown()


@pytest.mark.slow
def test_speculative_decoding_with_a_grammar_matches_plain_decoding(llm, smol_dir):
    spec_llm = LLM(model=str(smol_dir), dtype="float32", max_model_len=512, num_blocks=64, num_threads=1,
                   progress=False, speculative_config={"num_speculative_tokens": 4, "prompt_lookup_min": 1})
    params = constrained(StructuredOutputSpec("json", COLOURS), max_tokens=48)
    (plain,) = chat_text(llm, params, ASK_COLOURS)
    (fast,) = chat_text(spec_llm, params, ASK_COLOURS)
    items = json.loads(fast.text)
    jsonschema.validate(items, COLOURS)
    assert fast.token_ids == plain.token_ids  # masked verify rows: the same greedy tokens as plain decoding
    stats = spec_llm.engine.stats()
    assert stats.spec_num_drafts > 0 and stats.spec_num_accepted_tokens > 0
    sampled = chat_text(spec_llm, constrained(StructuredOutputSpec("json", COLOURS), temperature=0.8, seed=5,
                                              max_tokens=48), ASK_COLOURS)[0]
    jsonschema.validate(json.loads(sampled.text), COLOURS)


# ---- compiling off the step loop -----------------------------------------------------------------
def _pending_grammar(smol_tokenizer, regex: str):
    """A grammar whose compile the test finishes (or fails) when it chooses, and the finished compile."""
    from concurrent.futures import Future

    import xgrammar as xgr

    from tandem.engine.structured_output import RequestGrammar

    info = xgr.TokenizerInfo.from_huggingface(smol_tokenizer, vocab_size=49152)
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_regex(regex)
    future: Future = Future()
    return RequestGrammar(StructuredOutputSpec("regex", regex, field="guided_regex"), future, xgr.GrammarMatcher), \
        future, compiled


def test_request_waits_for_its_grammar(smol_tokenizer):
    from helpers import create_request

    from tandem.engine.config import SchedulerConfig
    from tandem.engine.core.kv_cache_manager import KVCacheManager
    from tandem.engine.core.request import RequestStatus
    from tandem.engine.core.scheduler import Scheduler

    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64), KVCacheManager(16, 4, True))
    grammar, future, compiled = _pending_grammar(smol_tokenizer, "[0-9]+")
    waiting = create_request("g", [1, 2, 3], block_size=4)
    waiting.grammar = grammar
    free = create_request("f", [4, 5, 6], block_size=4)
    sched.add_request(waiting)
    sched.add_request(free)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["f"]  # the free request does not wait behind it
    assert waiting.status == RequestStatus.WAITING_FOR_GRAMMAR and sched.has_external_work()
    future.set_result(compiled)
    out = sched.schedule()
    assert "g" in [s.request.request_id for s in out.scheduled] and waiting.status == RequestStatus.RUNNING

    broken, future, _ = _pending_grammar(smol_tokenizer, "[0-9]+")
    failing = create_request("b", [7, 8, 9], block_size=4)
    failing.grammar = broken
    sched.add_request(failing)
    future.set_exception(RuntimeError("[10:00:00] /project/cpp/compiler.cc:1: out of memory"))
    assert all(s.request is not failing for s in sched.schedule().scheduled)
    ((request, error),) = sched.take_failed()
    assert request is failing and request.status == RequestStatus.FINISHED_ERROR
    assert error == "guided_regex: out of memory"


# ---- disaggregated prefill/decode (two engines in this process, KV pulled over NIXL) ----------------
@pytest.fixture(scope="module")
def pd_pair(smol_dir):
    from tandem.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from tandem.engine.llm_engine import LLMEngine
    from tandem.kvtransfer.connector import KVConnectorConfig, NixlConnector

    pair = {}
    for role in ("prefill", "decode"):
        # "fail": a READ that fails ends the request with an error instead of quietly recomputing the prompt.
        connector = NixlConnector(KVConnectorConfig(role=role, load_failure_policy="fail"))
        engine = LLMEngine(EngineConfig(model=str(smol_dir), dtype="float32", num_threads=1,
                                        cache=CacheConfig(num_blocks=48), scheduler=SchedulerConfig(max_model_len=512)),
                           connector=connector, progress=False)
        connector.attach(engine.runner.kv_buffer, engine.runner.layout, engine.model_name)
        connector.start_side_channel()
        pair[role] = (engine, connector)
    yield pair
    for _, connector in pair.values():
        connector.close()


def run_pd(pair, role: str, request_id: str, prompt: list[int], params: SamplingParams, kv_params: dict) -> list:
    """Add a request to one engine and step both (the prefill side serves the READ) until it finishes."""
    import time

    engine = pair[role][0]
    engine.add_request(request_id, prompt, params, kv_params)
    deltas = []
    deadline = time.monotonic() + 60
    while not (deltas and deltas[-1].finished):
        assert time.monotonic() < deadline, "request did not finish"
        for each, connector in pair.values():
            out = each.step()
            connector.housekeeping()
            if each is engine:
                deltas += out
    return deltas


@pytest.mark.slow
def test_pd_first_token_respects_the_grammar_and_decode_continues_from_it(pd_pair):
    prefill = pd_pair["prefill"][0]
    prompt = prefill.apply_chat_template(ASK_PERSON)
    spec = StructuredOutputSpec("json", PERSON)
    free = run_pd(pd_pair, "prefill", "free", prompt, SamplingParams(temperature=0, max_tokens=1),
                  {"do_remote_decode": True})
    first = run_pd(pd_pair, "prefill", "p1", prompt, SamplingParams(temperature=0, max_tokens=1, structured_output=spec),
                   {"do_remote_decode": True})
    kv_params = first[-1].kv_transfer_params
    assert prefill.tokenizer.decode([kv_params["first_token_id"]]).startswith("{")  # masked on the prefill side
    assert free[-1].new_token_ids != [kv_params["first_token_id"]]  # ... where the free answer starts otherwise
    deltas = run_pd(pd_pair, "decode", "d1", prompt, SamplingParams(temperature=0, max_tokens=40, structured_output=spec),
                    kv_params)
    assert deltas[0].new_token_ids == [kv_params["first_token_id"]]  # streamed as handed in, not sampled again
    # The decode side's matcher advanced over that token: the whole text (first token included) is valid.
    jsonschema.validate(json.loads("".join(d.new_text for d in deltas)), PERSON)
    assert deltas[-1].finish_reason == "stop"  # (not "error": the prompt's KV was pulled from the prefill side)
    assert deltas[-1].num_prompt_tokens == len(prompt)


@pytest.mark.slow
def test_pd_handed_in_token_the_grammar_forbids_is_rejected(pd_pair):
    prefill = pd_pair["prefill"][0]
    prompt = prefill.apply_chat_template(ASK_PERSON)
    spec = StructuredOutputSpec("json", PERSON)
    first = run_pd(pd_pair, "prefill", "p2", prompt, SamplingParams(temperature=0, max_tokens=1, structured_output=spec),
                   {"do_remote_decode": True})
    forbidden = prefill.tokenize("Hello", add_special_tokens=False)[0]
    kv_params = {**first[-1].kv_transfer_params, "first_token_id": forbidden}
    decode = pd_pair["decode"][0]
    with pytest.raises(ValueError, match=rf"^kv_transfer_params.first_token_id: token {forbidden} is not allowed"):
        decode.add_request("d2", prompt, SamplingParams(max_tokens=8, structured_output=spec), kv_params)
    assert not decode.has_unfinished_requests()
