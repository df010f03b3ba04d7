"""`meshlm serve`: a small OpenAI-style completion server (standard library HTTP, no new dependencies).

    POST /v1/completions   {"prompt": "def ", "max_tokens": 32, "temperature": 0.8, "n": 2, "stop": "\\n\\n"}
    GET  /v1/models        the one model served
    GET  /health           {"status": "ok", ...}

Rank 0 runs a threaded HTTP server. Each request is checked, encoded and split into jobs (one per
prompt and sample) that go into one queue. `Engine.generate` is collective under tensor and pipeline
parallelism, so a single worker loop on rank 0's main thread runs it: it takes up to `max_batch` jobs
that share the sampling settings (waiting up to `batch_wait_ms` for more to arrive), broadcasts the
work item to the other ranks (`broadcast_object_list`), and every rank runs `generate` together. The
other ranks run `follow`: receive an item, run it, repeat, until a shutdown item. When idle, rank 0
broadcasts a ping every `HEARTBEAT_S` so the others' receive never reaches the process-group timeout.

Seeds: the engine seeds row b of a batch with seed + b. Choice j of a seeded request (prompt p, sample i:
j = p * n + i) asks for seed + j, so the worker packs seeded jobs into consecutive rows (row b of a batch
with base s holds a job that asked for s + b): an answer does not depend on what else was in its batch,
and equals engine.generate(prompts repeated n times, seed=seed). Unseeded sampling takes a fresh random
base per batch; greedy decoding ignores seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import queue
import secrets
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import torch.distributed as dist

MAX_BODY = 1 << 20
"""Largest request body (bytes); bigger ones are answered 413."""
MAX_N = 8
"""Most samples per prompt (`n`)."""
MAX_PROMPTS = 64
"""Most prompts in one request."""
MAX_STOP = 4
"""Most stop strings (as OpenAI)."""
MAX_SEED = 2**62
HEARTBEAT_S = 30.0
"""An idle rank 0 pings the other ranks this often (they wait in a collective with a timeout)."""


# --- errors and request parsing (pure) ------------------------------------------------------------


class ApiError(Exception):
    """An answer other than 200, as OpenAI shapes it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclasses.dataclass(frozen=True)
class Completion:
    """A checked request: token prompts and sampling settings."""

    prompts: list[list[int]]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    seed: int | None
    stop: list[str]

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a `generate` call (greedy ignores top_p and top_k)."""
        if self.temperature == 0:
            return (self.max_tokens, 0.0, 1.0, 0)
        return (self.max_tokens, self.temperature, self.top_p, self.top_k)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(400, f"{name} must be a number, got {v!r}", param=name)
    if v < lo or (lo_open and v == lo) or v > hi:
        raise ApiError(400, f"{name} ({v}) must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]", param=name)
    return float(v)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int, why: str = "") -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise ApiError(400, f"{name} must be an integer, got {v!r}", param=name)
    if not lo <= v <= hi:
        raise ApiError(400, f"{name} ({v}) must be between {lo} and {hi}{why}", param=name)
    return v


def parse_completion(body: Any, *, encode: Callable[[str], list[int]], vocab_size: int, max_seq_len: int,
                     max_tokens_limit: int) -> Completion:
    """Check an OpenAI completions body; raise ApiError(400) naming the field and the rule."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    for name in ("stream", "echo"):
        if body.get(name):
            raise ApiError(400, f"{name} is not supported by meshlm serve", param=name)
    if body.get("logprobs") is not None:
        raise ApiError(400, "logprobs is not supported by meshlm serve", param="logprobs")

    raw = body.get("prompt")
    if raw is None:
        raise ApiError(400, "prompt is required", param="prompt")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "prompt must be a non-empty string, a list of strings, a list of token ids "
                            "or a list of lists of token ids", param="prompt")
    if all(_is_int(t) for t in raw):
        raw = [raw]  # one prompt given as token ids
    if len(raw) > MAX_PROMPTS:
        raise ApiError(400, f"prompt has {len(raw)} entries; at most {MAX_PROMPTS} per request", param="prompt")
    prompts = []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            if not p:
                raise ApiError(400, f"prompt {i} is empty", param="prompt")
            ids = list(encode(p))
            if not ids:
                raise ApiError(400, f"prompt {i} ({p!r}) encodes to no tokens", param="prompt")
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            if not all(0 <= t < vocab_size for t in p):
                raise ApiError(400, f"prompt {i}: token ids must be in [0, {vocab_size})", param="prompt")
            ids = list(p)
        else:
            raise ApiError(400, f"prompt {i} must be a non-empty string or a non-empty list of token ids, "
                                f"got {p!r:.60}", param="prompt")
        prompts.append(ids)

    max_tokens = _integer(body, "max_tokens", 16, 1, max_tokens_limit, " (this server's limit)")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _integer(body, "top_k", 0, 0, vocab_size)
    n = _integer(body, "n", 1, 1, MAX_N)
    seed = _integer(body, "seed", None, 0, MAX_SEED)

    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise ApiError(400, f"stop must be null, a non-empty string or a list of at most {MAX_STOP} non-empty "
                            "strings", param="stop")

    for i, ids in enumerate(prompts):
        if len(ids) + max_tokens > max_seq_len:
            raise ApiError(400, f"prompt {i} has {len(ids)} tokens; with max_tokens {max_tokens} that exceeds the "
                                f"model's context of {max_seq_len} tokens", param="max_tokens")
    return Completion(prompts=prompts, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      n=n, seed=seed, stop=stop)


