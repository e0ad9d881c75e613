"""Router test fixtures: a real redis-server on a free port in a temp dir, and the router's tokenizer files."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import openai
import pytest

from .peers import free_port


class RedisServer:
    """A real redis-server child process that tests can stop and start again on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (run `make redis`)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    """The bundled model's tokenizer directory, as the router finds it (torch-free in this process)."""
    from tandem.engine.model_files import tokenizer_dir

    return tokenizer_dir(None)


@pytest.fixture
async def make_client():
    """Builds official clients (no retries of their own: the router's are under test) and closes them after."""
    clients: list[openai.AsyncOpenAI] = []

    def build(url: str, api_key: str = "none") -> openai.AsyncOpenAI:
        clients.append(openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0))
        return clients[-1]

    yield build
    for c in clients:
        await c.close()
