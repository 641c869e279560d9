"""The `jaxgpt` model of EleutherAI's lm-evaluation-harness: any model `jaxgpt.load` reads (GPT-2
and the other families, int8, LoRA adapters) scored and decoded by jaxgpt itself.

    lm = JaxGPTLM(path="gpt2")                  # what `--model jaxgpt --model_args path=gpt2` builds
    lm.loglikelihood(requests)                  # [(log p(continuation | context), is_greedy)]
    lm.loglikelihood_rolling(requests)          # [log p(text)] over the harness's rolling windows
    lm.generate_until(requests)                 # [text] up to a stop string or max_gen_toks

It mirrors the harness's own `hf` model (lm_eval.models.huggingface.HFLM) rule for rule, so the
same weights give the same numbers: the (context, continuation) split of TemplateLM, the prefix
token of an empty context or a rolling window (`prefix_token_id`, else the tokenizer's BOS,
else its end-of-text token), BOS prepended only when the tokenizer does so by default or
`add_bos_token` says, inputs cut from the left to `max_length` + 1 tokens, rolling windows from
lm_eval.utils, stop strings and `max_gen_toks` as HFLM handles them.

Scoring goes through jaxgpt.evaluate.scoring.score_continuations (batched by padded length, each shape
compiled once), generation through the one decoder's slot engine (jaxgpt.decode.engine.Engine:
prompts of any length decoded together, a row leaving as soon as it produced a stop string or
its end-of-text token). This module imports lm_eval; nothing else in jaxgpt does.
"""

from __future__ import annotations

import sys

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from jaxgpt.tokenizers import templates
from jaxgpt.config import ConfigError
from jaxgpt.evaluate.scoring import adds_bos, prepend_bos, score_continuations

ARGS = {  # model_args -> what they do (the one-line error for an unknown key lists them)
    "path": "the model: anything jaxgpt.load takes (run dir, HF folder, hub name, int8 "
            "checkpoint, LoRA adapter folder)",
    "pretrained": "the same as path (the hf model's name for it)",
    "int8": "quantize the weights to int8 on load",
    "max_length": "tokens of context per forward (default: the model's context)",
    "max_gen_toks": "default new tokens per generate_until request (256)",
    "add_bos_token": "prepend the BOS token to every encoding (default: as the tokenizer does)",
    "prefix_token_id": "the token an empty context or a rolling window starts from "
                       "(default: BOS, else end-of-text)",
    "batch_size": "rows per compiled scoring call and generation slots (1 / auto: chosen by jaxgpt)",
    "template": "chat template for --apply_chat_template (alpaca, chatml, none, model; default: "
                "the one saved with the model, else its own, else alpaca)",
    "seed": "random seed of sampled generations (do_sample=True)",
}
IGNORED = ("device", "max_batch_size", "trust_remote_code")  # the harness CLI passes these to every model
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")
MAX_SLOTS = 8  # generation rows decoded together by default


def check_args(args: dict) -> None:
    """ConfigError (one line) for model_args the jaxgpt model does not take, or without a path."""
    unknown = sorted(k for k in args if k not in ARGS and k not in IGNORED)
    if unknown:
        raise ConfigError(f"--model_args: unknown key(s) {', '.join(unknown)}; the jaxgpt model "
                          f"takes {', '.join(ARGS)}")
    if not (args.get("path") or args.get("pretrained")):
        raise ConfigError("--model_args: the jaxgpt model needs path=CKPT (a jaxgpt run, a Hugging "
                          "Face folder, a hub name, an int8 checkpoint or a LoRA adapter folder)")
    if args.get("path") and args.get("pretrained") and args["path"] != args["pretrained"]:
        raise ConfigError("--model_args: give path or pretrained, not both")


def _int_arg(name: str, value, lo: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"--model_args {name} must be an integer >= {lo}, got {value!r}")
    return value


