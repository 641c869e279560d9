"""LoRA: low-rank adapters on chosen Linear layers, frozen base weights, save/load/merge of adapters.

    y = x @ W + b + (alpha / r) * (x @ A) @ B        A: [in, r] ~ N(0, 1/in), B: [r, out] = 0

so before training the adapted model computes exactly what the base does. A and B are
`nnx.LoRAParam`s: the optimizer is built with `wrt=nnx.LoRAParam` and holds state for them only,
while every base `nnx.Param` stays bit-identical. `merge` folds (alpha/r) * A @ B into W and
gives back a plain GPT, with the same parameter tree as the base.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxgpt.formats import checkpoint
from jaxgpt.config import ConfigError
from jaxgpt import files
from jaxgpt.files import atomic_write
from jaxgpt.formats.shapes import check_tensors, layer_indices
from jaxgpt.files import writing

ADAPTER_META = "adapter.json"
ALL_TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")


class LoRALinear(nnx.Module):
    """A frozen nnx.Linear plus a trainable low-rank update (alpha / rank) * A @ B."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        d_in, d_out = base.kernel.shape
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.lora_a = nnx.LoRAParam(jax.random.normal(rngs.params(), (d_in, rank)) / np.sqrt(d_in))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, d_out)))  # zero: starts as the base model

    def __call__(self, x):  # x: [N, in]
        delta = (x @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype)  # [N, out]
        return self.base(x) + (self.alpha / self.rank) * delta

    def merged_kernel(self) -> jax.Array:
        """W + (alpha / r) * A @ B, float32 [in, out]."""
        return self.base.kernel[...] + (self.alpha / self.rank) * (self.lora_a[...] @ self.lora_b[...])


def _linears(model) -> list[tuple[str, nnx.Module, str]]:
    """(dotted path, parent module, attribute) of every Linear (plain or LoRA) in the model."""
    found = []
    for path, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and not isinstance(module, LoRALinear):
            for name, child in vars(module).items():
                if isinstance(child, (nnx.Linear, LoRALinear)):
                    prefix = ".".join(map(str, path))
                    found.append((f"{prefix}.{name}" if prefix else name, module, name))
    return sorted(set(found), key=lambda t: t[0])


def parse_targets(spec: str | list[str]) -> list[str]:
    targets = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if not targets:
        raise ConfigError("--lora-targets is empty; name layers such as c_attn,c_proj,c_fc")
    return targets


def matches(path: str, target: str) -> bool:
    """`c_proj` matches h.3.attn.c_proj and h.3.mlp.c_proj; `attn.c_proj` only the first."""
    return path == target or path.endswith("." + target)


def apply_lora(model, rank: int, alpha: float, targets, seed: int = 0) -> list[str]:
    """Replace every Linear whose path matches a target by a LoRALinear, in place.

    Returns the adapted paths. ConfigError for a bad rank or a target that matches nothing.
    """
    targets = parse_targets(targets)
    if model.config.quant:
        raise ConfigError("LoRA needs float weights; this model is int8-quantized")
    if rank < 1:
        raise ConfigError(f"--lora-rank must be >= 1, got {rank}")
    linears = _linears(model)
    for t in targets:
        if not any(matches(p, t) for p, _, _ in linears):
            names = sorted({p.split(".", 2)[-1] for p, _, _ in linears})
            raise ConfigError(f"LoRA target {t!r} matches no layer; layers are: {', '.join(names)}")
    rngs = nnx.Rngs(params=seed)
    adapted = []
    for path, parent, attr in linears:
        if not any(matches(path, t) for t in targets):
            continue
        base = getattr(parent, attr)
        d_in, d_out = base.kernel.shape
        if rank > min(d_in, d_out):
            raise ConfigError(f"--lora-rank {rank} is larger than layer {path} allows "
                              f"(min(in, out) = {min(d_in, d_out)})")
        setattr(parent, attr, LoRALinear(base, rank, alpha, rngs=rngs))
        adapted.append(path)
    return adapted


