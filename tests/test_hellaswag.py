"""HellaSwag scoring (jaxgpt.hellaswag, `python -m jaxgpt.eval --task hellaswag`): predictions
equal an independent implementation here (transformers' GPT2LMHeadModel + tiktoken) under all three
rules, the CLI's --json shape and --limit, and bad inputs as one-line errors (exit 2)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgpt.evaluate import scoring as ev  # noqa: E402
from jaxgpt.evaluate import hellaswag
from jaxgpt.formats.load import load  # noqa: E402
from jaxgpt.cli import eval as eval_cli  # noqa: E402
from jaxgpt.tokenizers.tokenizer import get_tokenizer  # noqa: E402

torch.set_num_threads(2)
L = 64  # the tiny model's context: the long example below is cut from the left

# (activity_label, ctx_a, ctx_b, endings, label): ActivityNet-style (a ctx_b to capitalize) and
# WikiHow-style (bracket markup, " [title]", empty ctx_b) records, endings of different lengths
RECORDS = [
    ("Washing dishes", "A woman stands at a kitchen sink with a yellow sponge.", "she",
     ["scrubs a plate under the running water and sets it on the drying rack.", "rides away.",
      "sings.", "picks up the phone and talks to her neighbour about the weather for a while."], 0),
    ("Home and Garden", "[header] How to clean a cast iron skillet [title] Rinse the pan with hot "
     "water. [step] Avoid soap, which strips away the seasoning.", "",
     ["[title] Scrub off stuck food with coarse salt. [step] Use a folded paper towel to  work the "
      "salt into the surface.", "[title] Put the skillet in the dishwasher.", "Paint it.",
      "[title] Dry the skillet completely. [step] Set it on a low burner for a few minutes until "
      "the water has evaporated, then rub in a thin layer of oil."], 3),
    ("Playing guitar", "A young man sits on a stool holding an acoustic guitar. He tunes the "
     "strings one by one.", "then he",
     ["strums a few chords and starts to sing.", "eats the guitar.",
      "puts the guitar down and walks out of the room to make a sandwich in the kitchen.",
      "plays."], 0),
    ("Personal Care and Style", "[header] How to trim your own bangs [title] Wash and dry your "
     "hair first. [step] Wet hair shrinks as it dries, so cutting it wet can leave your bangs "
     "much shorter than you wanted. [title] Comb the bangs straight down. [step] Separate them "
     "from the rest of your hair with a fine-tooth comb and clip the rest back out of the way so "
     "it does not get in the way while you cut.", "",
     ["[title] Cut in small vertical snips. [step] Point the scissors up into the hair.",
      "[title] Shave your head.", "Buy a hat.",
      "[title] Call a friend  and ask them to describe the plot of a movie they watched last "
      "weekend in as much detail as they can remember."], 0),
    ("Making a sandwich", "A man lays two slices of bread on a cutting board.", "he",
     ["spreads mustard on one slice and adds ham and cheese.", "jumps.",
      "throws the bread at the wall.", "folds the cutting board in half and puts it in his "
      "pocket before leaving the house."], 0),
    ("Shoveling snow", "Snow covers a driveway in front of a small house. A person in a red coat "
     "comes out with a shovel.", "the person",
     ["clears a path from the door to the street.", "swims.", "starts digging.",
      "hands the shovel to a dog, who carries it back inside."], 2),
]


def official_lines():
    out = []
    for i, (label_text, a, b, endings, label) in enumerate(RECORDS):
        ctx = a + " " + b if b else a  # the official ctx: ctx_a, a space, ctx_b when there is one
        out.append({"ind": 100 + i, "activity_label": label_text, "ctx_a": a, "ctx_b": b, "ctx": ctx,
                    "split": "val", "split_type": "indomain", "label": label, "endings": endings,
                    "source_id": f"test~{i}"})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hellaswag")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=L)).eval()  # the real 50257-token vocabulary
    model.save_pretrained(root / "hf")
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in official_lines()))
    return model, root / "hf", data


# ----------------------------------------------------------------- the independent reference

def ref_preprocess(s):
    s = s.strip().replace(" [title]", ". ")
    s = re.sub(r"\[.*?\]", "", s)
    return s.replace("  ", " ")


def ref_ending_logprob(model, ctx_ids, end_ids):
    """Summed log-probability of the ending tokens and how many were scored; the window is the
    last L + 1 tokens of context + ending."""
    toks = (ctx_ids + end_ids)[-(L + 1):]
    with torch.no_grad():
        logits = model(torch.tensor(toks[:-1])[None]).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    n = min(len(end_ids), len(toks) - 1)
    targets = torch.tensor(toks[1:])
    lp = logp[torch.arange(len(toks) - 1), targets][-n:]
    return float(lp.sum()), n


def reference_predictions(model, records):
    enc = get_tokenizer("gpt2").enc  # tiktoken's gpt2 Encoding, built offline from the shipped files
    out = []
    for r in records:
        ctx = enc.encode_ordinary(r["ctx"])
        comp = [ref_ending_logprob(model, ctx, enc.encode_ordinary(" " + e)) for e in r["endings"]]
        total = np.array([s for s, _ in comp])
        mean = np.array([s / n for s, n in comp])
        # the harness: query and choices preprocessed; the continuation " choice" tokenized as
        # the tail of query + continuation encoded together; log-likelihood / len(choice)
        query = ref_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
        choices = [ref_preprocess(e) for e in r["endings"]]
        q = enc.encode_ordinary(query)
        harness = []
        for ch in choices:
            whole = enc.encode_ordinary(query + " " + ch)
            assert whole[:len(q)] == q
            harness.append(ref_ending_logprob(model, q, whole[len(q):])[0] / len(ch))
        out.append({"ind": r["ind"], "label": r["label"], "pred": int(np.argmax(total)),
                    "pred_norm": int(np.argmax(mean)), "pred_norm_harness": int(np.argmax(harness))})
    return out


def test_preprocess_is_the_harness_one():
    r = official_lines()[1]
    q = hellaswag.harness_query(r)
    assert "[" not in q and "  " not in q
    assert q.startswith("Home and Garden: How to clean a cast iron skillet. Rinse the pan")
    assert hellaswag.harness_query(official_lines()[2]).endswith("one by one. Then he")
    # a leading "[title]" has no space before it: the bracket rule deletes it, its space stays
    assert hellaswag.harness_preprocess(RECORDS[1][3][0]) == (
        " Scrub off stuck food with coarse salt. Use a folded paper towel to work the salt into "
        "the surface.")


@pytest.mark.slow
def test_predictions_match_independent_implementation(tiny):
    model, folder, data = tiny
    lm = load(folder)
    examples = hellaswag.read_examples(data)
    assert len(examples) == len(RECORDS)
    long_ctx = len(get_tokenizer("gpt2").encode_ordinary(examples[3]["ctx"]))
    assert long_ctx > L  # one context is cut from the left
    got = hellaswag.score(lm.model, lm.tokenizer, examples, progress=False)
    want = reference_predictions(model, examples)
    assert got["per_example"] == want
    labels = np.array([w["label"] for w in want])
    for key, rule in (("acc", "pred"), ("acc_norm", "pred_norm"), ("acc_norm_harness", "pred_norm_harness")):
        assert got[key] == pytest.approx(np.mean([w[rule] for w in want] == labels))
    assert got["n"] == len(RECORDS)
    # the data exercise the rules: summed vs per-token loss disagree on some example
    assert any(w["pred"] != w["pred_norm"] for w in want)

    # repeated calls (the trainer's periodic eval) compile nothing new for the same model graph
    size = ev._token_scores._cache_size()
    again = hellaswag.score(lm.model, lm.tokenizer, examples, progress=False)
    assert again["per_example"] == want
    assert ev._token_scores._cache_size() == size
    assert hellaswag.score(lm.model, lm.tokenizer, examples[:4], progress=False)["per_example"] == want[:4]


def run_cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jaxgpt.eval", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_cli_json_and_limit(tiny):
    model, folder, data = tiny
    p = run_cli(folder, "--task", "hellaswag", "--data", data, "--limit", "4", "--json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert set(got) == {"n", "acc", "acc_norm", "acc_norm_harness", "per_example"}
    assert got["n"] == 4 and [e["ind"] for e in got["per_example"]] == [100, 101, 102, 103]
    assert all(set(e) == {"ind", "label", "pred", "pred_norm", "pred_norm_harness"}
               for e in got["per_example"])
    assert got["per_example"] == reference_predictions(model, official_lines()[:4])
    assert "hellaswag" in p.stderr  # the progress bar
    assert "reference" not in p.stdout + p.stderr  # not GPT-2 124M: no reference figures


def test_cli_table(tiny, capsys):
    _, folder, data = tiny
    assert eval_cli.main([str(folder), "--task", "hellaswag", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hellaswag: {len(RECORDS)} examples")
    assert all(k in out for k in ("acc ", "acc_norm ", "acc_norm_harness"))


def test_gpt2_124m_gets_the_reference_note():
    from jaxgpt.config import GPTConfig
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)
    assert hellaswag.is_gpt2_124m(cfg, "/cache/models--gpt2/snapshots/abc")
    assert not hellaswag.is_gpt2_124m(cfg, "out/my_run")
    note = hellaswag.reference_note(full=True)
    assert "0.2859" in note and "0.2955" in note and "not checked" in note


def bad_files(tmp_path):
    good = official_lines()
    cases = {}

    def write(name, lines):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
        cases[name] = p
    write("malformed", [good[0], good[1], '{"ind": 3, "ctx": "oops'])
    write("no_endings", [good[0], {k: v for k, v in good[1].items() if k != "endings"}])
    write("no_ctx", [{k: v for k, v in good[0].items() if k != "ctx"}])
    write("no_label", [{k: v for k, v in good[0].items() if k != "label"}])
    write("label_range", [{**good[0], "label": 4}])
    write("three_endings", [{**good[0], "endings": good[0]["endings"][:3]}])
    return cases


@pytest.mark.slow
def test_bad_inputs(tiny, tmp_path, capsys):
    _, folder, data = tiny
    cases = bad_files(tmp_path)
    expect = {"malformed": "line 3", "no_endings": "line 2", "no_ctx": "ctx",
              "no_label": "label", "label_range": "out of range", "three_endings": "3 endings"}
    for name, needle in expect.items():
        code = eval_cli.main([str(folder), "--task", "hellaswag", "--data", str(cases[name])])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert needle in err, (name, err)
    # a model without the GPT-2 tokenizer (a small vocabulary): refused after the load
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_layer=1, n_head=2, n_embd=16, n_positions=32)).save_pretrained(tmp_path / "small")
    capsys.readouterr()  # transformers' own progress output
    for argv, needle in [([str(tmp_path / "small"), "--data", str(data)], "GPT-2 tokenizer"),
                         ([str(folder), "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
                         ([str(folder)], "--data"),
                         ([str(folder), "--data", str(data), "--limit", "0"], "--limit")]:
        code = eval_cli.main([*argv[:1], "--task", "hellaswag", *argv[1:]])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err, (argv, err)
    # in a fresh process: exit status 2, one line on stderr, nothing on stdout, no traceback
    p = run_cli(folder, "--task", "hellaswag", "--data", cases["malformed"])
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert "line 3" in p.stderr and "Traceback" not in p.stderr
