"""The server backends' HTTP behaviour against a tiny fake OpenAI/vLLM server (stdlib http.server): request
format, retries with backoff and visible messages, one-line errors, the API key kept out of logs and storage,
and a run that resumes after an outage with exactly the results of an uninterrupted run.

No vLLM needed: these run everywhere.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qalign_repro.cli import compose_config
from qalign_repro.lm.openai import (
    BackendRequestError,
    BackendUnavailableError,
    HTTPPool,
    HTTPSettings,
    OpenAIGenerator,
)

EOS = 3


class FakeServer:
    """Answers /v1/models, /v1/completions and /classify like vLLM does, deterministically.

    A completion is drawn from ``default_rng(seed)`` (so equal requests get equal answers, as with a seeded vLLM
    request); a reward is a fixed function of the input ids. ``faults`` is a list of actions consumed one per
    request: "503", "400", "drop" (close the connection without an answer) or "sleep:SECONDS".
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.faults: list[str] = []
        self.fail_after: int | None = None  # completions answered before every request fails with 503
        self.requests: list[dict[str, Any]] = []
        self.completions = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            # one request per connection: once stopped, the server refuses every new request
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, code: int, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                with fake.lock:
                    fake.requests.append({"method": method, "path": self.path, "body": body,
                                          "auth": self.headers.get("Authorization")})
                    action = fake.faults.pop(0) if fake.faults else None
                    if (action is None and fake.fail_after is not None and self.path.endswith("/completions")
                            and fake.completions >= fake.fail_after):
                        action = "503"
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if action and action.startswith("sleep:"):
                    time.sleep(float(action.split(":")[1]))
                if action in ("503", "400"):
                    self._send(int(action), {"error": {"message": f"injected {action}"}})
                    return
                self._send(200, fake.answer(self.path, body))

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out and left: expected in the timeout test

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str, body: Any) -> Any:
        if path.endswith("/v1/models"):
            return {"object": "list", "data": [{"id": "fake-lm", "max_model_len": 512}]}
        if path.endswith("/completions"):
            with self.lock:
                self.completions += 1
            rng = np.random.default_rng(body["seed"])
            ids: list[int] = []
            finish = "length"
            for _ in range(body["max_tokens"]):
                if rng.random() < 0.08:
                    ids.append(EOS)
                    finish = "stop"
                    break
                ids.append(int(rng.integers(7, 100)))
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            return {"choices": [{"index": 0, "text": text, "finish_reason": finish, "token_ids": ids}],
                    "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(ids),
                              "prompt_tokens_details": {"cached_tokens": 32 * (len(body["prompt"]) // 32)}}}
        if path.endswith("/classify"):
            return {"data": [{"index": i, "probs": [float((sum(x) % 101) / 10.0 - 5.0)], "num_classes": 1}
                             for i, x in enumerate(body["input"])]}
        return {"error": "not found"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake(tiny_pair):
    from transformers import AutoTokenizer

    server = FakeServer(AutoTokenizer.from_pretrained(tiny_pair[0]))
    yield server
    server.stop()


def backend_cfg(fake: FakeServer, **kw: Any) -> dict[str, Any]:
    cfg = {"base_url": f"{fake.url}/v1", "rm_base_url": fake.url, "retries": 3, "backoff_s": 0.01,
           "backoff_max_s": 0.05, "timeout_s": 5.0, "concurrency": 4, "api_key_env": None}
    cfg.update(kw)
    return cfg


def make_generator(tiny_pair, fake: FakeServer, **kw: Any) -> OpenAIGenerator:
    return OpenAIGenerator({"path": str(tiny_pair[0]), "max_context": 512}, backend_cfg(fake, **kw))


def test_completion_requests_carry_token_ids_seed_and_plain_sampling(tiny_pair, fake):
    gen = make_generator(tiny_pair, fake)
    assert gen.model == "fake-lm" and gen.max_context == 512
    prompts = [gen.encode_chat([{"role": "user", "content": f"{i}+{i}?"}]) for i in range(3)]
    comps = gen.sample(prompts, [20, 10, 5], [11, 22, 33])
    bodies = [r["body"] for r in fake.requests if r["path"].endswith("/completions")]
    assert sorted(b["seed"] for b in bodies) == [11, 22, 33]
    for b in bodies:
        assert b["prompt"] in prompts and all(isinstance(t, int) for t in b["prompt"])
        assert (b["temperature"], b["top_p"], b["top_k"], b["min_p"], b["repetition_penalty"]) == (1.0, 1.0, -1, 0.0, 1.0)
        assert b["return_token_ids"] is True and b["n"] == 1
    for c, m, p in zip(comps, [20, 10, 5], prompts):
        assert len(c.token_ids) <= m and c.prompt_tokens == len(p)
        assert (c.finish_reason == "stop") == (c.token_ids[-1] == EOS)
        assert c.text == gen.decode(c.token_ids)
        assert c.cached_tokens == 32 * (len(p) // 32)
    # same seeds -> same answers, whatever the batch
    again = gen.sample(prompts[1:2], [10], [22])
    assert again[0].token_ids == comps[1].token_ids
    gen.close()


def test_transient_failures_are_retried_with_one_message_per_round(tiny_pair, fake, capsys):
    gen = make_generator(tiny_pair, fake)
    prompts = [[5, 20, 30, 6]] * 4
    reference = gen.sample(prompts, [16] * 4, [1, 2, 3, 4])
    capsys.readouterr()
    fake.faults = ["503", "drop", "503", "503", "503", "drop"]
    got = gen.sample(prompts, [16] * 4, [1, 2, 3, 4])
    assert [c.token_ids for c in got] == [c.token_ids for c in reference]
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all("openai backend: POST" in line and "/v1/completions" in line for line in err)
    assert "retry 1/3" in err[0]
    assert len(err) <= 3  # one line per retry round, not per request
    gen.close()


def test_a_slow_answer_times_out_and_is_retried(tiny_pair, fake, capsys):
    gen = make_generator(tiny_pair, fake, timeout_s=0.3)
    fake.faults = ["sleep:1.0"]
    got = gen.sample([[5, 20, 6]], [8], [7])
    assert got[0].token_ids
    assert "ReadTimeout" in capsys.readouterr().err
    gen.close()


def test_last_retry_gives_one_clear_line(tiny_pair, fake, monkeypatch):
    monkeypatch.setenv("QALIGN_TEST_KEY", "sekret-123")
    gen = make_generator(tiny_pair, fake, api_key_env="QALIGN_TEST_KEY")
    fake.stop()  # connection refused from now on
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        gen.sample([[5, 6]] * 3, [4] * 3, [1, 2, 3])
    msg = str(info.value)
    assert time.monotonic() - t0 < 10
    assert "\n" not in msg and "failed after 4 attempts" in msg and f"{fake.url}/v1/completions" in msg
    assert "ConnectError" in msg and "rerun the same command to resume" in msg
    assert "sekret" not in msg
    gen.close()


def test_client_errors_are_not_retried(tiny_pair, fake):
    gen = make_generator(tiny_pair, fake)
    before = len(fake.requests)
    fake.faults = ["400"]
    with pytest.raises(BackendRequestError, match="HTTP 400 .*injected 400"):
        gen.sample([[5, 6]], [4], [1])
    assert len(fake.requests) == before + 1
    gen.close()


def test_bad_settings_fail_with_one_line():
    from qalign_repro.errors import ConfigError

    with pytest.raises(ConfigError, match="base_url is not set"):
        HTTPSettings.from_cfg({})
    with pytest.raises(ConfigError, match="retries >= 0"):
        HTTPSettings.from_cfg({"base_url": "http://x", "retries": -1})


def test_http_pool_keeps_answers_in_order_under_concurrency(fake):
    pool = HTTPPool(HTTPSettings(base_url=fake.url, concurrency=8, backoff_s=0.01), "t")
    bodies = [{"model": "m", "input": [[i, i]]} for i in range(40)]
    fake.faults = ["503"] * 5
    answers = pool.request_many("classify", bodies)
    assert [a["data"][0]["probs"][0] for a in answers] == [((2 * i) % 101) / 10.0 - 5.0 for i in range(40)]
    pool.close()


def _run(run_overrides, out: Path, fake: FakeServer, *extra: str):
    from qalign_repro.stages.run import execute

    cfg = compose_config(["backend=openai", *run_overrides(out, f"backend.base_url={fake.url}/v1",
                                                           f"backend.rm_base_url={fake.url}", "backend.retries=2",
                                                           "backend.backoff_s=0.01", "backend.backoff_max_s=0.02",
                                                           "backend.api_key_env=QALIGN_TEST_KEY", "dataset.n=6",
                                                           "max_new_tokens=24", "beta=0.5", *extra)])
    return execute(cfg)


def _chains(store) -> list[list[tuple]]:
    return [[(tuple(o["completion_ids"]), o["reward"], o["accepted"]) for o in inst["outputs"]]
            for inst in store.iter_instances()]


def test_run_resumes_after_an_outage_with_nothing_lost(run_overrides, fake, tmp_path, monkeypatch, capsys):
    """An outage longer than the retries stops the run with one line; the steps stored before it are kept and a
    rerun of the same command continues to exactly the chains of an uninterrupted run. The API key reaches the
    server but neither the output nor the stored run."""
    monkeypatch.setenv("QALIGN_TEST_KEY", "sekret-123")
    reference = _chains(_run(run_overrides, tmp_path / "ref", fake, "steps=6"))

    fake.completions = 0
    fake.fail_after = 6 * 3  # 18 completions go through, then the server answers 503 to every completion
    with pytest.raises(BackendUnavailableError, match="failed after 3 attempts"):
        _run(run_overrides, tmp_path / "out", fake, "steps=6")
    from qalign_repro.store.storage import RunStore, list_runs

    (name,) = list_runs(tmp_path / "out")
    stored = RunStore(tmp_path / "out", name, readonly=True)
    # chains advance on their own (schedule=auto is async here), so each chain kept its own prefix of the
    # uninterrupted run; together they hold some, and at most all 18, of the completions that went through
    partial = _chains(stored)
    assert all(got == chain[:len(got)] for got, chain in zip(partial, reference, strict=True))
    assert 0 < sum(map(len, partial)) <= 18

    fake.fail_after = None
    resumed = _chains(_run(run_overrides, tmp_path / "out", fake, "steps=6"))
    assert resumed == reference

    assert all(r["auth"] == "Bearer sekret-123" for r in fake.requests)
    captured = capsys.readouterr()
    assert "retry 1/2" in captured.err and "sekret" not in captured.out + captured.err
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            assert b"sekret" not in f.read_bytes(), f
    bodies = [r["body"] for r in fake.requests if r["path"] == "/classify"]
    assert bodies and all(b["use_activation"] is False for b in bodies)


def test_backend_vllm_without_vllm_installed_says_how_to_install(run_overrides, tmp_path, monkeypatch):
    """The registry imports every backend module, so they must import without vLLM; building one says what to do."""
    import sys

    from qalign_repro.errors import ConfigError
    from qalign_repro.stages.run import build_backends

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    cfg = compose_config(["backend=vllm", *run_overrides(tmp_path)])
    with pytest.raises(ConfigError, match="needs vLLM.*make install-vllm"):
        build_backends(cfg)
