"""Training a byte-level BPE tokenizer on a corpus: the library behind
`python -m jaxgpt.tokenizer train` (the CLI is jaxgpt/cli/tokenizer.py).

    from jaxgpt.tokenizers.train import train_tokenizer
    tok = train_tokenizer(["books/", "web.jsonl.gz"], "tok32k", vocab_size=32768, split="llama3",
                          special_tokens=["<|pad|>"], chat_template="chatml")

The sources are the ones `python -m jaxgpt.prepare` reads (jaxgpt.corpus: text files,
directories, globs, jsonl/json/parquet, .gz/.zst, hf:NAME), read as the same stream of
documents. Hugging Face `tokenizers` (Rust) learns the merges: its BpeTrainer over GPT-2's 256-byte
alphabet (every byte is a token, so nothing is ever unknown), after GPT-2's or Llama 3's split
pattern; `tokenizers` is deterministic, so the same input gives the same file. The special tokens
take the first ids: the end-of-text token (`eos_token`, default `<|endoftext|>`, the token
`prepare` puts before every document) first, then `special_tokens`, then those of the chat template.

DIR gets `tokenizer.json` (written by `tokenizers`) and `tokenizer_config.json` (the
PreTrainedTokenizerFast class, eos_token, the chat template), so
`transformers.AutoTokenizer.from_pretrained(DIR)` loads it unchanged, and every jaxgpt command
takes DIR as `--tokenizer` (jaxgpt.tokenizers.tokenizer.load_tokenizer_dir reads it; jaxgpt's own BPE encodes).

`hf_tokenizer_files(tok)` goes the other way for any jaxgpt BPETokenizer (one saved in a checkpoint
as a dict, one from a GGUF file): its tokenizer.json + tokenizer_config.json, which
`python -m jaxgpt.convert --to-hf` puts in the Hugging Face folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxgpt.config import ConfigError
from jaxgpt.data.corpus import PIECE_CHARS, check_source, iter_units, resolve_sources
from jaxgpt.files import atomic_write
from jaxgpt.tokenizers.bpe import BPETokenizer
from jaxgpt.tokenizers.bytelevel import _HF_GPT2_SPLIT, _LLAMA3_SPLIT, EOT

SPLITS = ("gpt2", "llama3")  # GPT-2's split (ByteLevel's own regex), Llama 3's (a Split first)
BYTES = 256
BATCH_UNITS = 256  # documents (pieces) handed to `tokenizers` at once
MAX_VOCAB = 1 << 31

# ChatML as a Jinja template (jaxgpt.tokenizers.templates.render_chatml renders the same text)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT_TEMPLATES = {"chatml": (CHATML, ("<|im_start|>", "<|im_end|>"))}


def chat_template_source(spec: str | None) -> tuple[str | None, tuple[str, ...]]:
    """(Jinja source, special tokens it needs) of --chat-template: "chatml" or a Jinja file."""
    if not spec:
        return None, ()
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    p = Path(spec)
    if not p.is_file():
        raise ConfigError(f"--chat-template {spec!r} is neither chatml nor a Jinja file")
    try:
        return p.read_text(encoding="utf-8"), ()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--chat-template {spec}: cannot read it ({e})") from None


def special_list(eos_token: str, special_tokens, template_specials) -> list[str]:
    """The special tokens in id order: eos first, then the asked ones, then the template's."""
    out: list[str] = []
    for t in [eos_token, *special_tokens, *template_specials]:
        if not isinstance(t, str) or not t:
            raise ConfigError(f"a special token must be a non-empty string, got {t!r}")
        if t not in out:
            out.append(t)
    return out


def build_tokenizer(split: str):
    """An untrained `tokenizers` byte-level BPE with GPT-2's or Llama 3's pre-tokenizer."""
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    except ImportError:
        raise ConfigError("training a tokenizer needs Hugging Face tokenizers: pip install "
                          "tokenizers") from None
    if split not in SPLITS:
        raise ConfigError(f"unknown --split {split!r}; choose {' or '.join(SPLITS)}")
    tok = Tokenizer(models.BPE())
    if split == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _batches(srcs, text_field: str, bar):
    """Lists of document texts (long documents in pieces, cut where no token spans the cut)."""
    batch = []
    for text, _, pos in iter_units(srcs, text_field, PIECE_CHARS):
        batch.append(text)
        if len(batch) >= BATCH_UNITS:
            yield batch
            batch = []
        if bar is not None:
            bar.update(max(0, pos - bar.n))
    if batch:
        yield batch


