"""The router's tokenization matches transformers' exactly, and the router never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tandem.router.tokenizer import PromptTokenizer, TemplateError

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be kind. " * 30}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello, how can I help?"}, {"role": "user", "content": "Tell me a joke, ünïcødé 🎉"}],
]
PROMPTS = ["Hello", "The capital of France is", "  leading spaces and\nnew lines\t", "<|im_start|>user\nhi<|im_end|>"]


def test_matches_transformers(tokenizer_path):
    # transformers imports torch: keep it out of the test process, in a child of its own.
    script = textwrap.dedent(f"""
        import json, sys
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(tokenizer_path)!r})
        chats, prompts = json.loads(sys.stdin.read())
        out = {{
            "chat": [list(tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=False)) for c in chats],
            "chat_no_gen": [list(tok.apply_chat_template(c, tokenize=True, add_generation_prompt=False, return_dict=False)) for c in chats],
            "prompt": [tok(p).input_ids for p in prompts],
        }}
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps([CHATS, PROMPTS]), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = json.loads(proc.stdout.strip().splitlines()[-1])
    tokenizer = PromptTokenizer(tokenizer_path)
    assert [tokenizer.encode_chat(c) for c in CHATS] == expected["chat"]
    assert [tokenizer.encode_chat(c, add_generation_prompt=False) for c in CHATS] == expected["chat_no_gen"]
    assert [tokenizer.encode_prompt(p) for p in PROMPTS] == expected["prompt"]


def test_content_parts_and_developer_role_go_through_the_shared_normaliser(tokenizer_path):
    tokenizer = PromptTokenizer(tokenizer_path)
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    assert tokenizer.encode_chat_request(parts) == tokenizer.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\nthere"}])


def test_template_raise_exception_is_a_template_error(tmp_path, tokenizer_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tokenizer_path / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "{{ bos_token + m['content'] + eos_token }}{% if loop.last %}.{% endif %}{% endfor %}")
    tokenizer = PromptTokenizer(tmp_path)
    assert tokenizer.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == \
        "<|im_start|>a<|im_end|><|im_start|>b<|im_end|>."
    with pytest.raises(TemplateError, match="no tools"):
        tokenizer.render_chat([{"role": "tool", "content": "x"}])


def test_router_never_imports_torch():
    script = textwrap.dedent("""
        import sys
        from tandem.router.app import build_app
        from tandem.router.cli import config_from_args, add_arguments
        import argparse
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        config = config_from_args(parser.parse_args(["--worker", "http://127.0.0.1:9", "--redis-url", "redis://127.0.0.1:9"]))
        app = build_app(config)
        assert app.state.service.tokenizer is not None
        bad = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        print("LOADED", bad)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout


def test_router_imports_nothing_from_the_engine(tokenizer_path):
    """The router's modules and a built router app need only tandem.protocol: no tandem.engine, no torch."""
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import tandem.router
        for mod in pkgutil.iter_modules(tandem.router.__path__):
            importlib.import_module("tandem.router." + mod.name)
        from tandem.router.app import build_app
        from tandem.router.config import RouterConfig
        from tandem.router.tokenizer import PromptTokenizer
        build_app(RouterConfig("smol", worker_urls=("http://127.0.0.1:9",)), PromptTokenizer(sys.argv[1]))
        # The router finding the model's tokenizer by itself, as `tandem router --model` does.
        app = build_app(RouterConfig("smol", model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                     worker_urls=("http://127.0.0.1:9",)))
        assert app.state.service.tokenizer is not None
        bad = sorted(m for m in sys.modules if m == "torch" or m == "tandem.engine" or m.startswith("tandem.engine."))
        print("LOADED", bad)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tokenizer_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout
