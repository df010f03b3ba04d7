"""meshlm serve: answers equal Engine.generate, concurrent requests are batched, bad requests get clear 4xx
answers and the server keeps serving; the broadcast loop that drives the other ranks, on 2 gloo ranks."""

import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

from meshlm.infer.server import MAX_BODY, ApiError, CompletionServer, execute, follow, parse_completion

from test_train import run_config

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


def call(url: str, body=None, *, raw: bytes | None = None, method: str | None = None, timeout: float = 60):
    """(status, decoded JSON answer) of one HTTP request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with OPENER.open(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextmanager
def running(engine, **kw):
    """A CompletionServer on a free port, its loop in a thread; stopped (and the thread joined) on exit."""
    server = CompletionServer(engine, port=0, **kw)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=20)
        assert not thread.is_alive(), "the server loop did not end after stop()"


class Recording:
    """An engine that records (and can fail) every generate call, delegating to a real one."""

    def __init__(self, engine, fail_on: int | None = None):
        self.engine, self.fail_on, self.calls = engine, fail_on, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, **kw):
        self.calls.append((prompts, kw))
        if kw["max_new_tokens"] == self.fail_on:
            raise RuntimeError("injected failure")
        return self.engine.generate(prompts, **kw)


@pytest.fixture(scope="module")
def engine(tiny_dataset, tmp_path_factory):
    from meshlm.infer.engine import Engine
    from meshlm.train.trainer import train

    out = tmp_path_factory.mktemp("serve-run")
    train(run_config(tiny_dataset, out, **{"train.steps": 3, "train.eval_every": 0}))
    engine = Engine.from_checkpoint(out)
    # A few steps teach a tiny model one token ("    "); noise makes its greedy answers differ by prompt, so
    # comparing them with generate means something (and near-ties, where batching could flip one, are rare).
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return engine


def expected_text(engine, prompt: str, **kw) -> list[tuple[str, str]]:
    """(text, finish_reason) of each row of engine.generate called directly."""
    stop = {engine.eot_id} if engine.eot_id is not None else set()
    ids = engine.tokenizer.encode(prompt).ids
    n = kw.pop("n", 1)
    out = []
    for new in engine.generate([ids] * n, stop=stop, **kw):
        if new and new[-1] in stop:
            out.append((engine.tokenizer.decode(new[:-1]), "stop"))
        else:
            out.append((engine.tokenizer.decode(new), "length"))
    return out


PROMPTS = ["def ", "import os\n", "class Foo:\n    ", "for i in range(", "return self.", "# the"]


def test_concurrent_requests_are_batched_and_equal_generate(engine):
    rec = Recording(engine)
    with running(rec, batch_wait_ms=300, max_batch=8) as server:
        url = server.url + "/v1/completions"
        answers: dict[int, tuple] = {}
        start = threading.Barrier(len(PROMPTS))

        def client(i):
            start.wait()
            answers[i] = call(url, {"prompt": PROMPTS[i], "max_tokens": 12, "temperature": 0})

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(answers) == len(PROMPTS)
        for i, prompt in enumerate(PROMPTS):
            status, body = answers[i]
            assert status == 200, body
            assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
            (choice,) = body["choices"]
            assert (choice["text"], choice["finish_reason"]) == expected_text(engine, prompt, max_new_tokens=12)[0]
            assert choice["index"] == 0 and choice["logprobs"] is None
            usage = body["usage"]
            assert usage["prompt_tokens"] == len(engine.tokenizer.encode(prompt).ids)
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 1 <= len(rec.calls) < len(PROMPTS), [len(p) for p, _ in rec.calls]  # batched
        assert sum(len(p) for p, _ in rec.calls) == len(PROMPTS)

        # GET endpoints
        status, models = call(server.url + "/v1/models")
        assert status == 200 and models["data"][0]["id"] == "meshlm"
        status, health = call(server.url + "/health")
        assert status == 200 and health["status"] == "ok"


def test_sampling_n_seed_stop_and_lists(engine):
    with running(engine, batch_wait_ms=50) as server:
        url = server.url + "/v1/completions"
        # n samples with a seed: sample i is drawn with seed + i, as engine.generate's row i
        status, body = call(url, {"prompt": "def ", "max_tokens": 10, "temperature": 0.9, "top_k": 40, "n": 3,
                                  "seed": 7})
        assert status == 200, body
        want = expected_text(engine, "def ", n=3, max_new_tokens=10, temperature=0.9, top_k=40, top_p=1.0, seed=7)
        assert [(c["text"], c["finish_reason"]) for c in body["choices"]] == want
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert len({c["text"] for c in body["choices"]}) > 1
        # the same seeded request again: the same answer
        assert call(url, {"prompt": "def ", "max_tokens": 10, "temperature": 0.9, "top_k": 40, "n": 3,
                          "seed": 7})[1]["choices"] == body["choices"]
        # several prompts with a seed: choice j (prompt-major) is drawn with seed + j
        status, body = call(url, {"prompt": ["def ", "import "], "max_tokens": 6, "temperature": 0.8, "n": 2,
                                  "seed": 11})
        ids = [engine.tokenizer.encode(p).ids for p in ("def ", "def ", "import ", "import ")]
        rows = engine.generate(ids, max_new_tokens=6, temperature=0.8, seed=11, stop={engine.eot_id})
        assert [c["text"] for c in body["choices"]] == [engine.tokenizer.decode(r) for r in rows]
        # unseeded sampling works (distinct rows)
        status, body = call(url, {"prompt": "x", "max_tokens": 4, "n": 2, "top_p": 0.9})
        assert status == 200 and len(body["choices"]) == 2

        # several prompts: choices prompt-major; a stop string cuts the text
        (full, _), = expected_text(engine, "import ", max_new_tokens=16)
        assert len(full) > 4
        cut = full[2:4]
        status, body = call(url, {"prompt": ["import ", "def "], "max_tokens": 16, "temperature": 0, "n": 2,
                                  "stop": [cut, "\x00never"]})
        assert status == 200, body
        texts = [c["text"] for c in body["choices"]]
        assert texts[0] == texts[1] == full[:full.find(cut)]
        assert body["choices"][0]["finish_reason"] == "stop"
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        # token-id prompts
        ids = engine.tokenizer.encode("import ").ids
        status, body = call(url, {"prompt": ids, "max_tokens": 16, "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == full


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(engine):
    rec = Recording(engine, fail_on=13)
    with running(rec, max_tokens_limit=64, batch_wait_ms=0) as server:
        url = server.url + "/v1/completions"

        def error(status, body, code, *words):
            assert status == code, body
            assert body["error"]["type"] in ("invalid_request_error", "server_error")
            for w in words:
                assert w in body["error"]["message"], body

        error(*call(url, raw=b"{not json"), 400, "not valid JSON")
        error(*call(url, raw=b"[1, 2]"), 400, "JSON object")
        error(*call(url, {"prompt": ""}), 400, "empty")
        error(*call(url, {"max_tokens": 4}), 400, "prompt is required")
        error(*call(url, {"prompt": []}), 400, "prompt")
        error(*call(url, {"prompt": ["ok", 3.5]}), 400, "prompt 1")
        error(*call(url, {"prompt": [1, 2, 10**9]}), 400, "token ids")
        status, body = call(url, {"prompt": "def ", "max_tokens": 100000})
        error(status, body, 400, "max_tokens (100000)", "64")
        assert body["error"]["param"] == "max_tokens"
        error(*call(url, {"prompt": "def ", "max_tokens": 0}), 400, "max_tokens (0)")
        error(*call(url, {"prompt": "def ", "max_tokens": "5"}), 400, "max_tokens must be an integer")
        error(*call(url, {"prompt": "def ", "n": 100}), 400, "n (100)", "8")
        error(*call(url, {"prompt": "def ", "temperature": "hot"}), 400, "temperature must be a number")
        error(*call(url, {"prompt": "def ", "top_p": 0}), 400, "top_p")
        error(*call(url, {"prompt": "def ", "stop": 5}), 400, "stop")
        error(*call(url, {"prompt": "def ", "stream": True}), 400, "stream")
        error(*call(url, {"prompt": [1] * 100, "max_tokens": 60}), 400, "context of 128")
        error(*call(url, raw=b" " * (MAX_BODY + 10)), 413, str(MAX_BODY))
        error(*call(server.url + "/v1/chat"), 404, "unknown path")
        error(*call(server.url + "/v1/completions", method="GET"), 405, "POST")
        error(*call(server.url + "/health", {"x": 1}), 405, "GET")
        assert rec.calls == []  # nothing reached the engine

        error(*call(url, {"prompt": "def ", "max_tokens": 13, "temperature": 0}), 500, "injected failure")
        status, body = call(url, {"prompt": "def ", "max_tokens": 5, "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == expected_text(engine, "def ", max_new_tokens=5)[0][0]


def test_parse_completion_defaults_and_forms():
    kw = dict(encode=lambda s: [ord(c) % 50 for c in s], vocab_size=50, max_seq_len=32, max_tokens_limit=16)
    req = parse_completion({"prompt": "ab"}, **kw)
    assert req.prompts == [[47, 48]] and (req.max_tokens, req.temperature, req.top_p, req.top_k, req.n) == \
        (16, 1.0, 1.0, 0, 1)
    assert req.seed is None and req.stop == []
    assert parse_completion({"prompt": [[1, 2], "a"], "stop": "\n"}, **kw).prompts == [[1, 2], [47]]
    assert parse_completion({"prompt": "a", "temperature": 0, "top_k": 5}, **kw).key == (16, 0.0, 1.0, 0)
    with pytest.raises(ApiError, match="context of 32"):
        parse_completion({"prompt": "a" * 20, "max_tokens": 16}, **kw)
    with pytest.raises(ApiError, match="encodes to no tokens"):
        parse_completion({"prompt": "a"}, **{**kw, "encode": lambda s: []})
    with pytest.raises(ApiError, match="seed"):
        parse_completion({"prompt": "a", "seed": True}, **kw)


# --- the multi-rank loop: a fake engine on 2 gloo ranks -------------------------------------------


class _Tokens:
    def __init__(self, ids):
        self.ids = ids


class FakeTokenizer:
    def encode(self, s):
        return _Tokens([ord(c) % 128 for c in s])

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def get_vocab_size(self):
        return 128


class FakeCfg:
    vocab_size = 128


class FakeEngine:
    """Row b continues its prompt's last token: t+1, t+2, ... (mod 128); max_new_tokens 13 fails on every rank."""

    tokenizer, cfg, eot_id, max_seq_len = FakeTokenizer(), FakeCfg(), None, 64

    def __init__(self):
        self.calls = []

    def generate(self, prompts, *, max_new_tokens, **kw):
        self.calls.append({"prompts": prompts, "max_new_tokens": max_new_tokens, **kw})
        if max_new_tokens == 13:
            raise ValueError("unlucky")
        return [[(p[-1] + k + 1) % 128 for k in range(max_new_tokens)] for p in prompts]