def hf_config(eos_token: str | None, chat_template: str | None, specials: list[str],
              bos_token: str | None = None, model_max_length: int | None = None) -> dict:
    """tokenizer_config.json for AutoTokenizer: PreTrainedTokenizerFast over tokenizer.json."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token,
           "bos_token": bos_token, "unk_token": None, "pad_token": None,
           "clean_up_tokenization_spaces": False, "add_bos_token": False,
           "additional_special_tokens": [t for t in specials if t not in (eos_token, bos_token)]}
    if model_max_length:
        cfg["model_max_length"] = int(model_max_length)
    if chat_template:
        cfg["chat_template"] = chat_template
    return cfg


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if (out / "tokenizer.json").exists() and not force:
        raise ConfigError(f"--out {out} already holds a tokenizer.json; pass --force to replace it")


def train_tokenizer(sources, out, vocab_size: int, split: str = "gpt2", special_tokens=(),
                    eos_token: str = EOT, chat_template: str | None = None,
                    min_frequency: int = 2, text_field: str = "text", force: bool = False,
                    progress: bool = False, log=None) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (specials included) on `sources` and write
    `out/tokenizer.json` + `out/tokenizer_config.json`; returns jaxgpt's BPETokenizer of it.
    `chat_template`: "chatml" or a Jinja file (tokenizer_config.json's chat_template)."""
    from tokenizers import pre_tokenizers, trainers

    log = log or (lambda msg: None)
    out = Path(out)
    template, template_specials = chat_template_source(chat_template)
    specials = special_list(eos_token, special_tokens, template_specials)
    smallest = len(specials) + BYTES
    if not smallest < int(vocab_size) <= MAX_VOCAB:
        raise ConfigError(f"--vocab-size must be more than the {len(specials)} special tokens + "
                          f"{BYTES} bytes = {smallest} (and at most 2^31), got {vocab_size}")
    if int(min_frequency) < 0:
        raise ConfigError(f"--min-frequency must be >= 0, got {min_frequency}")
    specs = [str(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)]
    srcs = resolve_sources(specs)
    for s in srcs:
        check_source(s)
    _check_out(out, force)

    tok = build_tokenizer(split)
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                  special_tokens=specials, show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    total = None if any(s.kind == "hf" for s in srcs) else sum(s.size() for s in srcs)
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="read",
               disable=not progress, mininterval=0.5)
    try:
        tok.train_from_iterator(_batches(srcs, text_field, bar), trainer=trainer)
    finally:
        bar.close()
    if tok.get_vocab_size() <= smallest:
        raise ConfigError("the sources hold no text to learn merges from")
    if tok.get_vocab_size() < int(vocab_size):
        log(f"note: the corpus gives only {tok.get_vocab_size()} tokens (pairs seen fewer than "
            f"{min_frequency} times are not merged), less than --vocab-size {vocab_size}")
    cfg = hf_config(eos_token, template, specials)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "tokenizer.json", tok.to_str(pretty=True).encode("utf-8"))
    atomic_write(out / "tokenizer_config.json",
                 (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    ours = BPETokenizer.from_hf_folder(out)
    log(f"trained {ours.vocab_size:,} tokens ({len(ours.merges):,} merges, {len(specials)} "
        f"special) on {total if total is not None else '?'} bytes: {out / 'tokenizer.json'}")
    return ours


# ---------------------------------------------------------------------------------------------
# BPETokenizer -> Hugging Face files

_BEHAVIOR_NAMES = {"isolated": "Isolated", "removed": "Removed",
                   "merged_with_previous": "MergedWithPrevious",
                   "merged_with_next": "MergedWithNext", "contiguous": "Contiguous"}


def _hf_pre_tokenizer(steps: list[dict]) -> dict:
    """The pre-tokenizer of BPETokenizer steps: each Split, then ByteLevel (with GPT-2's regex
    when that is the last split, as tokenizers' own ByteLevel spells it)."""
    prefix = any(s.get("prefix_space") for s in steps)
    splits = [s for s in steps if "split" in s]
    use_regex = bool(splits) and splits[-1] == {"split": _HF_GPT2_SPLIT}
    if use_regex:
        splits = splits[:-1]
    items = [{"type": "Split", "pattern": {"Regex": s["split"]},
              "behavior": _BEHAVIOR_NAMES[s.get("behavior", "isolated")],
              "invert": bool(s.get("invert", False))} for s in splits]
    items.append({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True,
                  "use_regex": use_regex})
    return items[0] if len(items) == 1 else {"type": "Sequence", "pretokenizers": items}


def _token_text(tok: BPETokenizer, i: int | None) -> str | None:
    if i is None:
        return None
    for a in tok.added:
        if a["id"] == i:
            return a["content"]
    return tok.decode_bytes([i]).decode("utf-8", errors="replace")


def hf_tokenizer_json(tok: BPETokenizer) -> dict:
    """tokenizer.json of a jaxgpt BPETokenizer: the same ids in `tokenizers` / transformers."""
    vocab = {t: i for i, t in enumerate(tok.tokens) if t is not None}
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in tok.merges]
    added = [{"id": a["id"], "content": a["content"], "single_word": a["single_word"],
              "lstrip": a["lstrip"], "rstrip": a["rstrip"], "normalized": a["normalized"],
              "special": a["special"]} for a in tok.added]
    bos = _token_text(tok, tok.bos_token)
    if tok.add_bos and bos is not None:
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [tok.bos_token], "tokens": [bos]}}}
    else:
        post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                "use_regex": True}
    norm = [{"type": n} for n in tok.normalizer]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": (None if not norm else norm[0] if len(norm) == 1
                       else {"type": "Sequence", "normalizers": norm}),
        "pre_tokenizer": _hf_pre_tokenizer(tok.pre),
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None,
                  "unk_token": _token_text(tok, tok.unk_token), "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": tok.fuse_unk, "byte_fallback": False,
                  "ignore_merges": tok.ignore_merges, "vocab": vocab, "merges": merges},
    }


def hf_tokenizer_files(tok: BPETokenizer) -> dict[str, bytes]:
    """{file name: bytes} of a Hugging Face tokenizer folder for `tok` (tokenizer.json,
    tokenizer_config.json): AutoTokenizer.from_pretrained of it gives jaxgpt's ids."""
    eos, bos = _token_text(tok, tok.eot_token), _token_text(tok, tok.bos_token)
    specials = [a["content"] for a in tok.added if a["special"]]
    cfg = hf_config(eos, tok.chat_template, specials, bos_token=bos)
    cfg["add_bos_token"] = bool(tok.add_bos and bos is not None)
    dump = lambda d: (json.dumps(d, indent=2, ensure_ascii=False) + "\n").encode("utf-8")  # noqa: E731
    return {"tokenizer.json": dump(hf_tokenizer_json(tok)), "tokenizer_config.json": dump(cfg)}
