"""The Engine: slots of an explicit KV cache that requests enter and leave independently, for
sample, chat, SFT/GRPO rollouts, the harness and the server.

`add` prefills a request into a free slot, `step` advances every active row by one token in one
jitted call (rows at different positions, each with its own sampling settings, random stream,
LoRA adapter and grammar mask), finished rows free their slot, a callback per emitted token
streams it. A long prompt whose prefill program is not compiled yet goes into its row's cache a
chunk per step, or, before the chunk program is compiled too, a token per step through the
decode step itself (the server's warm-up compiles only the step, the rest in the background).
Built from the rest of `jaxgpt.decode`: sampling (token picking), fast (the CPU decode copy and
int8 head screen), steps (prefill, decode_step, next_tokens, the cache buckets); `generate`
(decode/generate.py) is the fused offline decoder on the same steps, and decode/batch.py runs
many requests through an Engine.

Random streams: the token at position t of a row is drawn with fold_in(row_key, t), where the
row's key comes from its own seed (Engine) or from (key, row index) (generate); so a seeded
request draws the same tokens whatever slot or batch it runs in.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.model import lora
from jaxgpt.config import ConfigError
from jaxgpt.model.gpt import BLOCKWISE_FROM, init_cache
from jaxgpt.decode.sampling import check_sampling, position_keys
from jaxgpt.decode.fast import decode_model
from jaxgpt.decode.steps import TOP_LOGPROBS, _pad_positions, bucket, decode_step, doublings, grow_cache, next_tokens, prefill, token_logprobs


# ---- Engine: slots of a KV cache that requests enter and leave ----------------------------------
@dataclass(eq=False)
class Request:
    """One sequence for the Engine: a prompt, its own sampling settings, what ends it.

    `seed` is an int or a jax PRNG key: the row's random stream, whatever slot it runs in.
    Decoding stops after a token in `stop` (which is emitted, as the last token), after
    `max_new_tokens`, or when the sequence fills the engine's cache. `on_token(token)` is called
    for each emitted token as soon as it exists. The engine fills in `tokens` (the emitted ids),
    `slot`, and `finish_reason` ("stop", "length" or "released") when it ends.

    `logprobs` (None: off; k in 0..TOP_LOGPROBS) asks for each token's logprob and the k most
    likely alternatives, appended to `token_logprobs` as (logprob, [(id, logprob)] * k) before
    `on_token` is called (see token_logprobs). `adapter` picks the engine's LoRA adapter for
    this row (0: the base model; k: the engine's adapters[k - 1]).

    A failure that is this request's own (its prefill, its `on_token` callback) ends it alone:
    finish_reason "error", the exception in `error`; the other rows go on.
    `grammar` (a jaxgpt.decode.grammar.Grammar: JSON Schema, JSON, regex, a choice list) constrains
    every token to those that keep the output a prefix of a sentence of the grammar; the row
    ends ("stop") when the grammar is complete and the model picks a stop token, or when the
    grammar admits nothing more. `logit_bias` {id: bias} is added to the row's logits (OpenAI's
    -100..100), and each id already generated k times loses k * frequency_penalty +
    presence_penalty (OpenAI's definition; the prompt does not count). These change the logits
    before every sampler (greedy included); rows without them are decoded as before.
    """

    prompt: Sequence[int]
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | jax.Array = 0
    stop: Sequence[int] = ()
    on_token: Callable[[int], None] | None = None
    logprobs: int | None = None
    adapter: int = 0
    grammar: object | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)
    slot: int | None = None
    finish_reason: str | None = None
    error: BaseException | None = None  # what ended it, with finish_reason "error"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


ENGINE_MIN_CACHE = 16  # the Engine's shortest cache (it doubles from there up to max_len)
# The most memory a whole-length cache may take (see Engine.capacities): SmolLM2's 8,192 positions
# take 46 KB each per slot, so 48 slots of it would be 18 GB; past this the cache grows instead.
ENGINE_FIXED_CACHE_BYTES = 4 << 30
# A prompt whose own prefill program is not compiled goes in chunks of this many tokens through
# one program per cache length (Engine._chunk_next), so a server compiles only the step and it
# before it answers (a prompt up to this long is one chunk).
ENGINE_CHUNK = 128


def _cache_bytes(config, slots: int, max_len: int) -> int:
    """The bytes of a KV cache of `slots` rows of `max_len` positions (from shapes: nothing made)."""
    shapes = jax.eval_shape(lambda: init_cache(config, slots, max_len))
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))


def _slot_cache(config, slots: int, max_len: int, place):
    """The Engine's cache: the model's KV cache for `slots` rows (slot s = rows s*H .. s*H+H-1
    of each [N*H, S, D] buffer) with a position per row, index int32 [N]. Put on `place` (the
    weights' device), committed like every cache the jitted calls return: jit compiles apart
    for uncommitted arguments, which warmup would then not have covered (a served request
    compiled the step and the insertion again). Zeros made on the host: nothing compiles, so a
    cache of a length warm-up never built is not an XLA compile in the middle of serving."""
    shapes = jax.eval_shape(lambda: {**init_cache(config, slots, max_len),
                                     "index": jnp.zeros((slots,), jnp.int32)})
    return jax.device_put(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes), place)


# One XLA compilation at a time from the engines' threads: a program's first call (which compiles
# it, or reads it from the persistent compilation cache) and Engine.compile (the background
# warm-up) hold it. Two threads inside XLA's compiler at once (one engine's background warm-up
# beside another's first call, the persistent cache on) hung the whole process, twice, in the
# test suite; the lock costs a call nothing once its program is compiled.
_COMPILE_LOCK = threading.RLock()


@partial(jax.jit, static_argnames="graphdef")
def _engine_prefill(graphdef, state, ids, lens, key_data, temperature, top_k, top_p, want_lp,
                    adapter, screen, mask=None, bias=None):
    """Prefill G prompts ids [G, Tb] (real lengths lens [G]) and pick their first tokens:
    ((ids [G], token_logprobs), their cache of Tb positions, index lens). adapter [G]: each
    row's LoRA adapter (0: none). Compiled per (G, Tb) only: _engine_insert puts the rows in."""
    model = nnx.merge(graphdef, state)
    lora.set_adapter_rows(model, jnp.repeat(adapter, ids.shape[1]))  # one id per row of [G*Tb, C]
    x, new = prefill(model, ids, lens)  # x [G, C]
    keys = position_keys(jax.random.wrap_key_data(key_data), lens)  # the first new token is at n
    tok = next_tokens(model, x, keys, temperature, top_k, top_p, screen, mask, bias)
    return (tok, token_logprobs(model, x, tok, want_lp)), new


@partial(jax.jit, donate_argnames="cache")
def _engine_insert(cache, new, slots):
    """The engine's cache with prefilled rows `new` (G rows of Tb positions, zero-padded to the
    cache's length) in slots `slots` [G] (an index past the last slot drops the row: padding)."""
    G, S = slots.shape[0], cache["k"][0].shape[1]
    H = new["k"][0].shape[0] // G
    rows = (slots[:, None] * H + jnp.arange(H)[None, :]).reshape(-1)  # [G*H] cache rows
    put = lambda c, r: c.at[rows].set(_pad_positions(r, S), mode="drop")
    return {"k": list(map(put, cache["k"], new["k"])), "v": list(map(put, cache["v"], new["v"])),
            "index": cache["index"].at[slots].set(new["index"], mode="drop")}


@partial(jax.jit, static_argnames="graphdef", donate_argnames="cache")
def _engine_chunk(graphdef, state, cache, ids, slot, start, n, key_data, temperature, top_k, top_p,
                  want_lp, adapter, screen, mask=None, bias=None):
    """Prefill one chunk of a long prompt straight into the engine's cache: ids [1, C] (the first
    n real) at positions start.. of slot `slot`'s rows, which hold the prompt's earlier chunks;
    the row's first token from position start + n - 1 (used after the last chunk). One program
    per cache length, whatever the prompt's length (Engine._chunk_next)."""
    model = nnx.merge(graphdef, state)
    C = ids.shape[1]
    lora.set_adapter_rows(model, jnp.repeat(adapter, C))
    H = cache["k"][0].shape[0] // cache["index"].shape[0]  # cache rows per slot (KV heads)
    take = lambda c: jax.lax.dynamic_slice_in_dim(c, slot * H, H, axis=0)  # [H, S, D]
    row = {"k": list(map(take, cache["k"])), "v": list(map(take, cache["v"])), "index": start}
    x, row = model(ids, cache=row, logits_at=n - 1, hidden=True)  # x [1, C]
    put = lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot * H, axis=0)
    cache = {"k": list(map(put, cache["k"], row["k"])), "v": list(map(put, cache["v"], row["v"])),
             "index": cache["index"].at[slot].set(start + n)}
    keys = position_keys(jax.random.wrap_key_data(key_data), start[None] + n)
    tok = next_tokens(model, x, keys, temperature, top_k, top_p, screen, mask, bias)
    return (tok, token_logprobs(model, x, tok, want_lp)), cache


_grow_slots = jax.jit(grow_cache, static_argnames="max_len")


@partial(jax.jit, static_argnames="graphdef", donate_argnames="cache")
def _engine_step(graphdef, state, cache, tokens, active, key_data, temperature, top_k, top_p,
                 want_lp, adapter, screen, mask=None, bias=None):
    """Every slot's last token tokens [N] -> (its next token [N], token_logprobs) and the cache;
    rows not `active` keep their position (what they compute is ignored). mask / bias: see
    adjust_logits (None: compiled without them)."""
    model = nnx.merge(graphdef, state)
    lora.set_adapter_rows(model, adapter)
    index = cache["index"]  # [N], one position per slot
    x, new = decode_step(model, tokens[:, None], cache)  # x [N, C]
    new = {**new, "index": jnp.where(active, new["index"], index)}
    keys = position_keys(jax.random.wrap_key_data(key_data), index + 1)
    tok = next_tokens(model, x, keys, temperature, top_k, top_p, screen, mask, bias)
    return (tok, token_logprobs(model, x, tok, want_lp)), new


class Engine:
    """Decode many requests at once over one model: `slots` rows of a KV cache of `max_len`
    positions (default: the context), one jitted step for all of them.

        engine = Engine(model, slots=8)
        slot = engine.add(Request(prompt_ids, 64, temperature=0.8, seed=1, on_token=print))
        while engine.busy:
            for slot, token in engine.step(): ...

    `add` takes a free slot (the request is prefilled at the next `step`, together with any
    others added meanwhile, in one batched call); `step` gives every active row one token and
    returns [(slot, token)]; a row that finishes frees its slot at once, `release(slot)` ends one
    early. Rows start and finish at different steps; each has its own position, settings and
    random stream. A cache of BLOCKWISE_FROM positions or more has its whole length from the
    start and is attended only as far as its rows are filled (`capacities` is [max_len]) when it
    fits in ENGINE_FIXED_CACHE_BYTES (or `grow=False`); a shorter one, a bigger one, or any with
    `grow=True`, grows with the longest live row (powers of two from
    ENGINE_MIN_CACHE up to `max_len`; see _fit_cache). Shapes are fixed by `slots`, those
    capacities and power-of-two buckets of the prompt length and of the number of prompts
    prefilled together (`shapes`), so after `warmup()` (or once every bucket has been seen)
    nothing recompiles; `warmup_in_background` compiles them while the engine serves.

    On a CPU the engine decodes through the model's decode copy (`fast_decode`), and with one
    slot greedy rows use the exact int8 head screen. `adapters` (jaxgpt.model.lora.adapter_weights
    results) are LoRA adapters a request may pick (Request.adapter): rows of one batch may use
    different ones (jaxgpt.model.lora.MultiLoRALinear: the base matmul once, each row's update added).
    The weights are those of `model` when the engine is made.
    """

    def __init__(self, model, slots: int = 1, *, max_len: int | None = None,
                 fast_decode: bool | None = None, adapters: Sequence[dict] = (), grow: bool | None = None):
        if slots < 1:
            raise ConfigError(f"an engine needs at least one slot, got {slots}")
        self.config = model.config
        self.slots = int(slots)
        self.max_len = min(int(max_len or self.config.block_size), self.config.block_size)
        self.grow = grow if grow is not None else _cache_bytes(self.config, self.slots, self.max_len) > ENGINE_FIXED_CACHE_BYTES
        model, self.screen = decode_model(model, fast_decode, screen_rows=self.slots == 1)
        self.n_adapters = len(adapters)
        if adapters:  # (on a twin: the caller's model is left as it is)
            model = nnx.merge(*nnx.split(model))
            lora.attach_adapters(model, list(adapters))
        self.graphdef, self.state = nnx.split(model)
        devices = {d for a in jax.tree.leaves(self.state) for d in a.devices()}
        self._place = min(devices, key=lambda d: d.id)  # the caches' device
        if len(devices) > 1:  # weights spread over a mesh (a multi-device run's model): one copy on
            self.state = jax.device_put(self.state, self._place)  # _place, where the caches are
        self.cache = self._empty(self.capacities[0])
        N = self.slots
        self.requests: list[Request | None] = [None] * N
        self._pending: list[int] = []  # slots added, not yet prefilled
        self._chunking: dict[int, int] = {}  # slots prefilled a chunk per step: next position
        self._feeding: dict[int, int] = {}  # slots prefilled a token per decode step: next position
        self._tokens = np.zeros(N, np.int32)  # each slot's last token
        self._key_data = np.zeros((N, *jax.random.key_data(jax.random.key(0)).shape), np.uint32)
        self._temperature = np.zeros(N, np.float32)
        self._top_k = np.zeros(N, np.int32)
        self._top_p = np.ones(N, np.float32)
        self._want_lp = np.zeros(N, bool)
        self._adapter = np.zeros(N, np.int32)
        # logit adjustments (adjust_logits), made when a row first needs them: a grammar's
        # token bitmask per slot (all ones: free), an additive bias per slot
        self._matchers: list = [None] * N
        self._mask: np.ndarray | None = None  # int32 [N, ceil(V / 32)]
        self._bias: np.ndarray | None = None  # float32 [N, V]
        self._biased = np.zeros(N, bool)
        self._seen: list[set | None] = [None] * N  # tokens a penalised row has generated
        self.compiled: set[tuple] = set()  # the shapes' keys compiled so far (see `shapes`)
        self._background: deque | None = None  # keys still to compile in the background

    # -- the cache's length --
    def _empty(self, max_len: int, rows: int | None = None):
        """An empty slot cache of max_len positions (for all slots, or `rows` rows)."""
        return _slot_cache(self.config, rows or self.slots, max_len, self._place)

    @property
    def capacities(self) -> list[int]:
        """The cache lengths the engine runs at: powers of two from ENGINE_MIN_CACHE, and max_len;
        from BLOCKWISE_FROM positions on, max_len only: such a cache is attended in blocks as far
        as its rows are filled (jaxgpt.model.gpt.attend_blocks), so one length serves every row and
        one compiled step every request (experiments/bench_serve_start.py)."""
        if self.max_len >= BLOCKWISE_FROM and not self.grow:
            return [self.max_len]
        return doublings(ENGINE_MIN_CACHE, self.max_len)

    def _fit_cache(self, running: list[int], prompt_len: int) -> None:
        """Give the cache the shortest capacity that holds every position the coming step writes:
        each running row's next one and `prompt_len` (the pending prompts' padded length).
        It grows (the rows copied) when a row outgrows it, and starts again small when no row
        is running: each step attends over at most ~2x the longest live row, not max_len."""
        need = max([len(self.requests[s].prompt) + len(self.requests[s].tokens) for s in running]
                   + [prompt_len])
        fit = next(c for c in self.capacities if c >= need)
        S = self.cache["k"][0].shape[1]
        if not running and fit != S:
            self.cache = self._empty(fit)
        elif fit > S:
            with self._first_call(("grow", S, fit)):
                self.cache = _grow_slots(self.cache, fit)

    # -- the slots --
    @property
    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.requests) if r is None]

    @property
    def busy(self) -> bool:
        """Whether any request is still decoding."""
        return any(r is not None for r in self.requests)

    def add(self, request: Request) -> int:
        """Put `request` in a free slot (RuntimeError if there is none) and return the slot. It is
        prefilled at the next `step`. ConfigError for bad settings or a prompt that does not
        leave room for a new token in the cache. A request for 0 new tokens ends at once."""
        r = request
        check_sampling(r.temperature, r.top_k, r.top_p, r.max_new_tokens)
        if not 0 <= r.adapter <= self.n_adapters:
            raise ConfigError(f"adapter {r.adapter} does not exist: this engine has {self.n_adapters}")
        if r.logprobs is not None and not 0 <= r.logprobs <= TOP_LOGPROBS:
            raise ConfigError(f"logprobs must be in 0..{TOP_LOGPROBS}, got {r.logprobs}")
        free = self.free_slots
        if not free:
            raise RuntimeError(f"all {self.slots} slots are busy; release one or wait for step()")
        slot = free[0]
        r.slot, r.tokens, r.token_logprobs, r.finish_reason, r.error = slot, [], [], None, None
        if r.max_new_tokens == 0:
            r.finish_reason = "length"
            return slot
        n = len(r.prompt)
        if not 0 < n < self.max_len:
            raise ConfigError(f"the prompt has {n} tokens; it must have 1 to {self.max_len - 1} "
                              f"(the engine's cache holds {self.max_len} positions)")
        settings = self._row_settings(r)  # (checked before the slot is taken)
        self.requests[slot] = r
        self._pending.append(slot)
        (self._key_data[slot], self._temperature[slot], self._top_k[slot], self._top_p[slot],
         self._adapter[slot]) = settings
        self._want_lp[slot] = r.logprobs is not None
        self._set_adjustments(slot, r)
        return slot

    def _row_settings(self, r: Request) -> tuple:
        """A request's row of the settings arrays, as their dtypes hold it; ConfigError for a
        value they cannot hold (a top_k past int32, a temperature past float32)."""
        try:
            key = r.seed if isinstance(r.seed, jax.Array) else jax.random.key(int(r.seed))
            if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
                key = jax.random.wrap_key_data(key)  # a raw uint32 key (jax.random.PRNGKey)
            with np.errstate(over="raise"):
                out = (np.asarray(jax.random.key_data(key)), np.float32(r.temperature),
                       np.int32(r.top_k or 0), np.float32(1.0 if r.top_p is None else r.top_p),
                       np.int32(r.adapter))
        except (OverflowError, FloatingPointError, TypeError, ValueError) as e:
            raise ConfigError(f"a request setting is out of the engine's range: {e}") from None
        if not np.isfinite(out[1]):
            raise ConfigError(f"temperature {r.temperature} is out of the engine's float32 range")
        return out

    def _set_adjustments(self, slot: int, r: Request) -> None:
        """The row's grammar matcher and logit bias (jaxgpt.grammar; adjust_logits)."""
        V = self.config.vocab_size
        if r.grammar is not None:
            if self._mask is None:
                self._mask = np.full((self.slots, -(-V // 32)), -1, np.int32)
            self._matchers[slot] = r.grammar.matcher(list(r.stop))
        if r.logit_bias or r.presence_penalty or r.frequency_penalty:
            if self._bias is None:
                self._bias = np.zeros((self.slots, V), np.float32)
            for t, b in (r.logit_bias or {}).items():
                if 0 <= int(t) < V:
                    self._bias[slot, int(t)] = b
            self._biased[slot] = True
            self._seen[slot] = set()

    def _clear_adjustments(self, slot: int) -> None:
        if self._matchers[slot] is not None:
            self._matchers[slot] = None
            self._mask[slot] = -1
        if self._biased[slot]:
            self._biased[slot] = False
            self._bias[slot] = 0.0
            self._seen[slot] = None

    def _adjustments(self, slots, rows) -> tuple:
        """(mask, bias) rows `rows` (an index array or slice) of the next call, which picks
        tokens for `slots`: their grammars' bitmasks filled now; each None when none of `slots`
        needs it (the call then compiles and runs without it)."""
        slots = [int(s) for s in dict.fromkeys(np.asarray(slots).tolist())]
        mask = bias = None
        with_grammar = [s for s in slots if self._matchers[s] is not None]
        if with_grammar:
            for s in with_grammar:
                self._matchers[s].fill(self._mask, s)
            mask = self._mask[rows]
        if self._biased[slots].any():
            bias = self._bias[rows]
        return mask, bias

    def release(self, slot: int, reason: str = "released") -> None:
        """Free `slot` now (its request, if any, ends with finish_reason `reason`)."""
        r = self.requests[slot]
        if r is not None and r.finish_reason is None:
            r.finish_reason = reason
        self.requests[slot] = None
        # a free slot's row is computed and ignored: make it the cheapest (greedy, no filters), so
        # it does not keep the batch on the sampling / sorting / logprobs paths
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = 0.0, 0, 1.0
        self._want_lp[slot] = False
        self._clear_adjustments(slot)
        if slot in self._pending:
            self._pending.remove(slot)
        self._chunking.pop(slot, None)
        self._feeding.pop(slot, None)

    # -- decoding --
    def _settings(self, rows):
        return (self._key_data[rows], self._temperature[rows], self._top_k[rows], self._top_p[rows],
                self._want_lp[rows], self._adapter[rows])

    def _fail(self, slot: int, e: BaseException) -> None:
        """End the request in `slot` alone: finish_reason "error", `e` kept in its `error`."""
        r = self.requests[slot]
        if r is not None:
            r.error = e
            self.release(slot, "error")

    def _emit_row(self, slot: int, token: int, events: list, lp=None, i: int = 0) -> None:
        """_emit, a failure of this row (its callback, its logprobs) ending this row alone."""
        try:
            self._emit(slot, token, events, lp, i)
        except Exception as e:
            self._fail(slot, e)

    def _emit(self, slot: int, token: int, events: list, lp=None, i: int = 0) -> None:
        r = self.requests[slot]
        r.tokens.append(token)
        matcher = self._matchers[slot]
        if matcher is not None and not matcher.accept(token):
            raise RuntimeError(f"the grammar rejected token {token} that its own mask allowed")
        if self._biased[slot] and (r.presence_penalty or r.frequency_penalty):
            self._bias[slot, token] -= r.frequency_penalty + (
                r.presence_penalty if token not in self._seen[slot] else 0.0)
            self._seen[slot].add(token)
        if r.logprobs is not None:  # lp: the step's token_logprobs, this row at index i
            top = zip(lp[1][i, :r.logprobs].tolist(), lp[2][i, :r.logprobs].tolist())
            r.token_logprobs.append((float(lp[0][i]), list(top)))
        self._tokens[slot] = token
        events.append((slot, token))
        if r.on_token is not None:
            r.on_token(token)
        limit = min(r.max_new_tokens, self.max_len - len(r.prompt))
        if self.requests[slot] is not r:  # (on_token released it)
            return
        if token in r.stop or (matcher is not None and matcher.done):
            self.release(slot, "stop")
        elif len(r.tokens) >= limit:
            self.release(slot, "length")

    def _prompt_bucket(self, slots: list[int]) -> int:
        return bucket(max([len(self.requests[s].prompt) for s in slots], default=1), cap=self.max_len)

    def _ready(self, G: int, Tb: int, S: int) -> bool:
        return ("prefill", G, Tb) in self.compiled and ("insert", S, G, Tb) in self.compiled

    def _prefill_shape(self, slots: list[int], S: int) -> tuple[int, int, int]:
        """(how many of the pending `slots` to prefill now, G, Tb): all of them at their own
        buckets when that program is compiled; else, while shapes still compile in the
        background, the most of them a compiled program takes (a prompt padded up to 4x
        further), the rest at a later step; (0, ..) when none fits (its program is wanted now;
        meanwhile they go in chunks if the engine can chunk), or when the engine can chunk and
        no warm-up runs (then it never compiles a prefill in the middle of serving)."""
        Tb = self._prompt_bucket(slots)
        G = bucket(len(slots), cap=self.slots, lo=1)
        if self._ready(G, Tb, S):
            return len(slots), G, Tb
        if self._background is None:  # (not: the last one compiling, the queue empty)
            return (0, G, Tb) if self._can_chunk() else (len(slots), G, Tb)
        for t in (t for t in self.prompt_lengths if Tb <= t <= 4 * Tb and t <= S):
            for g in sorted({bucket(i, cap=self.slots, lo=1) for i in range(1, len(slots) + 1)}, reverse=True):
                if self._ready(g, t, S):
                    return min(g, len(slots)), g, t
        for key in (("prefill", 1, Tb), ("insert", S, 1, Tb)):  # the least that serves: next
            self._want(key, urgent=True)
        if ("chunk", S) in self._chunk_keys():  # before them, the chunk program: meanwhile the
            self._want(("chunk", S), urgent=True)  # prompt goes a token per step, then in chunks
        return 0, G, Tb

    def _prefill(self, slots: list[int], G: int, Tb: int) -> tuple:
        """Run _engine_prefill for `slots` (pending) as G prompts of Tb, into the cache."""
        prompts = [self.requests[s].prompt for s in slots]
        ids = np.zeros((G, Tb), np.int32)
        lens = np.ones(G, np.int32)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
            lens[i] = len(p)
        rows = np.array(slots + [self.slots] * (G - len(slots)), np.int32)  # self.slots: dropped
        settings = self._settings(np.minimum(rows, self.slots - 1))
        adjust = self._adjustments(slots, np.minimum(rows, self.slots - 1))
        with self._first_call(_adjusted(("prefill", G, Tb), adjust)):
            out, new = _engine_prefill(self.graphdef, self.state, ids, lens, *settings, self.screen, *adjust)
        # (committed like the cache, whether or not the weights are: one compiled insertion)
        with self._first_call(("insert", self.cache["k"][0].shape[1], G, Tb)):
            self.cache = _engine_insert(self.cache, jax.device_put(new, self._place), rows)
        return out

    def step(self) -> list[tuple[int, int]]:
        """One token for every active row: prefill the requests added since the last step (their
        first token), advance the others by one. Returns [(slot, token)] in slot order per phase;
        calls each request's on_token; frees the slots of rows that finished."""
        if self.cache["index"].is_deleted():  # a call was interrupted after taking the cache
            self.cache = self._empty(self.capacities[0])
            for s in range(self.slots):  # (the rows it held are lost)
                self.release(s)
        events: list[tuple[int, int]] = []
        self._chunk_adjusted()
        running = [s for s, r in enumerate(self.requests) if r is not None and s not in self._pending
                   and s not in self._chunking and s not in self._feeding]
        self._fit_cache(running, self._prompt_bucket(self._pending))  # (none pending: the smallest)
        n, G, Tb = self._prefill_shape(self._pending, self.cache["k"][0].shape[1]) if self._pending else (0, 0, 0)
        if self._pending and not n and self._can_chunk():  # its program compiles: go in chunks
            self._to_chunks(self._pending)
        elif self._pending and not n and self._can_feed():  # so does the chunk program: by the step
            self._to_feeding(self._pending)
        elif self._pending and not n and not running and not self._chunking and not self._feeding:  # compile it here
            n, G, Tb = len(self._pending), bucket(len(self._pending), cap=self.slots, lo=1), \
                self._prompt_bucket(self._pending)
        if self._chunking:
            self._chunk_next(events)
        if n:
            slots, self._pending = self._pending[:n], self._pending[n:]
            self._prefill_rows(slots, events, G, Tb)
        if running or self._feeding:
            self._step_rows(running, events)
        return events

    def _step_rows(self, running: list[int], events: list) -> None:
        """One decode step: each running row's next token, and each feeding row's next prompt
        token into the cache (its sampled token is used only after its last prompt token)."""
        fed = list(self._feeding)
        for s in fed:
            self._tokens[s] = self.requests[s].prompt[self._feeding[s]]
        active = np.zeros(self.slots, bool)
        active[running + fed] = True
        adjust = self._adjustments(running + fed, slice(None))
        with self._first_call(_adjusted(("step", self.cache["k"][0].shape[1]), adjust)):
            (tok, lp), self.cache = _engine_step(self.graphdef, self.state, self.cache, self._tokens,
                                                 active, *self._settings(slice(None)), self.screen, *adjust)
        tok, lp = np.asarray(tok), _host(lp, self._want_lp)
        for s in running:
            if self.requests[s] is not None:  # (an on_token callback may have released it)
                self._emit_row(s, int(tok[s]), events, lp, s)
        for s in fed:
            self._feeding[s] += 1
            if self._feeding[s] == len(self.requests[s].prompt):
                del self._feeding[s]
                self._emit_row(s, int(tok[s]), events, lp, s)
            elif self._can_chunk(s):  # the chunk program is compiled now: the rest in chunks
                self._chunking[s] = self._feeding.pop(s)

    def _can_chunk(self, slot: int | None = None) -> bool:
        """Whether a prompt can go in chunks (_chunk_next): a cache of one fixed length, a whole
        number of chunks, whose chunk program is compiled (for `slot`: the one with its grammar
        mask / logit bias, if it has them)."""
        return any((*key, *self._row_flags(slot)) in self.compiled for key in self._chunk_keys())

    def _row_flags(self, slot: int | None) -> tuple:
        """The key flags of `slot`'s programs (see _adjusted): ("mask",) for a grammar, ("bias",)
        for a logit bias; () for a plain row or slot None."""
        return () if slot is None else _adjusted((), (self._matchers[slot], self._biased[slot] or None))

    def _chunk_adjusted(self) -> None:
        """Pending prompts with a grammar mask or a logit bias go in chunks when their chunk
        program is compiled (warm-up compiles it; their prefill programs it does not), else a
        token per step while their step program is compiled and the chunk one is not yet."""
        adjusted = [s for s in self._pending if self._matchers[s] is not None or self._biased[s]]
        self._to_chunks([s for s in adjusted if self._can_chunk(s)])
        self._to_feeding([s for s in adjusted if s in self._pending and self._can_feed(s)])

    def _can_feed(self, slot: int | None = None) -> bool:
        """Whether a prompt can go a token per step through the decode step: while the warm-up
        compiles in the background (an engine without one compiles the prompt's prefill once
        instead), with a cache of one fixed length whose step program (for `slot`: the one with
        its grammar mask / logit bias) is compiled."""
        S = self.capacities[0]
        return (self._background is not None and len(self.capacities) == 1
                and ("step", S, *self._row_flags(slot)) in self.compiled)

    def _to_feeding(self, rows: list[int]) -> None:
        """Move pending `rows` to the prefill through the decode step, from position 0: their
        cache positions are reset on the host (a transfer, nothing to compile)."""
        if not rows:
            return
        index = np.array(self.cache["index"])
        index[rows] = 0
        self.cache = {**self.cache, "index": jax.device_put(index, self._place)}
        self._feeding.update((s, 0) for s in rows)
        self._pending = [s for s in self._pending if s not in rows]

    def _to_chunks(self, rows: list[int]) -> None:
        """Move pending `rows` to the chunked prefill, from their first position."""
        self._chunking.update((s, 0) for s in rows)
        self._pending = [s for s in self._pending if s not in rows]

    def _chunk_next(self, events: list) -> None:
        """Prefill the next ENGINE_CHUNK tokens of the first chunking row (one chunk per step,
        so running rows keep decoding between them); after its last chunk the row has its first
        token and runs. A failure ends that row alone."""
        slot, start = next(iter(self._chunking.items()))
        # a row that came from the step (_step_rows) may be at any position: its last chunk must
        # end within the cache, so it starts earlier, writing again positions it already holds
        start = min(start, self.capacities[0] - ENGINE_CHUNK)
        prompt = self.requests[slot].prompt
        part = prompt[start:start + ENGINE_CHUNK]
        ids = np.zeros((1, ENGINE_CHUNK), np.int32)
        ids[0, :len(part)] = part
        rows = np.array([slot], np.int32)
        adjust = self._adjustments([slot], rows)
        try:
            with self._first_call(_adjusted(("chunk", self.capacities[0]), adjust)):
                (tok, lp), self.cache = _engine_chunk(
                    self.graphdef, self.state, self.cache, ids, np.int32(slot), np.int32(start),
                    np.int32(len(part)), *self._settings(rows), self.screen, *adjust)
        except Exception as e:
            if self.cache["index"].is_deleted():
                raise
            self._fail(slot, e)
            return
        if start + ENGINE_CHUNK < len(prompt):
            self._chunking[slot] = start + ENGINE_CHUNK
            return
        del self._chunking[slot]
        self._emit_row(slot, int(np.asarray(tok)[0]), events, _host(lp, self._want_lp[rows]), 0)

    def _prefill_rows(self, slots: list[int], events: list, G: int, Tb: int) -> None:
        """Prefill `slots` together (as G prompts of Tb) and emit their first tokens. If that fails, each is tried
        alone (one compiled shape: groups of 1 are warmed up), so the request whose prefill
        fails ends with its error and the others start as usual. (Cache untouched on failure:
        _engine_prefill runs before the insertion.)"""
        try:
            tok, lp = self._prefill(slots, G, Tb)
            tok, lp = np.asarray(tok), _host(lp, self._want_lp[slots])
        except Exception as e:
            if self.cache["index"].is_deleted():  # (failed inside the insertion: not one row's)
                raise
            if len(slots) == 1:
                self._fail(slots[0], e)
            else:
                for s in slots:
                    self._prefill_rows([s], events, 1, self._prompt_bucket([s]))
            return
        for i, s in enumerate(slots):
            if self.requests[s] is not None:
                self._emit_row(s, int(tok[i]), events, lp, i)

    def run(self) -> None:
        """Step until every request has finished."""
        while self.busy:
            self.step()

    # -- compiling ahead --
    @property
    def prompt_lengths(self) -> list[int]:
        """The padded prompt lengths prefills compile for (bucket: powers of two from 16, max_len)."""
        return doublings(ENGINE_MIN_CACHE, self.max_len)

    def shapes(self, max_prompt: int | None = None, first: int | None = None) -> list[tuple]:
        """The compiled programs this engine can meet, as keys ("step", S), ("grow", S, S2),
        ("chunk", S) (a long prompt in chunks, with a cache of one length S: _chunk_next),
        ("prefill", G, Tb), ("insert", S, G, Tb) (G prompts padded to Tb, a cache of S), in the
        order worth having them: every step and growth, then one prompt at a time from the
        `first` padded length up and down, then G prompts at once. `max_prompt`: prompts up to
        that many tokens only."""
        top = bucket(max_prompt, cap=self.max_len) if max_prompt else self.max_len
        lengths = [t for t in self.prompt_lengths if t <= top] or [self.prompt_lengths[0]]
        start = bucket(first or 1, cap=self.max_len)
        lengths = [t for t in lengths if t >= start] + [t for t in lengths if t < start][::-1]
        caps = self.capacities
        out = [("step", S) for S in caps] + [("grow", a, b) for a in caps for b in caps if b > a]
        chunk = self._chunk_keys()
        out += chunk
        if chunk:
            # a row with a grammar mask and/or a logit bias runs other programs (_adjusted): its
            # step, and its prompt in chunks (step() sends such prompts there)
            out += [(k, caps[0], *f) for f in (("mask",), ("bias",), ("mask", "bias")) for k in ("step", "chunk")]
        for G in sorted({bucket(g, cap=self.slots, lo=1) for g in range(1, self.slots + 1)}):
            for Tb in lengths:
                out += [("prefill", G, Tb)] + [("insert", S, G, Tb) for S in caps if S >= Tb]
        return out

    def _chunk_keys(self) -> list[tuple]:
        """[("chunk", S)] if prompts can go in chunks into this engine's cache (one fixed
        length S, a whole number of chunks), else []."""
        S = self.capacities[0]
        return [("chunk", S)] if len(self.capacities) == 1 and S % ENGINE_CHUNK == 0 else []

    def compile(self, key: tuple) -> None:
        """Compile the program of `key` (see `shapes`) ahead of time, from shapes only: nothing
        runs, no slot or cache is touched (safe beside a running engine, from another thread)."""
        with _COMPILE_LOCK:
            if key not in self.compiled:
                self._compile(key)

    def _compile(self, key: tuple) -> None:
        spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(self._place))
        cache = lambda S, rows=None: jax.tree.map(spec, jax.eval_shape(
            lambda: {**init_cache(self.config, rows or self.slots, S),
                     "index": jnp.zeros((rows or self.slots,), jnp.int32)}))
        kind, *shape = key
        flags = [x for x in shape if isinstance(x, str)]  # ("mask", "bias"): see _adjusted
        shape = [x for x in shape if not isinstance(x, str)]
        V = self.config.vocab_size
        adjust = lambda n: (np.zeros((n, -(-V // 32)), np.int32) if "mask" in flags else None,
                            np.zeros((n, V), np.float32) if "bias" in flags else None)
        if kind == "step":
            _engine_step.lower(self.graphdef, self.state, cache(shape[0]), self._tokens,
                               np.zeros(self.slots, bool), *self._settings(slice(None)), self.screen,
                               *adjust(self.slots)).compile()
        elif kind == "grow":
            _grow_slots.lower(cache(shape[0]), shape[1]).compile()
        elif kind == "chunk":
            one = np.zeros(1, np.int32)
            _engine_chunk.lower(self.graphdef, self.state, cache(shape[0]), np.zeros((1, ENGINE_CHUNK), np.int32),
                                np.int32(0), np.int32(0), np.int32(1), *self._settings(one), self.screen,
                                *adjust(1)).compile()
        elif kind == "prefill":
            G, Tb = shape
            _engine_prefill.lower(self.graphdef, self.state, np.zeros((G, Tb), np.int32), np.ones(G, np.int32),
                                  *self._settings(np.zeros(G, np.int32)), self.screen, None, None).compile()
        else:
            S, G, Tb = shape
            _engine_insert.lower(cache(S), cache(Tb, G), np.zeros(G, np.int32)).compile()
        self.compiled.add(key)

    def _first_call(self, key: tuple):
        """The context of a call of the program of `key`: its first call (it compiles) holds
        _COMPILE_LOCK, and then `key` counts as compiled; later calls take no lock."""
        if key in self.compiled:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def first():
            with _COMPILE_LOCK:
                yield
            self.compiled.add(key)
        return first()

    def warmup(self, max_prompt: int | None = None, shapes: Sequence[tuple] | None = None) -> None:
        """Compile every shape this engine can meet (`shapes`: those keys only; `max_prompt`:
        prompts up to that many tokens only, longer ones compile on first use). Touches no slot."""
        for key in self.shapes(max_prompt) if shapes is None else shapes:
            self.compile(key)

    def queue_background(self, shapes: Sequence[tuple]) -> None:
        """The shapes warmup_in_background will compile: from now on the engine serves as while
        they compile (a prompt whose program is not ready goes through a compiled one), before
        the thread starts (so the caller's first requests compile nothing in this thread)."""
        self._background = deque(k for k in shapes if k not in self.compiled) or None

    def warmup_in_background(self, shapes: Sequence[tuple], log=None) -> threading.Thread:
        """Compile `shapes` in a thread while the engine serves (queue_background: until the last
        is compiled). Meanwhile a prefill whose program is not ready yet uses a compiled one that
        fits (more padding, fewer prompts per call), goes in chunks or a token per step
        (_can_feed), or waits for its own, which then compiles next (the step never waits: its
        programs are compiled before). `log(done, total, seconds)` after each."""
        self.queue_background(shapes)
        total, t0 = len(self._background or ()), time.perf_counter()

        def work():
            done = 0
            try:
                while self._background:
                    try:
                        key = self._background.popleft()
                    except IndexError:
                        break
                    self.compile(key)
                    done += 1
                    if log is not None:
                        log(done, total, time.perf_counter() - t0)
            finally:  # (whatever happened: from now on every shape compiles where it is needed)
                self._background = None

        thread = threading.Thread(target=work, name="jaxgpt-compile", daemon=True)
        thread.start()
        self._warm_thread = thread
        return thread

    def stop_background(self, timeout: float | None = None) -> None:
        """Drop the shapes not compiled yet and wait for the one compiling (a process must not
        exit while XLA compiles in a thread: it aborts)."""
        queue = self._background
        if queue is not None:
            queue.clear()
        thread = getattr(self, "_warm_thread", None)
        if thread is not None:
            thread.join(timeout)

    def _want(self, key: tuple, urgent: bool = False) -> None:
        """Put `key` first in the background compilation queue."""
        if self._background is not None and key not in self.compiled:
            try:
                self._background.remove(key)
            except ValueError:
                pass
            self._background.appendleft(key)


def _adjusted(key: tuple, adjust: tuple) -> tuple:
    """`key` of a call with these (mask, bias): the program compiled with them is another one."""
    mask, bias = adjust
    return key + (("mask",) if mask is not None else ()) + (("bias",) if bias is not None else ())


def _host(lp, want) -> tuple | None:
    """A step's token_logprobs as numpy arrays, or None when no row asked for them."""
    return tuple(np.asarray(a) for a in lp) if np.any(want) else None
