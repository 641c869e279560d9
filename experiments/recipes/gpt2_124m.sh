#!/usr/bin/env bash
# GPT-2 124M with nanoGPT's / llm.c's settings (experiments/recipes/gpt2_124m.md).
#   DATA=data/edu_fineweb10B HELLASWAG=hellaswag_val.jsonl GRAD_ACCUM=32 bash experiments/recipes/gpt2_124m.sh
# SCALED_DOWN=1: the same pipeline shrunk to run end to end on a laptop CPU in a few minutes
# (a jsonl corpus cut from Tiny Shakespeare, a 4-layer model, a made-up HellaSwag file).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out_gpt2_124m}
EXTRA=${EXTRA:-}
if [ "${SCALED_DOWN:-0}" = 1 ]; then
  WORK=${WORK:-$(mktemp -d)}
  python - "$WORK" <<'PY'
import json, sys
from pathlib import Path
from jaxgpt.config import default_data_path
work = Path(sys.argv[1]); (work / "corpus").mkdir(parents=True, exist_ok=True)
paras = [p for p in Path(default_data_path()).read_text().split("\n\n") if p.strip()]
for k in range(4):  # four jsonl files, one paragraph per record
    (work / "corpus" / f"part{k}.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[k::4]))
# a small file in HellaSwag's official format (4 endings, one right), from the same text
lines = [l for l in Path(default_data_path()).read_text().splitlines() if len(l) > 40]
rows = []
for i in range(40):
    ctx, right = lines[4 * i], lines[4 * i + 1]
    wrong = [lines[(4 * i + 97 * j) % len(lines)] for j in (1, 2, 3)]
    label = i % 4
    endings = wrong[:label] + [right] + wrong[label:]
    rows.append({"ind": i, "activity_label": "Shakespeare", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                 "endings": endings, "label": label, "split": "val", "source_id": f"tiny~{i}"})
(work / "hellaswag_tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
PY
  python -m jaxgpt.prepare "$WORK/corpus/*.jsonl" --out "$WORK/shards" --shard-tokens 100K --val-tokens 32K --workers 2
  DATA="$WORK/shards"; HELLASWAG="$WORK/hellaswag_tiny.jsonl"
  python -m jaxgpt.train --data "$DATA" --out "$OUT" --n-layer 4 --n-head 4 --n-embd 128 --block-size 128 \
    --batch-size 16 --grad-accum 2 --lr 3e-3 --warmup-iters 30 --min-lr 3e-4 --max-iters 300 \
    --beta1 0.9 --beta2 0.95 --weight-decay 0.1 --grad-clip 1.0 --val-tokens 32768 --eval-interval 100 \
    --hellaswag "$HELLASWAG" --hellaswag-interval 100 --ckpt-interval 100 --sample-tokens 100 $EXTRA
  python -m jaxgpt.eval "$OUT" --task hellaswag --data "$HELLASWAG"
  exit 0
fi
: "${DATA:?set DATA to a prepared folder (python -m jaxgpt.prepare) or a glob of llm.c shards}"
: "${HELLASWAG:?set HELLASWAG to hellaswag_val.jsonl}"
python -m jaxgpt.train --data "$DATA" --out "$OUT" --preset gpt2 \
  --batch-size 512 --block-size 1024 --grad-accum "${GRAD_ACCUM:-32}" \
  --lr 6e-4 --min-lr 6e-5 --warmup-iters 700 --max-iters 19073 \
  --beta1 0.9 --beta2 0.95 --weight-decay 0.1 --grad-clip 1.0 \
  --val-tokens 10485760 --eval-interval 250 --hellaswag "$HELLASWAG" --hellaswag-interval 250 \
  --ckpt-interval 1000 --keep-checkpoints 2 --sample-tokens 64 $EXTRA