# --- the collective work loop ---------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(item: dict | None) -> dict:
    """Rank 0's item, on every rank (a no-op in one process)."""
    if _world()[1] == 1:
        return item
    buf = [item]
    dist.broadcast_object_list(buf, src=0)
    return buf[0]


def _try_share(item: dict) -> None:
    try:
        _share(item)
    except Exception:  # noqa: BLE001 - the other ranks are gone already (Ctrl-C reaches every rank)
        pass


def execute(engine, item: dict) -> list[list[int]] | None:
    """Rank 0: send a work item ({"op": "generate", "args": {...}} | {"op": "ping"} | {"op": "shutdown"}) to the
    other ranks and run it here too; returns generate's result."""
    item = _share(item)
    if item["op"] == "generate":
        return engine.generate(**item["args"])
    return None


def follow(engine) -> None:
    """Ranks other than 0: run rank 0's work items until a shutdown item (or Ctrl-C)."""
    try:
        while True:
            item = _share(None)
            if item["op"] == "shutdown":
                return
            if item["op"] == "generate":
                try:
                    engine.generate(**item["args"])
                except Exception:  # noqa: BLE001 - rank 0 answers the request with the error; carry on
                    traceback.print_exc()
    except KeyboardInterrupt:
        return


# --- requests and jobs ----------------------------------------------------------------------------


class _Pending:
    """One HTTP request waiting for its jobs' results."""

    def __init__(self, slots: int):
        self.results: list[list[int] | None] = [None] * slots
        self.remaining = slots
        self.error: ApiError | None = None
        self.done = threading.Event()
        self.lock = threading.Lock()

    def put(self, slot: int, tokens: list[int]) -> None:
        with self.lock:
            self.results[slot] = tokens
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

    def fail(self, error: ApiError) -> None:
        with self.lock:
            if self.error is None:
                self.error = error
            self.done.set()


@dataclasses.dataclass(eq=False)
class _Job:
    pending: _Pending
    slot: int
    tokens: list[int]
    key: tuple
    row_seed: int | None
    """The generator seed this row needs (seeded sampling), or None (any)."""
    arrived: float


_SHUTDOWN = object()


# --- the server -----------------------------------------------------------------------------------


