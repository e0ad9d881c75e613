from __future__ import annotations

import pytest

from procs import start_serve

API_KEY = "test-secret-key"
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="package")
def server():
    """A real `tandem serve` (float32 so greedy output is comparable with tandem.LLM), with an API key."""
    proc = start_serve("--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--api-key", API_KEY,
                       "--kv-cache-memory", "256MiB", "--served-model-name", "smol", "--threads", "2")
    yield proc
    assert proc.terminate() == 0, proc.output()[-2000:]


@pytest.fixture(scope="package")
def reference_llm(smol_dir):
    from tandem import LLM

    return LLM(model=str(smol_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, num_blocks=200, progress=False)


@pytest.fixture
def client(server):
    import openai

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
async def aclient(server):
    import openai

    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c
