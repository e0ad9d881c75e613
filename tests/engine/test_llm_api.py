"""The offline API on the real model: bf16 path, chat, sampling parameters, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_engine_idle
from tandem import LLM, SamplingParams
from tandem.engine.attention import PrefillSeq, attend_fresh_batch, fresh_prefill_batch
from tandem.engine.models.common import PackedLinear, can_pack_linears


@pytest.fixture(scope="module")
def bf16_llm(smol_dir):
    return LLM(model=str(smol_dir), dtype="bfloat16", max_model_len=1024, num_blocks=256, progress=False)


def test_packed_linear_equals_aten_linear():
    if not can_pack_linears(torch.bfloat16, torch.device("cpu")):
        pytest.skip("oneDNN bf16 linear is not available on this CPU")
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=True).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(PackedLinear(linear)(x), linear(x))


@pytest.mark.slow
def test_padded_fresh_prefill_batch_equals_attention_per_chunk():
    # The GPU attends prefill chunks without a cached prefix as one padded batch: same result as one call per chunk.
    chunks = [PrefillSeq(0, 5, 5, None), PrefillSeq(5, 3, 3, None), PrefillSeq(8, 9, 9, None)]
    batch = fresh_prefill_batch(chunks)
    assert fresh_prefill_batch(chunks[:1]) is None
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(17, heads, 8, generator=gen) for heads in (4, 2, 2))
    got = torch.zeros(17, 4, 8)
    attend_fresh_batch(q, k, v, batch, got)
    for c in chunks:
        rows = slice(c.q_start, c.q_start + c.q_len)
        qs, ks, vs = (t[rows].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        expected = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(got[rows], expected[0].transpose(0, 1))


def test_bf16_chat_answers_sensibly(bf16_llm):
    out = bf16_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=24))
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"
    assert_engine_idle(bf16_llm.engine)


@pytest.mark.slow
def test_sampling_features(bf16_llm):
    prompt = "List some animals: cat, dog,"
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=12)
    a = bf16_llm.generate(prompt, seeded)[0].outputs[0]
    b = bf16_llm.generate(prompt, seeded)[0].outputs[0]
    assert a.token_ids == b.token_ids  # per-request seed: reproducible

    n3 = bf16_llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=10))[0]
    assert len(n3.outputs) == 3 and len({tuple(o.token_ids) for o in n3.outputs}) > 1

    lp = bf16_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2))[0]
    assert len(lp.outputs[0].logprobs) == 4
    assert all(len(entry) >= 3 and t in entry for entry, t in zip(lp.outputs[0].logprobs, lp.outputs[0].token_ids))
    assert lp.prompt_logprobs[0] is None and len(lp.prompt_logprobs) == len(lp.prompt_token_ids)

    greedy = bf16_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    stop = greedy.text[4:7]
    cut = bf16_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, stop=[stop]))[0].outputs[0]
    assert cut.text == greedy.text[: greedy.text.index(stop)] and cut.finish_reason == "stop"
    assert cut.stop_reason == stop

    forced = bf16_llm.generate("Hi", SamplingParams(temperature=0, max_tokens=8, min_tokens=8))[0].outputs[0]
    assert len(forced.token_ids) == 8 and forced.finish_reason == "length"
    assert_engine_idle(bf16_llm.engine)


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"min_p": 2}, "min_p"), ({"n": 0}, "n"), ({"logprobs": 99}, "logprobs"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(("device", "message"), [
    ("tpu", "must be 'cpu', 'cuda' or 'cuda:N'"),
    pytest.param("cuda", "sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")),
])
def test_unusable_device_is_refused_naming_it(device, message):
    with pytest.raises(ValueError, match=f"^device: .*{message}"):
        LLM(model="preset:tiny-llama", device=device, progress=False)


def test_prompt_longer_than_max_model_len_names_the_prompt():
    llm = LLM(model="preset:tiny-llama", dtype="float32", max_model_len=64, num_blocks=16, progress=False)
    with pytest.raises(ValueError, match="^prompt:"):
        llm.generate({"prompt_token_ids": list(range(64))}, SamplingParams(max_tokens=4))
    assert_engine_idle(llm.engine)


def test_model_errors_are_one_clear_line(tmp_path):
    from tandem.engine.llm_engine import ModelLoadError

    with pytest.raises(ModelLoadError, match="not found"):
        LLM(model=str(tmp_path / "missing"), progress=False)
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        LLM(model=str(bad), progress=False)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,'
        ' "num_hidden_layers": 1, "num_attention_heads": 2}')
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="corrupt"):
        LLM(model=str(corrupt), progress=False)
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF garbage")
    with pytest.raises(ModelLoadError, match="GGUF"):
        LLM(model=str(gguf), progress=False)


@pytest.mark.slow
def test_generate_cli_prints_an_answer_and_errors_cleanly():
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "tandem.cli", "generate", "What is the capital of France?",
                         "--max-tokens", "16"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "Paris" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "tandem.cli", "generate", "hi", "--model", "/no/such/model"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error: model") and "Traceback" not in bad.stderr