class CompletionServer:
    """The HTTP front (rank 0) and the batching worker loop (every rank). `run()` blocks until `stop()`."""

    def __init__(self, engine, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                 max_tokens_limit: int = 512, batch_wait_ms: float = 10, model_name: str = "meshlm",
                 log_requests: bool = False):
        if max_batch < 1 or max_tokens_limit < 1 or batch_wait_ms < 0:
            raise ValueError("max_batch and max_tokens_limit must be >= 1 and batch_wait_ms >= 0")
        if engine.tokenizer is None:
            raise ValueError("the engine has no tokenizer (the checkpoint lacks tokenizer.json)")
        self.engine, self.host = engine, host
        self.max_batch, self.max_tokens_limit = max_batch, max_tokens_limit
        self.batch_wait = batch_wait_ms / 1e3
        self.model_name, self.log_requests = model_name, log_requests
        self.stop_ids = {engine.eot_id} if engine.eot_id is not None else set()
        self.vocab_size = engine.cfg.vocab_size or engine.tokenizer.get_vocab_size()
        self.created = int(time.time())
        self.rank, self.world = _world()
        self.batches = 0
        """generate calls so far (rank 0)."""
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._backlog: list[_Job] = []
        """Jobs taken off the queue and not answered yet (the worker loop's; failed with 503 on shutdown)."""
        self.httpd: ThreadingHTTPServer | None = None
        self.port: int | None = None
        if self.rank == 0:  # bind now, so port 0 is resolved before run() and a busy port fails early
            server_cls = _HTTPServer6 if ":" in host else ThreadingHTTPServer
            self.httpd = server_cls((host, port), type("Handler", (_Handler,), {"app": self}))
            self.httpd.daemon_threads = True
            self.port = self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # --- life cycle ---------------------------------------------------------------------------------

    def run(self, ready: Callable[[int], Any] | None = None) -> None:
        """Serve until stop() (rank 0) or until rank 0's shutdown item (other ranks). Ctrl-C stops too."""
        if self.rank != 0:
            follow(self.engine)
            return
        http = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                name="meshlm-serve-http", daemon=True)
        http.start()
        print(f"meshlm serve: listening on {self.url}", flush=True)
        interrupted = False
        try:
            if ready is not None:
                ready(self.port)
            self._work()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self._close(interrupted=interrupted)
            self.httpd.shutdown()
            self.httpd.server_close()
            http.join(timeout=5)

    def stop(self) -> None:
        """End run() (thread-safe; the other ranks' loops end too): the running batch finishes, requests still
        waiting are answered 503."""
        self._queue.put(_SHUTDOWN)

    def _close(self, *, interrupted: bool) -> None:
        with self._lock:
            self._closed = True
        while True:  # answer whatever is still queued
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._backlog.extend(item if isinstance(item, list) else [])
        for job in self._backlog:  # (after Ctrl-C, also the batch that was running)
            job.pending.fail(ApiError(503, "the server is shutting down", kind="server_error"))
        self._backlog = []
        if self.world > 1:
            # After Ctrl-C the others may be gone (torchrun interrupts every rank) or mid-collective:
            # try, but do not wait on them for long.
            t = threading.Thread(target=_try_share, args=({"op": "shutdown"},), daemon=True)
            t.start()
            t.join(timeout=5 if interrupted else 30)

    def submit(self, req: Completion) -> _Pending:
        """Queue a checked request's jobs (one per prompt and sample); the caller waits on .done."""
        pending = _Pending(len(req.prompts) * req.n)
        now = time.monotonic()
        jobs = []
        for p, ids in enumerate(req.prompts):
            for i in range(req.n):
                seed = req.seed + p * req.n + i if (req.seed is not None and req.temperature > 0) else None
                jobs.append(_Job(pending, p * req.n + i, ids, req.key, seed, now))
        with self._lock:
            if self._closed:
                raise ApiError(503, "the server is shutting down", kind="server_error")
            self._queue.put(jobs)
        return pending

    # --- the worker loop (rank 0's main thread) -----------------------------------------------------

    def _work(self) -> None:
        backlog = self._backlog
        while True:
            if not backlog:
                try:
                    item = self._queue.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    execute(self.engine, {"op": "ping"})
                    continue
                if item is _SHUTDOWN:
                    return
                backlog.extend(item)
            # gather more jobs until the first one's group is full or it has waited batch_wait
            while True:
                first = backlog[0]
                if sum(j.key == first.key for j in backlog) >= self.max_batch:
                    break
                try:
                    left = first.arrived + self.batch_wait - time.monotonic()
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _SHUTDOWN:
                    return  # _close answers the backlog
                backlog.extend(item)
            batch, rest = self._take(backlog)
            if batch:
                self._run(batch)
            backlog[:] = rest  # answered jobs leave the backlog only now

    def _take(self, backlog: list[_Job]) -> tuple[list[_Job], list[_Job]]:
        """The next batch (from the oldest job's group) and what is left. Seeded jobs sit at row
        (row_seed - base); unseeded ones anywhere. Jobs of requests that already failed are dropped."""
        backlog = [j for j in backlog if j.pending.error is None]
        if not backlog:
            return [], []
        first = backlog[0]
        same = [j for j in backlog if j.key == first.key and (j.row_seed is None) == (first.row_seed is None)]
        if first.row_seed is None:
            batch = same[:self.max_batch]
        else:
            by_seed: dict[int, _Job] = {}
            for j in same:
                by_seed.setdefault(j.row_seed, j)
            batch = [first]
            while len(batch) < self.max_batch and first.row_seed + len(batch) in by_seed:
                batch.append(by_seed[first.row_seed + len(batch)])
        chosen = {id(j) for j in batch}
        return batch, [j for j in backlog if id(j) not in chosen]

    def _run(self, batch: list[_Job]) -> None:
        max_tokens, temperature, top_p, top_k = batch[0].key
        if temperature == 0:
            seed = 0
        elif batch[0].row_seed is not None:
            seed = batch[0].row_seed
        else:
            seed = secrets.randbelow(MAX_SEED)
        args = {"prompts": [j.tokens for j in batch], "max_new_tokens": max_tokens, "temperature": temperature,
                "top_k": top_k, "top_p": top_p, "seed": seed, "stop": set(self.stop_ids)}
        self.batches += 1
        try:
            out = execute(self.engine, {"op": "generate", "args": args})
        except Exception as e:  # noqa: BLE001 - answer 500 and keep serving
            traceback.print_exc()
            err = ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
            for job in batch:
                job.pending.fail(err)
            return
        for job, tokens in zip(batch, out):
            job.pending.put(job.slot, list(tokens))

    # --- answers ------------------------------------------------------------------------------------

    def complete(self, body: Any) -> dict:
        """The /v1/completions answer for a decoded JSON body (blocks until the jobs are done)."""
        tok = self.engine.tokenizer
        req = parse_completion(body, encode=lambda s: tok.encode(s).ids, vocab_size=self.vocab_size,
                               max_seq_len=self.engine.max_seq_len, max_tokens_limit=self.max_tokens_limit)
        pending = self.submit(req)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        choices, generated = [], 0
        for slot, new in enumerate(pending.results):
            generated += len(new)
            finish = "length"
            if new and new[-1] in self.stop_ids:
                new, finish = new[:-1], "stop"
            text = tok.decode(new)
            cuts = [i for i in (text.find(s) for s in req.stop) if i >= 0]
            if cuts:
                text, finish = text[:min(cuts)], "stop"
            choices.append({"text": text, "index": slot, "finish_reason": finish, "logprobs": None})
        prompt_tokens = sum(len(p) for p in req.prompts)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                          "total_tokens": prompt_tokens + generated}}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "meshlm", "max_seq_len": self.engine.max_seq_len}]}

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, "queued": self._queue.qsize(), "batches": self.batches}


