"""jaxgpt's default run vs nanoGPT's train.py on the same recipe, end to end, run in turn.

The recipe is nanoGPT's CPU "baby GPT" (README: char-level Tiny Shakespeare, 4 layers, 4 heads,
128 wide, block 64, batch 12, 2,000 iterations, dropout 0, no torch.compile), which is what
`python -m jaxgpt.train` runs with no flags. Both are timed as a user sees them: the wall time of
the whole command, startup and evaluations included, alternated round by round; the table
prints medians and each run's final val loss.

nanoGPT is not part of jaxgpt: point --nanogpt at a checkout of karpathy/nanoGPT. Its
data/shakespeare_char/prepare.py is run on the Tiny Shakespeare that jaxgpt ships (it downloads
nothing when input.txt is there).

    python experiments/bench_nanogpt.py --nanogpt ~/src/nanoGPT [--rounds 2]
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
               "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def timed(cmd, cwd, env=None) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{cmd[:3]} failed:\n{p.stderr[-3000:]}")
    return wall, p.stdout + p.stderr


def nanogpt(root: Path, out: Path, extra) -> tuple[float, float]:
    wall, log = timed([sys.executable, "train.py", *NANOGPT_CPU, f"--out_dir={out}", *extra], root)
    val = float(re.findall(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", log)[-1])
    return wall, val


def jaxgpt(out: Path, extra) -> tuple[float, float, str]:
    wall, log = timed([sys.executable, "-m", "jaxgpt.train", "--out", str(out), "--no-progress", *extra], REPO)
    done = [l for l in log.splitlines() if l.startswith("done:")][-1]
    return wall, float(re.search(r"val loss ([\d.]+)", done).group(1)), done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", required=True, type=Path, help="a karpathy/nanoGPT checkout")
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds (medians are printed)")
    ap.add_argument("--jaxgpt-args", default="", help="extra flags for python -m jaxgpt.train")
    ap.add_argument("--nanogpt-args", default="", help="extra flags for nanoGPT's train.py")
    args = ap.parse_args()
    root = args.nanogpt.expanduser().resolve()
    data = root / "data" / "shakespeare_char"
    if not (data / "train.bin").is_file():
        shutil.copy(REPO / "jaxgpt" / "assets" / "tinyshakespeare.txt", data / "input.txt")
        subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    walls = {"nanoGPT train.py": [], "jaxgpt": []}
    vals = {k: [] for k in walls}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(walls) if r % 2 == 0 else list(walls)[::-1]
            for name in order:
                out = Path(tmp) / f"{name.split()[0]}-{r}"
                if name == "jaxgpt":
                    wall, val, done = jaxgpt(out, args.jaxgpt_args.split())
                    print(f"round {r}: jaxgpt {wall:.1f} s, {done}", file=sys.stderr)
                else:
                    wall, val = nanogpt(root, out, args.nanogpt_args.split())
                    print(f"round {r}: nanoGPT {wall:.1f} s, val loss {val:.4f}", file=sys.stderr)
                walls[name].append(wall)
                vals[name].append(val)
    ref = statistics.median(walls["nanoGPT train.py"])
    print("| command (same recipe, same machine, run in turn) | wall s (median) | vs nanoGPT | val loss |")
    print("| --- | --: | --: | --- |")
    for name in walls:
        w = statistics.median(walls[name])
        print(f"| {name} | {w:.1f} | {w / ref:.2f}x | {', '.join(f'{v:.4f}' for v in vals[name])} |")


if __name__ == "__main__":
    main()
