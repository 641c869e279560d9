"""Continuous batching: the one thread that owns the decode engine and feeds its slots.

A `Job` is one HTTP request: one or more `Choice`s (prompts x n), each a jaxgpt.decode.engine.Request
with its own settings and random stream. `Scheduler.submit` queues a job's choices (429 when
`max_queue` jobs are already waiting); the scheduler thread loops:

    cancelled jobs release their slots -> waiting choices take the free slots (engine.add) ->
    engine.step() (prefill of the joiners + one decode step for every active row, one token each)
    -> each new token is detokenized, checked against the stop strings, and handed to its job's
    asyncio queue on the event loop (loop.call_soon_threadsafe)

so a request joins the running batch between two steps, a finished or cancelled row frees its
slot at once, and a cancel (a client that disconnected) takes effect before the next step. The
event loop never runs the model; the scheduler thread never touches the network.

Text: tokens become text through an incremental UTF-8 decoder (a character split over tokens is
emitted once complete); text that might be the start of a stop string is held back until it is
known not to be one; a stop string ends the choice (finish_reason "stop") with the text before it.

Echo with logprobs (/v1/completions `echo` + `logprobs`, what lm-evaluation-harness's
local-completions model sends to score text): before its choices take slots, the thread scores
the job's prompts with jaxgpt.evaluate.scoring.score_continuations on the engine's own weights (its LoRA
adapter per row): each prompt token's logprob and top alternatives (the first token's: null).
"""

from __future__ import annotations

import asyncio
import codecs
import math
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

import jax
import numpy as np

from jaxgpt.decode.steps import TOP_LOGPROBS
from jaxgpt.decode.engine import Request
from jaxgpt.decode.text import TextStream, token_bytes
from jaxgpt.evaluate.scoring import score_continuations
from jaxgpt.serve.metrics import Metrics
from jaxgpt.serve.schemas import APIError, GenRequest


def seed_key(seed: int, index: int = 0) -> jax.Array:
    """The random stream of choice `index` of a request with `seed` (any 64-bit integer): the
    threefry key [hi, lo] of the seed itself for choice 0 (= jax.random.key(seed) for seeds below
    2**32), of splitmix64(seed + index) for the others. Built from numpy words: nothing compiles."""
    u = seed % 2 ** 64
    if index:
        u = _splitmix64((u + index) % 2 ** 64)
    return jax.random.wrap_key_data(np.array([u >> 32, u & 0xFFFFFFFF], np.uint32))


def _splitmix64(x: int) -> int:
    M = 2 ** 64 - 1
    x = (x + 0x9E3779B97F4A7C15) & M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)


@dataclass
class TokenInfo:
    """One token, for logprobs: its id, text bytes, logprob, the top alternatives
    [(id, bytes, logprob)], and the offset of its text in the choice's text (a prompt's first
    token, echoed, has neither logprob nor alternatives: None)."""

    id: int
    bytes: bytes
    logprob: float | None
    top: list | None
    offset: int