def _json(raw: bytes) -> Any:
    if not raw:
        raise ApiError(400, "the body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None


class _HTTPServer6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """Routes to the CompletionServer in `app`; every answer is JSON."""

    app: CompletionServer
    server_version = "meshlm"
    timeout = 60  # seconds a client may take to send its request
    routes = {"/v1/completions": ("POST",), "/v1/models": ("GET",), "/health": ("GET",)}

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_DELETE(self):
        self._route("DELETE")

    def do_PATCH(self):
        self._route("PATCH")

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        headers: dict[str, str] = {}
        try:
            raw = self._read_body()  # always read first: closing on unread bytes would reset the connection
            if path not in self.routes:
                raise ApiError(404, f"unknown path {path}; the paths are {', '.join(self.routes)}")
            if method not in self.routes[path]:
                allowed = ", ".join(self.routes[path])
                raise ApiError(405, f"{method} is not allowed on {path} (use {allowed})", headers={"Allow": allowed})
            if path == "/v1/completions":
                status, body = 200, self.app.complete(_json(raw))
            elif path == "/v1/models":
                status, body = 200, self.app.models()
            else:
                status, body = 200, self.app.health()
        except ApiError as e:
            status, body, headers = e.status, e.body(), e.headers
        except Exception as e:  # noqa: BLE001 - a bug answers 500; the server keeps serving
            traceback.print_exc()
            status, body = 500, ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body()
        self._send(status, body, headers)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "chunked bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {length!r}") from None
        if n > MAX_BODY:
            if n <= 16 * MAX_BODY:  # read it anyway, so the client sees our answer and not a reset connection
                self._drain(n)
            self.close_connection = True
            raise ApiError(413, f"the body has {n} bytes; at most {MAX_BODY} are accepted")
        return self.rfile.read(n)

    def _drain(self, n: int) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                return
            n -= len(chunk)

    def _send(self, status: int, body: dict, headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client left
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if self.app.log_requests:
            sys.stderr.write(f"meshlm serve: {self.address_string()} {format % args}\n")


def serve(engine, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_tokens_limit: int = 512,
          batch_wait_ms: float = 10, ready: Callable[[int], Any] | None = None, model_name: str = "meshlm",
          log_requests: bool = False) -> None:
    """Serve `engine` until Ctrl-C. Every rank calls it: rank 0 answers HTTP on host:port (port 0: a free one;
    `ready(port)` is called once listening), the others run rank 0's batches. For a server that can be
    stopped from code, use CompletionServer(...).run() and .stop()."""
    CompletionServer(engine, host=host, port=port, max_batch=max_batch, max_tokens_limit=max_tokens_limit,
                     batch_wait_ms=batch_wait_ms, model_name=model_name, log_requests=log_requests).run(ready)


# --- the command ----------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """meshlm serve --ckpt CKPT [--host H] [--port P] [--layout.tp T] [--layout.pp P] ..."""
    import os

    from ..config import ConfigError
    from ..launch import launch_local, under_torchrun
    from ..layout import Layout, validate
    from ..settings import RunConfig
    from ..train import checkpoint

    p = argparse.ArgumentParser(prog="meshlm serve", description="Serve a checkpoint over HTTP with an "
                                "OpenAI-style completions API (POST /v1/completions, GET /v1/models, GET /health).")
    p.add_argument("--ckpt", required=True, help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    p.add_argument("--max-batch", type=int, default=8, help="most sequences per generate call")
    p.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--batch-wait-ms", type=float, default=10, help="how long a request waits for others to batch")
    p.add_argument("--layout.tp", dest="tp", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--layout.pp", dest="pp", type=int, default=1, help="pipeline-parallel ranks")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads per rank (0: cores / ranks)")
    p.add_argument("--model-name", default=None, help="model id in answers (default: the run folder's name)")
    p.add_argument("--log-requests", action="store_true", help="print one line per request")
    args = p.parse_args(argv)
    for name in ("max_batch", "max_tokens_limit", "tp", "pp"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be >= 1")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port ({args.port}) must be between 0 and 65535")
    if args.batch_wait_ms < 0:
        raise ConfigError(f"--batch-wait-ms ({args.batch_wait_ms}) must be >= 0")

    folder = checkpoint.resolve(args.ckpt)
    manifest = checkpoint.read_manifest(folder, verify=False)  # the engine reads (and checks) the tensors
    cfg = RunConfig.from_dict(manifest["config"])
    if cfg.model.family == "bert":
        raise ConfigError(f"checkpoint {folder} holds a bert model; serve needs a decoder (gpt or llama)")
    if not (folder / "tokenizer.json").is_file():
        raise checkpoint.CheckpointError(f"checkpoint {folder}: tokenizer.json is missing")
    layout = Layout(tp=args.tp, pp=args.pp, schedule="gpipe")  # no training schedule: no micro-batch rule
    validate(layout, cfg.model)
    if args.max_tokens_limit >= cfg.model.max_seq_len:
        args.max_tokens_limit = cfg.model.max_seq_len - 1  # a prompt needs at least one token
    world = layout.world_size
    if not under_torchrun() and args.port:  # a busy port fails now, before any rank loads the model
        try:
            with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as HTTPServer does
                s.bind((args.host, args.port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    if world > 1 and not under_torchrun():
        from torch.distributed.elastic.multiprocessing.api import SignalException
        try:
            return launch_local(world, [*argv, "--ckpt", str(folder)], threads=args.threads,
                                module="meshlm.infer.server")
        except SignalException:  # Ctrl-C or SIGTERM reached the launcher: it has stopped the ranks
            return 0
    if under_torchrun() and int(os.environ["WORLD_SIZE"]) != world:
        raise ConfigError(f"the layout has {world} ranks (tp*pp) but torchrun started {os.environ['WORLD_SIZE']}")

    from .engine import Engine
    from ..train.trainer import init_distributed, set_threads

    rank, _, device = init_distributed(args.device)
    set_threads(args.threads)
    name = args.model_name or (folder.parent.parent.name if folder.parent.name == "ckpt" else folder.name)
    try:
        engine = Engine.from_checkpoint(folder, layout=layout, device=device)
        try:
            server = CompletionServer(engine, host=args.host, port=args.port, max_batch=args.max_batch,
                                      max_tokens_limit=args.max_tokens_limit, batch_wait_ms=args.batch_wait_ms,
                                      model_name=name, log_requests=args.log_requests)
        except OSError as e:
            raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
        if rank == 0:
            import signal
            signal.signal(signal.SIGTERM, lambda *_: server.stop())
        server.run()
        if rank == 0:
            print("meshlm serve: stopped", flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _module_main(argv: list[str]) -> int:
    """`python -m meshlm.infer.server` (each rank, when launched): one-line errors, as the meshlm command."""
    from ..cli import USER_ERRORS
    try:
        return main(argv)
    except USER_ERRORS as e:
        print(f"meshlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(_module_main(sys.argv[1:]))