def merge(model):
    """A plain GPT (no LoRA modules) with every adapter folded into its base kernel. The input
    model is left unchanged."""
    model = nnx.clone(model)
    for _, parent, attr in _linears(model):
        layer = getattr(parent, attr)
        if isinstance(layer, LoRALinear):
            layer.base.kernel[...] = layer.merged_kernel()
            setattr(parent, attr, layer.base)
    return model


def count(model) -> tuple[int, int]:
    """(trainable LoRA params, all params including the frozen base)."""
    lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return lora, total


# ---- adapter files -----------------------------------------------------------------------------
def write_adapter(folder: str | Path, model, meta: dict) -> Path:
    """Write only the LoRA params (A, B) and `meta` (base, rank, alpha, targets, ...) into
    `folder` (which may hold other files, e.g. an SFT run's checkpoints): the arrays under a
    temporary name renamed into place, then adapter.json, which marks a complete adapter."""
    folder = Path(folder).resolve()
    tmp = folder / ".lora.tmp"
    with writing(folder / "lora"):  # a full disk: one line (jaxgpt.files), the old arrays kept
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(tmp, nnx.state(model, nnx.LoRAParam))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(folder / "lora", ignore_errors=True)
        os.replace(tmp, folder / "lora")
    atomic_write(folder / ADAPTER_META, json.dumps(meta, indent=2).encode())
    return folder


def save_adapter(out: str | Path, model, meta: dict, force: bool = False) -> Path:
    """An adapter folder of its own at `out`, written atomically (refused if `out` is not empty,
    unless `force`)."""
    with files.atomic_dir(out, force) as tmp:
        write_adapter(tmp, model, meta)
    return Path(out)


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_META).is_file()