class Choice:
    """One generated sequence of a job: the engine row plus its text state. Mutated only by the
    scheduler thread until it is finished."""

    def __init__(self, job: "Job", index: int, prompt: list[int], max_tokens: int, adapter: int,
                 key, scheduler: "Scheduler"):
        r = job.req
        self.job, self.index, self.scheduler = job, index, scheduler
        self.prompt = prompt
        extra = {"logprobs": r.logprobs} if r.logprobs is not None else {}
        if adapter:
            extra["adapter"] = adapter
        if r.grammar is not None or r.logit_bias or r.presence_penalty or r.frequency_penalty:
            extra.update(grammar=r.grammar, logit_bias=r.logit_bias, presence_penalty=r.presence_penalty,
                         frequency_penalty=r.frequency_penalty)
        self.request = Request(prompt, max_tokens, temperature=r.temperature, top_k=r.top_k,
                               top_p=r.top_p, seed=key, stop=scheduler.stop_ids,
                               on_token=self._on_token, **extra)
        self.stream = TextStream(scheduler.token_bytes, r.stop, r.stop_tables)  # UTF-8, stop strings
        self.text = ""  # released (sent) text
        self.tokens: list[int] = []
        self.infos: list[TokenInfo] = []
        self.finish_reason: str | None = None
        self.out: list[tuple[str, list[TokenInfo]]] = []  # deltas not yet handed to the loop
        self._new_infos: list[TokenInfo] = []
        self.t_last: float | None = None
        self.finish_sent = False

    # called by the engine (scheduler thread) for every token of this row
    def _on_token(self, token: int) -> None:
        s = self.scheduler
        now = time.perf_counter()
        if self.t_last is None:
            self.job.first_token(now)
        else:
            s.metrics.observe("inter_token_latency_seconds", now - self.t_last)
        self.t_last = now
        self.tokens.append(token)
        s._touched.add(self)
        if self.finish_reason is not None:
            return
        stop = token in s.stop_ids  # <|endoftext|>: the engine ends the row; no text
        data = s.token_bytes(token)
        if self.request.logprobs is not None and self.request.token_logprobs and (
                not stop or self.job.req.kind == "completion"):  # (as vLLM: the end token's logprob too)
            lp, top = self.request.token_logprobs[-1]
            info = TokenInfo(token, data, lp, [(i, s.token_bytes(i), v) for i, v in top],
                             len(self.text) + len(self.stream.pending))
            self.infos.append(info)
            self._new_infos.append(info)
        if stop:
            return
        piece = self.stream.push_bytes(data)
        if self.stream.stopped:  # a stop string: the text before it, and the choice ends
            self._release(piece)
            self.finish("stop", flush=False)
            s.engine.release(self.request.slot, "stop")
            return
        if piece or self._new_infos:
            self._release(piece)
        if len(self.tokens) == 1 and self.out and self.job.stream:
            s._send_now(self)  # the first token goes out before the step's decode phase runs

    def _release(self, text: str) -> None:
        self.text += text
        self.out.append((text, self._new_infos))
        self._new_infos = []

    def finish(self, reason: str, flush: bool = True) -> None:
        """End this choice (scheduler thread): release the held text (unless a stop string cut
        it: `flush=False`), record the reason."""
        if self.finish_reason is not None:
            return
        if flush:
            tail = self.stream.finish()
            if tail or self._new_infos:
                self._release(tail)
        self.finish_reason = reason
        s = self.scheduler
        s._touched.add(self)
        s._in_engine.discard(self)
        if reason in ("stop", "length"):
            s.metrics.inc("requests_finished_total", finish_reason=reason)
        s.metrics.inc("generation_tokens_total", len(self.tokens))

    def take_out(self):
        out, self.out = self.out, []
        return out