def _bool_arg(name: str, value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ConfigError(f"--model_args {name} must be True or False, got {value!r}")


class JaxGPTLM(TemplateLM):
    """An lm_eval model over a jaxgpt LoadedModel (see the module docstring)."""

    def __init__(self, path: str | None = None, pretrained: str | None = None, int8: bool = False,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 batch_size: int | str | None = None, template: str | None = None, seed: int = 1234,
                 **harness_args):
        super().__init__()
        check_args({"path": path, "pretrained": pretrained, **harness_args})
        from jaxgpt.formats.load import load_for_inference  # (late: loading pulls in orbax)

        self.path = str(path or pretrained)
        self.lm = load_for_inference(self.path, int8=bool(_bool_arg("int8", int8)))
        self.tokenizer = self.lm.tokenizer
        if self.tokenizer is None:
            raise ConfigError(f"{self.path} has no known tokenizer; the harness scores text")
        L = self.lm.config.block_size
        self._max_length = _int_arg("max_length", max_length) or L
        if self._max_length > L:
            raise ConfigError(f"--model_args max_length={max_length} is longer than the model's "
                              f"context ({L})")
        self._max_gen_toks = _int_arg("max_gen_toks", max_gen_toks)
        self.add_bos_token = _bool_arg("add_bos_token", add_bos_token)
        if self.add_bos_token is None:  # the tokenizer's own default, as HF's add_special_tokens
            self.add_bos_token = adds_bos(self.tokenizer)
        self.custom_prefix_token_id = _int_arg("prefix_token_id", prefix_token_id, lo=0)
        if isinstance(batch_size, str):  # (the harness CLI passes it as text: "8", "auto", "auto:4")
            batch_size = None if batch_size.startswith("auto") else (
                int(batch_size) if batch_size.isdigit() else batch_size)
        self._rows = _int_arg("batch_size", batch_size)
        if self._rows == 1:  # the harness CLI's default: let the logits budget choose
            self._rows = None
        self.template = templates.check_template(template or templates.default_template(self.lm))
        self.seed = _int_arg("seed", seed, lo=0)
        self._engine = None

    # ---- the tokenizer, as HFLM uses it --------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return getattr(self.tokenizer, "bos_token", None)

    @property
    def eot_token_id(self) -> int | None:
        return getattr(self.tokenizer, "eot_token", None)

    @property
    def prefix_token_id(self) -> int:
        for tok in (self.custom_prefix_token_id, self.bos_token_id, self.eot_token_id):
            if tok is not None:
                return tok
        raise ConfigError(f"{self.path}: its tokenizer has no BOS or end-of-text token to start an "
                          "empty context or a rolling window from; pass --model_args prefix_token_id=ID")

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._rows or 1

    @property
    def tokenizer_name(self) -> str:
        return self.path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """`string`'s ids; BOS first when add_special_tokens (None: the model's add_bos_token,
        except for a string that already starts with the prefix token's text, as HFLM)."""
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if (add and add_special_tokens is None and self.bos_token_id is not None
                and string.startswith(self.tok_decode([self.prefix_token_id]))):
            add = False
        ids = prepend_bos(self.tokenizer, self.tokenizer.encode(string), bool(add))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens))

    # ---- scoring ---------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """[(sum of the continuation's logprobs, whether greedy decoding gives it)] for requests
        [(cache key, context ids, continuation ids)]: the row is the last max_length + 1 tokens of
        context + continuation (HFLM's truncation), scored by jaxgpt.evaluate.scoring.score_continuations."""
        pairs = []
        for _, ctx, cont in requests:
            if not cont:
                raise ConfigError("a loglikelihood request has an empty continuation")
            if len(cont) > self.max_length:
                raise ConfigError(f"a continuation of {len(cont)} tokens is longer than max_length "
                                  f"({self.max_length})")
            toks = (list(ctx) + list(cont))[-(self.max_length + 1):]
            pairs.append((toks[:len(toks) - len(cont)], list(cont)))
        scored = score_continuations(self.lm.model, pairs, rows=self._rows,
                                     desc=None if disable_tqdm else "jaxgpt loglikelihood")
        out = []
        for (key, _, _), s in zip(requests, scored):
            answer = (s.total, s.is_greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text: its tokens in the harness's disjoint rolling
        windows of max_length (the first predicted from the prefix token), all windows of all
        texts scored together."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = np.zeros(len(requests), np.float64)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    # ---- generation ------------------------------------------------------------------------
    def _generation(self, context: str, gen_kwargs: dict, index: int):
        """(prompt ids, max new tokens, stop strings, engine Request settings) of one request,
        as HFLM reads its gen_kwargs; ConfigError for a setting jaxgpt does not implement."""
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kw.pop("until", None),
                                      eos=None if self.eot_token_id is None else self.tok_decode([self.eot_token_id]))
        max_gen = int(kw.pop("max_gen_toks"))
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
        top_p, top_k = kw.pop("top_p", None), kw.pop("top_k", None)
        if kw:
            raise ConfigError(f"generation setting(s) {', '.join(sorted(kw))} are not supported by the "
                              f"jaxgpt model (it takes {', '.join(GEN_KWARGS)})")
        room = self.max_length - max_gen
        if room < 1:
            raise ConfigError(f"max_gen_toks {max_gen} leaves no room for a prompt in max_length "
                              f"{self.max_length}")
        prompt = self.tok_encode(context)[-room:] or [self.prefix_token_id]
        settings = {"temperature": temperature if do_sample else 0.0, "seed": self.seed + index}
        if do_sample:
            settings.update(top_p=None if top_p is None else float(top_p),
                            top_k=None if top_k is None else int(top_k))
        return prompt, max_gen, until, settings

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation: decoded by the slot engine (greedy unless do_sample),
        cut before the first stop string (the end-of-text token's text is one)."""
        from jaxgpt.decode.batch import run_requests
        from jaxgpt.decode.engine import Engine, Request
        from jaxgpt.decode.text import TextStream, token_bytes

        jobs = [self._generation(ctx, kw, i) for i, (ctx, kw) in enumerate(r.args for r in requests)]
        if self._engine is None:
            self._engine = Engine(self.lm.model, slots=self._rows or MAX_SLOTS, max_len=self.max_length)
        engine = self._engine
        stop_ids = () if self.eot_token_id is None else (self.eot_token_id,)
        as_bytes = token_bytes(self.tokenizer)
        results: list[str | None] = [None] * len(jobs)
        bar = tqdm(total=len(jobs), desc="jaxgpt generate_until", disable=disable_tqdm, file=sys.stderr)
        streams = [TextStream(as_bytes, until) for _, _, until, _ in jobs]
        rows = [Request(prompt, max_gen, stop=stop_ids, **settings) for prompt, max_gen, _, settings in jobs]
        for req, stream in zip(rows, streams):
            req.on_token = self._until(engine, req, stream, stop_ids)

        def done(i, req) -> None:
            streams[i].finish()
            results[i] = postprocess_generated_text(streams[i].text, jobs[i][2], None)
            bar.update(1)

        run_requests(engine, rows, done)
        bar.close()
        for (ctx, kw), text in zip((r.args for r in requests), results):
            self.cache_hook.add_partial("generate_until", (ctx, kw), text)
        return results

    @staticmethod
    def _until(engine, req, stream, stop_ids):
        """A row's on_token: its text through `stream`; the row ends at its first stop string."""
        def on_token(token: int) -> None:
            if token not in stop_ids:
                stream.push(token)
                if stream.stopped:
                    engine.release(req.slot, "stop")
        return on_token

    # ---- chat templates (--apply_chat_template) ----------------------------------------------
    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template renders it: ready for the reply, or (not
        add_generation_prompt) continuing the last, assistant message."""
        msgs = [{"role": m["role"], "content": m["content"]} for m in chat_history]
        jinja = getattr(self.tokenizer, "chat_template", None)  # (the template "model")
        if add_generation_prompt or not msgs or msgs[-1]["role"] != "assistant":
            return templates.render_prompt(self.template, msgs, jinja)
        return templates.render_prompt(self.template, msgs[:-1], jinja) + msgs[-1]["content"]

    def get_model_info(self) -> dict:
        return {"model_source": str(self.lm.meta.get("source", self.path)), "int8": self.lm.is_int8}
