"""vLLM generation in another process: ``rebel vllm-serve`` and its client.

    rebel vllm-serve --host 0.0.0.0 --port 8000 --gpu-memory-utilization 0.9   # on the generation GPUs
    rebel train text ... --generation-backend vllm --vllm-mode server --vllm-server-url http://HOST:8000

The server holds one :class:`~rebel.text.vllm.LocalEngine`. The trainer's
:class:`ServerEngine` tells it the model's config and dtype (``POST /init``: the engine is
built for the policy, no model folder on the server), sends the policy's weights before
each collection (``POST /weights``, safetensors in chunks, applied at once with the last
one) and asks for completions of token-id prompts with the sampler's settings and seeds
(``POST /generate``). The sampling is the colocated engine's, the same code.

Weights travel over HTTP, which suits small models and tests on one machine; large
models want a collective transfer (NCCL, as TRL's server) instead, which this protocol
leaves room for (another ``load_weights``) but which is not built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from torch import Tensor

from rebel.text.generation import SamplingSettings, check_vllm_kwargs

CHUNK_BYTES = 256 * 2**20  # weights per request


class ServerEngine:
    """The trainer's side: the :class:`~rebel.text.vllm.LocalEngine` interface over HTTP.

    Args:
        url: the server's address (``http://host:port``).
        config: the model's ``config.json`` as a dict.
        dtype: the policy's parameter dtype name.
        max_model_length: longest prompt + completion (default: the model's).
        timeout: seconds to wait for the server to answer its first request.
    """

    def __init__(self, url: str, config: dict[str, Any], dtype: str, max_model_length: int | None = None, timeout: float = 240.0) -> None:
        self.url = url.rstrip("/")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._call("health", None)
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        reply = self._call("init", {"config": config, "dtype": dtype, "max_model_length": max_model_length})
        self.max_model_length = int(reply["max_model_length"])

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        from safetensors.torch import save

        chunk: dict[str, Tensor] = {}
        size = 0
        for name, tensor in weights:
            chunk[name] = tensor.detach().cpu().contiguous().clone()  # clone: tied weights share storage
            size += tensor.numel() * tensor.element_size()
            if size >= CHUNK_BYTES:
                self._call("weights", save(chunk), final=False)
                chunk, size = {}, 0
        self._call("weights", save(chunk), final=True)

    def sample(self, prompts: list[list[int]], settings: SamplingSettings, seeds: list[int]) -> list[list[int]]:
        reply = self._call("generate", {"prompts": prompts, "settings": dataclasses.asdict(settings), "seeds": seeds})
        return reply["completions"]

    def close(self) -> None:
        """Nothing to free here: the server keeps its engine for the next trainer."""

    def _call(self, route: str, body: Any, final: bool = True) -> Any:
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        url = f"{self.url}/{route}" + ("" if final else "?final=0")
        request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(request) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = json.loads(error.read() or b"{}").get("error", error.reason)
            raise RuntimeError(f"vLLM server {self.url}: {detail}") from None
        except urllib.error.URLError as error:
            raise ConnectionError(f"no vLLM server at {self.url} ({error.reason}); start one with rebel vllm-serve") from None


class EngineServer:
    """The server's side: one engine, built (again) when a trainer's model differs."""

    def __init__(self, gpu_memory_utilization: float = 0.9, vllm_kwargs: dict[str, Any] | None = None) -> None:
        check_vllm_kwargs(vllm_kwargs or {})
        self.gpu_memory_utilization, self.vllm_kwargs = gpu_memory_utilization, dict(vllm_kwargs or {})
        self.engine: Any = None
        self.key: str | None = None
        self.pending: list[tuple[str, Tensor]] = []
        self.lock = threading.Lock()

    def handle(self, route: str, body: bytes, final: bool) -> dict[str, Any]:
        with self.lock:
            if route == "health":
                return {"ok": True, "engine": self.engine is not None}
            if route == "init":
                return self._init(json.loads(body))
            if self.engine is None:
                raise ValueError("no engine yet: POST /init first")
            if route == "weights":
                from safetensors.torch import load

                self.pending += list(load(body).items())
                if final:
                    self.engine.load_weights(self.pending)
                    self.pending = []
                return {"ok": True}
            if route == "generate":
                request = json.loads(body)
                settings = request["settings"]
                settings = SamplingSettings(**{**settings, "eos_token_ids": tuple(settings["eos_token_ids"])})
                return {"completions": self.engine.sample(request["prompts"], settings, request["seeds"])}
            raise ValueError(f"unknown route /{route}; expected /health, /init, /weights or /generate")

    def _init(self, request: dict[str, Any]) -> dict[str, Any]:
        from rebel.text.vllm import LocalEngine

        key = json.dumps(request, sort_keys=True)
        if key != self.key:
            if self.engine is not None:
                self.engine.close()
                self.engine = None
            self.engine = LocalEngine(
                request["config"], request["dtype"], request["max_model_length"], self.gpu_memory_utilization, self.vllm_kwargs
            )
            self.key = key
        return {"max_model_length": self.engine.max_model_length}


def serve(host: str = "127.0.0.1", port: int = 8000, **engine_settings: Any) -> None:
    """Serve an :class:`EngineServer` until interrupted; prints its address once listening."""
    server = EngineServer(**engine_settings)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def _answer(self) -> None:
            route, _, query = self.path.lstrip("/").partition("?")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                status, reply = 200, server.handle(route, body, final=query != "final=0")
            except ValueError as error:
                status, reply = 400, {"error": str(error)}
            except Exception as error:  # noqa: BLE001 - the client gets the engine's error as one line
                status, reply = 500, {"error": f"{type(error).__name__}: {error}"}
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the engine's own log

    http = ThreadingHTTPServer((host, port), Handler)
    print(f"rebel vllm-serve: listening on http://{host}:{http.server_address[1]}", flush=True)
    try:
        http.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        http.server_close()
        if server.engine is not None:
            server.engine.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``rebel vllm-serve``: a vLLM engine that trainers send weights and prompts to."""
    parser = argparse.ArgumentParser(prog="rebel vllm-serve", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9, help="share of the device's memory the engine takes (default: 0.9)"
    )
    parser.add_argument("--vllm-kwargs", default="{}", help="more vllm.LLM arguments as JSON, e.g. '{\"tensor_parallel_size\": 2}'")
    args = parser.parse_args(argv)
    try:
        kwargs = json.loads(args.vllm_kwargs)
        check_vllm_kwargs(kwargs)
    except ValueError as error:
        print(f"rebel vllm-serve: error: {error}", file=sys.stderr)
        return 2
    serve(args.host, args.port, gpu_memory_utilization=args.gpu_memory_utilization, vllm_kwargs=kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