class Job:
    """One HTTP generation request, its choices and the asyncio side of their output."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop):
        self.req, self.loop = req, loop
        self.id = secrets.token_hex(12)
        self.created = int(time.time())
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.queue: asyncio.Queue = asyncio.Queue()  # lists of (choice index, text, infos, finish)
        self.done = asyncio.Event()
        self.cancelled = False
        self.stream = req.stream
        self.reported = False
        self.error: APIError | None = None
        self.choices: list[Choice] = []
        self.metrics: Metrics | None = None
        # echo + logprobs: each prompt's TokenInfos, filled by the scheduler thread before the
        # choices take slots; `scored` is set (on the loop) once they are there
        self.scores_prompts = req.echo and req.logprobs is not None and req.kind == "completion"
        self.prompt_infos: list[list[TokenInfo]] | None = None
        self.scored = asyncio.Event()

    def first_token(self, now: float) -> None:
        if self.t_first is None:
            self.t_first = now
            self.metrics.observe("time_to_first_token_seconds", now - self.t0)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.req.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)


class QueueFull(APIError):
    def __init__(self, retry_after: int, waiting: int):
        super().__init__(f"the server is busy ({waiting} requests waiting); retry in {retry_after} s",
                         None, status=429, type="rate_limit_error", code="queue_full",
                         headers={"Retry-After": str(retry_after)})


class Scheduler:
    """The engine's thread: `submit` / `cancel` from the event loop, `start` / `stop`."""

    def __init__(self, engine, tokenizer, *, max_queue: int = 64, metrics: Metrics | None = None,
                 eot: int | None = None, scorer=None):
        self.engine, self.tokenizer = engine, tokenizer
        self.scorer = scorer  # the model echoed prompts are scored with (the engine's weights)
        self._to_score: deque[Job] = deque()
        self.max_queue = int(max_queue)
        self.metrics = metrics or Metrics()
        self.stop_ids = (eot,) if eot is not None else ()
        self._cond = threading.Condition()
        self._waiting: deque[Choice] = deque()
        self._queued_jobs: dict[Job, int] = {}  # job -> its choices still waiting
        self._cancels: deque[Job] = deque()
        self._touched: set[Choice] = set()
        self._in_engine: set[Choice] = set()
        self._running = False
        self._paused = False
        self._parked = False
        self._thread: threading.Thread | None = None
        self._avg_seconds = 1.0  # a running mean of request durations, for Retry-After
        self._free = engine.slots  # free slots not yet given to a waiting choice (lock held)
        self.token_bytes = token_bytes(tokenizer)  # token id -> its bytes (cached)
        self.metrics.set("slots_total", engine.slots)
        self.metrics.set("slots_free", engine.slots)

    # ---- the event loop's side ----
    def submit(self, req: GenRequest, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue a validated request; QueueFull (429 + Retry-After) if `max_queue` jobs wait."""
        job = Job(req, loop)
        job.metrics = self.metrics
        seed = req.seed if req.seed is not None else secrets.randbits(64)
        for p, prompt in enumerate(req.prompts):
            for j in range(req.n):
                i = p * req.n + j
                job.choices.append(Choice(job, i, prompt, req.max_tokens_for(p), req.adapter,
                                          seed_key(seed, i), self))
        with self._cond:
            if self._jobs_left_waiting(len(job.choices)) > self.max_queue:
                self.metrics.inc("requests_rejected_total")
                busy = len(self._waiting) / max(self.engine.slots, 1)
                raise QueueFull(max(1, math.ceil(self._avg_seconds * max(busy, 1))), len(self._queued_jobs))
            self._waiting.extend(job.choices)
            self._queued_jobs[job] = len(job.choices)
            if job.scores_prompts:
                self._to_score.append(job)
            self.metrics.inc("requests_total")
            self.metrics.set("requests_waiting", len(self._waiting))
            self._cond.notify()
        return job

    def _jobs_left_waiting(self, new_choices: int) -> int:
        """(lock held) How many jobs would wait for a slot with a new job of `new_choices`
        choices queued last: the free slots (`_free`, as of the thread's last admission or step)
        go to the queued choices in order; a job with a choice past them waits. So `max_queue`
        counts the requests waiting beside those running: 2 slots and max_queue 2 take 4."""
        room, waiting = self._free, 0
        for k in [*self._queued_jobs.values(), new_choices]:
            room -= k
            waiting += room < 0
        return waiting

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away): its rows leave their slots before the next step."""
        if job.finished or job.cancelled:
            return
        job.cancelled = True
        with self._cond:
            self._cancels.append(job)
            self._cond.notify()

    def pause(self) -> None:
        """Stop stepping after the step in progress (returns once the thread is parked); requests
        keep queueing and cancels keep arriving, both handled after `resume`."""
        with self._cond:
            self._paused = True
            self._cond.notify_all()
            while self._running and not self._parked:
                self._cond.wait(0.05)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="jaxgpt-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.engine.stop_background(60)  # (programs still compiling from start-up: dropped)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.engine.requests)

    # ---- the scheduler thread ----
    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while self._running and (self._paused or not (self._waiting or self._cancels or engine.busy)):
                    self._parked = True
                    self._cond.notify_all()
                    self._cond.wait()
                self._parked = False
                if not self._running:
                    return
                cancels = list(self._cancels)
                self._cancels.clear()
                for job in cancels:
                    self._drop_cancelled(job)
                to_score = [j for j in self._to_score if not j.cancelled]
                self._to_score.clear()
                admit = []
                free = len(engine.free_slots)
                while self._waiting and len(admit) < free:
                    c = self._waiting.popleft()
                    left = self._queued_jobs[c.job] - 1
                    if left:
                        self._queued_jobs[c.job] = left
                    else:
                        del self._queued_jobs[c.job]
                    admit.append(c)
                self._free = free - len(admit)
                self.metrics.set("requests_waiting", len(self._waiting))
            for job in to_score:
                self._score_prompts(job)
            try:
                for c in admit:
                    if c.finish_reason is not None:  # (its job failed before it got a slot)
                        continue
                    try:
                        engine.add(c.request)
                    except Exception as e:  # this request's own failure: it alone ends
                        self._fail_job(c.job, e)
                        continue
                    self._in_engine.add(c)
                    self.metrics.inc("prompt_tokens_total", len(c.prompt))
                    if c.request.done:  # (0 new tokens: cannot happen after validation)
                        c.finish(c.request.finish_reason)
                if engine.busy:
                    t = time.perf_counter()
                    engine.step()  # (a row's own failure ends that row: finish_reason "error")
                    self.metrics.observe("engine_step_seconds", time.perf_counter() - t)
                    self.metrics.inc("engine_steps_total")
                    for c in [c for c in self._in_engine if c.request.finish_reason == "error"]:
                        self._fail_job(c.job, c.request.error)
            except Exception as e:  # a failure of the whole step: fail what is running, keep serving
                traceback.print_exc(file=sys.stderr)
                self._fail_all(e)
            with self._cond:
                self._free = len(engine.free_slots)
            try:
                self._flush()
            except Exception:  # a bug: the thread (every later request) must live on
                traceback.print_exc(file=sys.stderr)

    def _score_prompts(self, job: Job) -> None:
        """Fill job.prompt_infos: every prompt token's logprob and top alternatives under the
        engine's weights (with the job's adapter), the first token's None; text offsets from
        the start of the echoed prompt. A failure fails the job (500), not the server."""
        req = job.req
        k = req.logprobs or 0
        try:
            scored = score_continuations(self.scorer, [([], p) for p in req.prompts],
                                         top=TOP_LOGPROBS if k else 0, adapters=req.adapter)
            job.prompt_infos = []
            for prompt, sc in zip(req.prompts, scored):
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                infos, offset = [], 0
                for j, tok in enumerate(prompt):
                    data = self.token_bytes(tok)
                    if j == 0:
                        lp, top = None, None
                    else:
                        lp = float(sc.logprobs[j - 1])
                        top = ([(int(i), self.token_bytes(int(i)), float(v))
                                for i, v in zip(sc.top_ids[j - 1, :k], sc.top_logprobs[j - 1, :k])]
                               if k else [])
                    infos.append(TokenInfo(tok, data, lp, top, offset))
                    offset += len(decoder.decode(data))
                job.prompt_infos.append(infos)
        except Exception as e:  # a bug: fail this job, keep serving
            traceback.print_exc(file=sys.stderr)
            job.error = APIError(f"scoring the prompt failed: {type(e).__name__}: {e}", None,
                                 status=500, type="server_error")
            for c in job.choices:
                c.finish("error")
        try:
            job.loop.call_soon_threadsafe(job.scored.set)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def _send_now(self, c: Choice) -> None:
        """Hand a choice's new text to the event loop now (inside engine.step: a first token)."""
        events = [(c.index, text, infos, None) for text, infos in c.take_out()]
        try:
            c.job.loop.call_soon_threadsafe(_deliver, c.job, events, False)
        except RuntimeError:
            pass

    def _drop_cancelled(self, job: Job) -> None:
        """(lock held) Release a cancelled job's slots and drop its waiting choices."""
        self._end_job(job, "cancelled")
        self.metrics.inc("requests_cancelled_total")

    def _end_job(self, job: Job, reason: str) -> None:
        """(lock held) Drop `job`'s waiting choices, free the slots of its running rows, and
        finish every choice not finished yet with `reason`."""
        if self._queued_jobs.pop(job, 0):
            self._waiting = deque(c for c in self._waiting if c.job is not job)
        for c in job.choices:
            r = c.request
            if r.slot is not None and self.engine.requests[r.slot] is r:
                self.engine.release(r.slot, reason)
            if c.finish_reason is None:
                c.finish(reason)

    def _fail_job(self, job: Job, e: BaseException | None) -> None:
        """End a job whose own request failed in the engine (its settings, its prefill, its
        text): its rows leave their slots, its waiting choices are dropped, it answers a 500
        (an SSE error event when streamed). The other jobs go on."""
        print(f"jaxgpt.serve: request {job.id} failed in the engine: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        if job.error is None:
            job.error = APIError(f"the engine failed on this request: {type(e).__name__}: {e}", None,
                                 status=500, type="server_error")
        with self._cond:
            self._end_job(job, "error")

    def _fail_all(self, e: Exception) -> None:
        for s, r in enumerate(self.engine.requests):
            if r is not None:
                self.engine.release(s, "error")
        for c in list(self._in_engine):
            c.job.error = APIError(f"the engine failed: {type(e).__name__}: {e}", None,
                                   status=500, type="server_error")
            c.finish("error")

    def _flush(self) -> None:
        """Hand every touched choice's new text to its job on the event loop."""
        touched, self._touched = self._touched, set()
        for c in touched:
            if c.finish_reason is None and c.request.done:
                c.finish(c.request.finish_reason if c.request.finish_reason in ("stop", "length")
                         else "length")
        touched |= self._touched  # (finish() above touches again)
        self._touched = set()
        by_job: dict[Job, list] = {}
        for c in touched:
            out = c.take_out()
            final = c.finish_reason is not None and not c.finish_sent
            if final and not out:
                out = [("", [])]
            if out:
                c.finish_sent = c.finish_sent or final
                ev = by_job.setdefault(c.job, [])
                for k, (text, infos) in enumerate(out):
                    last = k == len(out) - 1
                    ev.append((c.index, text, infos, c.finish_reason if last and final else None))
        now = time.perf_counter()
        n_free = len(self.engine.free_slots)
        self.metrics.set("slots_free", n_free)
        self.metrics.set("requests_running", self.engine.slots - n_free)
        for job, events in by_job.items():
            done = job.finished and not job.reported
            if not job.stream:  # the handler reads the choices once the job is done
                if not done:
                    continue
                events = []
            if done:
                job.reported = True
                dt = now - job.t0
                self.metrics.observe("request_duration_seconds", dt)
                self._avg_seconds = 0.9 * self._avg_seconds + 0.1 * dt
            try:
                job.loop.call_soon_threadsafe(_deliver, job, events, done)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass


def _deliver(job: Job, events: list, done: bool) -> None:
    """(event loop) Queue a step's events for the job's handler."""
    job.queue.put_nowait(events)
    if done:
        job.done.set()
