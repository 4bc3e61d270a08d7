"""A fake OpenAI-compatible server for the server-fault tests (stdlib ``http.server`` on 127.0.0.1).

Why not vLLM: starting a real server takes minutes on 2 CPU cores; the fault tests need servers that start in
about a second and can be killed and restarted many times. What the client code sees is the same protocol:

* ``--kind lm``: ``GET /v1/models``; ``POST /v1/completions`` with a token-id prompt, ``max_tokens`` and
  ``seed``, answering ``choices[0].token_ids`` / ``text`` / ``finish_reason`` and ``usage.prompt_tokens``
  (vLLM's ``return_token_ids`` form). The "model" is a seeded Markov chain over three tokens of the tiny-lm
  vocabulary (EOS, "a", "b"), conditioned on the last prompt token: a pure function of (prompt, budget, seed),
  like a real server with per-request seeds.
* ``--kind rm``: ``GET /v1/models``; ``POST /classify`` with token-id inputs, answering one raw score per
  input (a hash of the ids), the form of vLLM's pooling server.

Faults: ``--die-after N`` SIGKILLs the server when its N-th POST arrives (the request gets no answer: a crash
mid-run). When the environment variable named by ``--api-key-env`` is set, every request must carry
``Authorization: Bearer <key>`` (else 401). ``--log`` records each request line and headers, so the tests can
check what the client sent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

EOS, A, B = 3, 73, 74  # tiny-lm ids of "</s>", "a", "b" (checked by the tests against the tokenizer)
#: next-token probabilities over (EOS, a, b) given the previous token's class (start, a, b)
TABLE = np.array([[0.10, 0.45, 0.45], [0.30, 0.30, 0.40], [0.35, 0.40, 0.25]])


def sample(prompt: list[int], max_tokens: int, seed: int) -> tuple[list[int], str]:
    rng = np.random.default_rng(seed)
    prev = {A: 1, B: 2}.get(prompt[-1] if prompt else -1, 0)
    out: list[int] = []
    while len(out) < max_tokens:
        k = int(rng.choice(3, p=TABLE[prev]))
        out.append((EOS, A, B)[k])
        if k == 0:
            return out, "stop"
        prev = k
    return out, "length"


def score(ids: list[int]) -> float:
    digest = hashlib.sha256(json.dumps(ids).encode()).digest()
    return 4.0 * int.from_bytes(digest[:8], "little") / 2**64 - 2.0


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, fmt: str, *args: object) -> None:  # quiet; --log records requests instead
        pass

    def _send(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        self.server.record(f"{self.command} {self.path} auth={self.headers.get('Authorization')!r}")
        key = os.environ.get(self.server.api_key_env or "", "")
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._send(401, {"error": {"message": "invalid API key"}})
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self._authorised():
            return
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            name = "fake-lm" if self.server.kind == "lm" else "fake-rm"
            self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "max_model_len": 512}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802
        self.server.count_post()
        if not self._authorised():
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.server.kind == "lm" and self.path.rstrip("/").endswith("/completions"):
            ids, finish = sample(list(body["prompt"]), int(body["max_tokens"]), int(body["seed"]))
            text = "".join({A: "a", B: "b"}.get(t, "") for t in ids)
            self._send(200, {"id": "cmpl-fake", "object": "text_completion", "model": body.get("model"),
                             "choices": [{"index": 0, "text": text, "token_ids": ids, "finish_reason": finish,
                                          "logprobs": None}],
                             "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(ids)}})
        elif self.server.kind == "rm" and self.path.rstrip("/").endswith("/classify"):
            data = [{"index": i, "probs": [score(ids)], "num_classes": 1} for i, ids in enumerate(body["input"])]
            self._send(200, {"id": "classify-fake", "object": "list", "data": data})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, kind: str, die_after: int | None, api_key_env: str | None, log: Path | None):
        super().__init__(("127.0.0.1", port), Handler)
        self.kind, self.die_after, self.api_key_env, self.log = kind, die_after, api_key_env, log
        self._lock = threading.Lock()
        self.posts = 0

    def count_post(self) -> None:
        with self._lock:
            self.posts += 1
            if self.die_after is not None and self.posts >= self.die_after:
                os.kill(os.getpid(), signal.SIGKILL)

    def record(self, line: str) -> None:
        if self.log:
            with self._lock, self.log.open("a") as fh:
                fh.write(line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=("lm", "rm"), required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", type=Path)
    ap.add_argument("--die-after", type=int)
    ap.add_argument("--api-key-env")
    ap.add_argument("--log", type=Path)
    args = ap.parse_args()
    server = FakeServer(args.port, args.kind, args.die_after, args.api_key_env, args.log)
    if args.port_file:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(server.server_address[1]))
        tmp.replace(args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
