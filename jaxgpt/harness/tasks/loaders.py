"""The datasets of jaxgpt's local lm-evaluation-harness tasks (the YAMLs beside this file name
these functions with `!function loaders.NAME`); everything is read from files shipped in the
package, so the tasks run offline.

- hellaswag_docs: hellaswag_sample.jsonl (the official HellaSwag jsonl format), processed as the
  harness's own `hellaswag` task processes Rowan/hellaswag (query, choices, gold), with jaxgpt's
  copy of its preprocessing (jaxgpt.hellaswag; tests/test_harness.py checks it against lm_eval's);
- shakespeare_docs: the validation text of Tiny Shakespeare (its last 10%, as nanoGPT splits it)
  in documents of whole speeches, about DOC_CHARS characters each, for loglikelihood_rolling;
- shakespeare_next_docs: speeches of two or more lines: the speaker and first line as the
  prompt, the second line as the target, for generate_until.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = 16  # documents per task
DOC_CHARS = 1000


def _dataset(records):
    import datasets  # (a dependency of lm_eval, which is what calls these functions)

    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(records)})


def hellaswag_docs(**_):
    from jaxgpt.evaluate.hellaswag import harness_preprocess, harness_query

    records = []
    for line in (HERE / "hellaswag_sample.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            doc = json.loads(line)
            records.append({**doc, "query": harness_query(doc),
                            "choices": [harness_preprocess(e) for e in doc["endings"]],
                            "gold": int(doc["label"])})
    return _dataset(records)


def _speeches() -> list[str]:
    from jaxgpt.config import default_data_path

    text = Path(default_data_path()).read_text(encoding="utf-8")
    val = text[int(len(text) * 0.9):]
    return [s.strip("\n") for s in val.split("\n\n")[1:] if s.strip()]  # (the first is cut)


def shakespeare_docs(**_):
    docs, cur = [], ""
    for s in _speeches():
        cur = f"{cur}\n\n{s}" if cur else s
        if len(cur) >= DOC_CHARS:
            docs.append({"text": cur})
            cur = ""
        if len(docs) == DOCS:
            break
    return _dataset(docs)


def shakespeare_next_docs(**_):
    docs = []
    for s in _speeches():
        lines = s.split("\n")
        if len(lines) >= 3 and lines[0].endswith(":") and lines[2].strip():
            docs.append({"prompt": "\n".join(lines[:2]) + "\n", "target": lines[2]})
        if len(docs) == DOCS:
            break
    return _dataset(docs)