def _protocol_on_ranks():
    engine = FakeEngine()
    if dist.get_rank() != 0:
        follow(engine)
        return engine.calls, None
    gen = {"op": "generate", "args": {"prompts": [[1, 2], [5]], "max_new_tokens": 3, "temperature": 0.0,
                                      "top_k": 0, "top_p": 1.0, "seed": 0, "stop": {0}}}
    results = [execute(engine, gen), execute(engine, {"op": "ping"})]
    try:
        execute(engine, {"op": "generate", "args": {**gen["args"], "max_new_tokens": 13}})
    except ValueError as e:
        results.append(str(e))
    results.append(execute(engine, {"op": "generate", "args": {**gen["args"], "prompts": [[9]]}}))
    execute(engine, {"op": "shutdown"})
    return engine.calls, results


def test_broadcast_loop_two_ranks(dist):
    (calls0, results), (calls1, _) = dist(2).run(_protocol_on_ranks, timeout=60)
    assert results == [[[3, 4, 5], [6, 7, 8]], None, "unlucky", [[10, 11, 12]]]
    assert calls0 == calls1 and len(calls0) == 3  # rank 1 ran exactly what rank 0 ran, and survived the failure


def _http_on_ranks():
    engine = FakeEngine()
    server = CompletionServer(engine, port=0, batch_wait_ms=200, max_tokens_limit=20)
    answers = []

    def clients(port):
        url = f"http://127.0.0.1:{port}/v1/completions"
        try:
            threads = [threading.Thread(target=lambda i=i: answers.append(
                (i, call(url, {"prompt": chr(65 + i), "max_tokens": 4, "temperature": 0})))) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            answers.append(("fail", call(url, {"prompt": "A", "max_tokens": 13, "temperature": 0})))
            answers.append(("after", call(url, {"prompt": "B", "max_tokens": 2, "temperature": 0})))
        finally:
            server.stop()

    server.run(ready=lambda port: threading.Thread(target=clients, args=(port,), daemon=True).start())
    return engine.calls, answers


def test_http_server_on_two_ranks(dist):
    t0 = time.monotonic()
    (calls0, answers), (calls1, none) = dist(2).run(_http_on_ranks, timeout=60)
    assert none == [] and calls0 == calls1
    got = dict(answers)
    for i in range(4):
        status, body = got[i]
        assert status == 200 and body["choices"][0]["text"] == "".join(chr(65 + i + k) for k in range(1, 5))
    assert len(calls0) < 1 + 4 + 1  # the 4 concurrent requests shared generate calls
    assert got["fail"][0] == 500 and "unlucky" in got["fail"][1]["error"]["message"]
    assert got["after"][0] == 200 and got["after"][1]["choices"][0]["text"] == "CD"
    assert time.monotonic() - t0 < 30


class GatedEngine(FakeEngine):
    """A FakeEngine whose generate waits until the test opens the gate."""

    def __init__(self):
        super().__init__()
        self.entered, self.gate = threading.Event(), threading.Event()

    def generate(self, prompts, **kw):
        self.entered.set()
        assert self.gate.wait(timeout=30)
        return super().generate(prompts, **kw)


def test_stop_answers_waiting_requests_503():
    engine = GatedEngine()
    server = CompletionServer(engine, port=0, batch_wait_ms=0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = server.url + "/v1/completions"
    answers = {}

    def ask(name, max_tokens):
        answers[name] = call(url, {"prompt": "A", "max_tokens": max_tokens, "temperature": 0})

    first = threading.Thread(target=ask, args=("running", 2))
    first.start()
    assert engine.entered.wait(timeout=10)
    second = threading.Thread(target=ask, args=("queued", 3))  # another max_tokens: not in the running batch
    second.start()
    deadline = time.monotonic() + 20
    while call(server.url + "/health")[1]["queued"] < 1:  # the second request waits in the queue
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.stop()
    engine.gate.set()
    for t in (first, second, thread):
        t.join(timeout=20)
        assert not t.is_alive()
    assert answers["running"][0] == 200 and answers["running"][1]["choices"][0]["text"] == "BC"
    assert answers["queued"][0] == 503 and "shutting down" in answers["queued"][1]["error"]["message"]
    assert len(engine.calls) == 1
