"""Start `knots-serve serve` as a user would (a real process on a free port) and wait until it answers."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CLI = str(Path(sys.executable).parent / "knots-serve")


@dataclass
class Server:
    url: str
    log: Path
    config: dict
    root: Path
    pid: int = 0
    api_key: str = "none"  # what clients send as the OpenAI API key (vLLM checks it when VLLM_API_KEY is set)

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0, timeout=120, **kw)

    def async_client(self, **kw):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0, timeout=120, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_server(root: Path, config: dict, env: dict, timeout: float = 300):
    config = dict(config, port=free_port(), host="127.0.0.1")
    (root / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    log = root / "server.log"
    proc = subprocess.Popen(
        [CLI, "serve", "--config", str(root / "config.yaml")],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=os.environ | env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{config['port']}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"server not up in {timeout} s:\n{log.read_text()[-4000:]}") from None
                time.sleep(1)
        yield Server(url, log, config, root, proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