SHAPE_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd")  # the base shape an adapter fits
# adapter.json's keys: what each must be (a check on the value, and the words for the error)
_META_KEYS = {
    "base": (lambda v: isinstance(v, str) and v != "", "a model path or name"),
    "rank": (lambda v: _int(v) and v >= 1, "a positive integer"),
    "alpha": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < float("inf"),
              "a finite number"),
    "targets": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v)),
                "a list of layer names"),
    "model_config": (lambda v: isinstance(v, dict) and all(_int(v.get(k)) for k in SHAPE_KEYS),
                     f"an object with integer {', '.join(SHAPE_KEYS)}"),
}


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_adapter_meta(path: str | Path) -> dict:
    """adapter.json, every key checked for presence and type (one-line ConfigError)."""
    try:
        meta = json.loads((Path(path) / ADAPTER_META).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not a readable LoRA adapter ({type(e).__name__}: "
                          f"{str(e)[:160]})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}/{ADAPTER_META}: expected a JSON object")
    for k, (ok, what) in _META_KEYS.items():
        if k not in meta:
            raise ConfigError(f"{path}/{ADAPTER_META}: missing {k!r}")
        if not ok(meta[k]):
            raise ConfigError(f"{path}/{ADAPTER_META}: {k} must be {what}, got {json.dumps(meta[k])[:80]}")
    return meta


def load_adapter(path: str | Path, base_model) -> None:
    """Add the adapter at `path` to `base_model` in place (apply_lora + restore A, B).

    ConfigError if the base has another shape than the one the adapter was trained on."""
    meta = read_adapter_meta(path)
    want, have = meta["model_config"], base_model.config.to_dict()
    if any(want[k] != have[k] for k in SHAPE_KEYS):
        shape = lambda d: " ".join(f"{k}={d[k]}" for k in SHAPE_KEYS)
        raise ConfigError(f"adapter {path} was trained on a base with {shape(want)}, "
                          f"but this base has {shape(have)}")
    apply_lora(base_model, meta["rank"], meta["alpha"], meta["targets"])
    state = nnx.state(base_model, nnx.LoRAParam)
    saved = checkpoint.saved_shapes(Path(path) / "lora")
    if saved is not None:  # (unreadable metadata: the restore below names the damage)
        expected = checkpoint.state_shapes(state)
        check_tensors(len(layer_indices(expected)), saved, expected, f"adapter {path}",
                      f"{ADAPTER_META} (rank {meta['rank']}, targets {meta['targets']})")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(Path(path).resolve() / "lora", abstract)
    except Exception as e:
        raise ConfigError(f"adapter {path} is corrupt or does not match: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    nnx.update(base_model, restored)


# ---- many adapters in one batch (jaxgpt.decode.engine.Engine, the server) ----------------------------
class MultiLoRALinear(nnx.Module):
    """A layer (nnx.Linear, its decode copy RowLinear, or Int8Linear) plus the low-rank updates of
    several adapters, one chosen per row:  y[i] = base(x)[i] + (x[i] @ A_k) @ B_k  for row i's
    adapter k (0: none, the base alone).

    The adapters are stored concatenated, A [in, n*r] and B [n*r, out] (adapter k in block k-1,
    zero-padded to the largest rank r, alpha/r folded into B), so a batch costs the base matmul
    once plus two thin matmuls, and a row's unselected blocks are masked to exact zeros: a base
    row computes exactly what the base does. The rows' adapter ids (int [N], one per row of x)
    are set with `set_adapter_rows` before the call, inside the jitted function.
    """

    def __init__(self, base, a_cat: jax.Array, b_cat: jax.Array, rank: int):
        self.base = base
        self.lora_a = nnx.Param(a_cat)  # [in, n*r]
        self.lora_b = nnx.Param(b_cat)  # [n*r, out]
        self.rank = int(rank)
        self.rows = None

    def __call__(self, x):  # x: [N, in]
        y = self.base(x)
        if self.rows is None:
            return y
        a, b = self.lora_a[...], self.lora_b[...]
        n = a.shape[1] // self.rank
        h = x.astype(a.dtype) @ a  # [N, n*r]
        block = jnp.repeat(jnp.arange(1, n + 1), self.rank)  # [n*r] the adapter of each column
        h = jnp.where(self.rows[:, None] == block[None, :], h, 0.0)
        return y + (h @ b).astype(y.dtype)


def adapter_weights(path: str | Path, base_model) -> dict[str, tuple[jax.Array, jax.Array]]:
    """The adapter at `path` as {layer path: (A [in, r], B [r, out] * alpha / r)}, restored onto
    a twin of the float `base_model` (its arrays are shared, not copied; the base is unchanged).
    ConfigError if the adapter does not fit the base."""
    twin = nnx.merge(*nnx.split(base_model))  # new module objects over the same arrays
    load_adapter(path, twin)
    out = {}
    for p, parent, attr in _linears(twin):
        layer = getattr(parent, attr)
        if isinstance(layer, LoRALinear):
            out[p] = (layer.lora_a[...], layer.lora_b[...] * (layer.alpha / layer.rank))
    return out


def attach_adapters(model, adapters) -> int:
    """Wrap every layer that some adapter updates in a MultiLoRALinear, in place; `adapters` is
    a list of `adapter_weights` results (adapter k = adapters[k-1]). Returns how many layers."""
    paths = sorted({p for a in adapters for p in a})
    for path in paths:
        *parents, attr = path.split(".")
        parent = model
        for name in parents:
            parent = parent[int(name)] if name.isdigit() else getattr(parent, name)
        base = getattr(parent, attr)
        shapes = [a[path] for a in adapters if path in a]
        d_in, d_out = shapes[0][0].shape[0], shapes[0][1].shape[1]
        r = max(a.shape[1] for a, _ in shapes)
        a_cat = np.zeros((d_in, len(adapters) * r), np.float32)
        b_cat = np.zeros((len(adapters) * r, d_out), np.float32)
        for k, ad in enumerate(adapters):
            if path in ad:
                a, b = (np.asarray(w, np.float32) for w in ad[path])
                a_cat[:, k * r:k * r + a.shape[1]] = a
                b_cat[k * r:k * r + a.shape[1]] = b
        setattr(parent, attr, MultiLoRALinear(base, jnp.asarray(a_cat), jnp.asarray(b_cat), r))
    return len(paths)


def set_adapter_rows(model, rows: jax.Array) -> None:
    """Tell every MultiLoRALinear of `model` which adapter each row of its input uses (int [N])."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, MultiLoRALinear):
            module.rows = rows
