"""Inter-layer expert affinity of a trained MoE LM (ExFlow, Yao et al. 2024).

    python -m atoll.experiments.moe_affinity --workdir=runs/moe [--step=latest] [--windows=64] [--out=DIR]

Runs the run's checkpointed model (island runs: island 0's outer params) on
validation windows of its corpus, records every token's experts at each
token-choice MoE layer, and writes into --out (default WORKDIR/analysis):

    affinity.json  A [L_moe - 1, E, E] and a summary per adjacent layer pair
    affinity.png   one heatmap per adjacent pair

A[l, i, j] = P(expert j at MoE layer l+1 | expert i at MoE layer l), counted
over every (choice at l, choice at l+1) pair of a token (K² pairs per token
with top-k routing) and normalized per row. A row of an expert no token chose
at layer l is all zeros (there is nothing to condition on).

With K > 1 every row is capped at 1/K: a token's K choices at l+1 share the
row of each of its choices at l. The summary therefore also reports the same
figures from each token's first (highest-scored) choice only, whose ceiling
is 1. Reference points: 1/E (uniform independent routing) and, per pair, the
largest load at l+1 (independent routing with the measured loads); the
mutual information of independent routing is 0 plus the plug-in estimator's
bias, which `shuffled_mutual_information_bits` measures (layer l+1's routes
matched to other tokens).

Expert-choice layers are refused: there each expert picks its tokens, so a
token has 0..E experts and no per-token route to follow.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util

from atoll.core import moe
from atoll.core.transformer import Transformer, TransformerConfig
from atoll.data import text
from atoll.parallel import checkpoint


class AffinityError(ValueError):
    """A model, run or recording that has no inter-layer affinity to measure."""


# ------------------------------------------------------------------ routes


def _routes_LGSK(recorded: dict) -> np.ndarray:
    """[L_moe, G, S, K] from the moe_routes collection, layers in depth order
    (scanned stacks and unscanned blocks alike: moe.stack_by_depth)."""
    routes = recorded.get(moe.ROUTES, recorded)
    flat = traverse_util.flatten_dict(dict(routes)) if routes else {}
    if not flat:
        raise AffinityError("no MoE routes were recorded: the model has no MoE layer, or was applied without "
                            f"mutable=[{moe.ROUTES!r}]")
    if any(path[-1] == "expert_tokens" for path in flat):
        raise AffinityError("expert-choice MoE layers (router='expert_choice') route per expert: a token reaches "
                            "0..E experts, so there is no per-token route to compare across layers; inter-layer "
                            "affinity needs a token-choice router (softmax_topk or topk_softmax)")
    return np.asarray(moe.stack_by_depth(routes, "experts"))


def routes_by_layer(recorded: dict) -> np.ndarray:
    """routes_LNK: each token's top-k experts at every token-choice MoE layer,
    in depth order (N = G·S tokens, sequence-major). `recorded` is what
    `model.apply(..., mutable=[moe.ROUTES])` returned, or its moe_routes entry."""
    r = _routes_LGSK(recorded)
    return r.reshape(r.shape[0], -1, r.shape[-1])


# ------------------------------------------------------------------ affinity


def _checked(routes_LNK: np.ndarray, num_experts: int) -> np.ndarray:
    routes_LNK = np.asarray(routes_LNK)
    if routes_LNK.ndim != 3:
        raise AffinityError(f"routes must be [layers, tokens, k]; got shape {list(routes_LNK.shape)}")
    if routes_LNK.shape[0] < 2:
        raise AffinityError(f"affinity compares adjacent MoE layers; {routes_LNK.shape[0]} MoE layer(s) given")
    if routes_LNK.size and (routes_LNK.min() < 0 or routes_LNK.max() >= num_experts):
        raise AffinityError(f"routes hold experts outside [0, {num_experts})")
    return routes_LNK


def pair_counts(routes_LNK: np.ndarray, num_experts: int) -> np.ndarray:
    """counts_PEE [L-1, E, E]: how often a token chose i at layer l and j at l+1 (every pair of choices)."""
    routes_LNK = _checked(routes_LNK, num_experts)
    E = num_experts
    r_LNK = routes_LNK.astype(np.int64)
    # One cell index per (choice at l, choice at l+1) of each token: N·K² of them, not an [N, E] one-hot.
    return np.stack([np.bincount((r_LNK[l][:, :, None] * E + r_LNK[l + 1][:, None, :]).ravel(),
                                 minlength=E * E).reshape(E, E) for l in range(len(r_LNK) - 1)])


def _normalize_rows(counts_PEE: np.ndarray) -> np.ndarray:
    rows = counts_PEE.sum(-1, keepdims=True)
    return np.divide(counts_PEE, rows, out=np.zeros(counts_PEE.shape, np.float64), where=rows > 0)


def expert_affinity(routes_LNK: np.ndarray, num_experts: int) -> np.ndarray:
    """A [L-1, E, E]: A[l, i, j] = P(expert j at layer l+1 | expert i at layer l),
    over every (choice at l, choice at l+1) pair of a token. Rows of experts
    never chosen at layer l are zeros; every other row sums to 1."""
    return _normalize_rows(pair_counts(routes_LNK, num_experts))


def _mutual_information_bits(counts_EE: np.ndarray) -> float:
    joint = counts_EE / max(counts_EE.sum(), 1)
    p_i, q_j = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log2(joint[nz] / (p_i * q_j)[nz])))


def _mean_max_prob(counts_EE: np.ndarray) -> float:
    """max_j P(j | i), averaged over i weighted by how often i was chosen: the
    share of pairs that the single likeliest successor of their expert predicts."""
    return float(counts_EE.max(-1).sum() / max(counts_EE.sum(), 1))


def _pair_figures(routes_NK: np.ndarray, next_NK: np.ndarray, num_experts: int, perm_N: np.ndarray) -> dict:
    """The figures of one adjacent pair; `perm_N` matches layer l+1's routes to other tokens."""
    counts = pair_counts(np.stack([routes_NK, next_NK]), num_experts)[0]
    shuffled = pair_counts(np.stack([routes_NK, next_NK[perm_N]]), num_experts)[0]
    load_E = counts.sum(0) / max(counts.sum(), 1)  # layer l+1's share of the choices
    return {"mean_max_prob": _mean_max_prob(counts), "independent_max_prob": float(load_E.max()),
            "mutual_information_bits": _mutual_information_bits(counts),
            "shuffled_mutual_information_bits": _mutual_information_bits(shuffled)}


def affinity_summary(routes_LNK: np.ndarray, num_experts: int, layers: list[int] | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Scalar figures per adjacent layer pair, and their means over pairs:

      mean_max_prob                     max_j P(j | i), averaged over i weighted by i's use
      independent_max_prob              the same if l+1 ignored l: layer l+1's largest load
      mutual_information_bits           I(expert at l; expert at l+1) of the pair counts
      shuffled_mutual_information_bits  the same with l+1's routes matched to other tokens:
                                        the estimator's floor for independent routing
      first_choice_*                    (k > 1) the same from each token's first choice only

    `layers` names the MoE layers (e.g. block indices); default 0..L-1."""
    routes_LNK = _checked(routes_LNK, num_experts)
    L, N, K = routes_LNK.shape
    E = num_experts
    layers = list(range(L)) if layers is None else [int(i) for i in layers]
    rng = np.random.default_rng(seed)
    pairs = []
    for p in range(L - 1):
        perm_N = rng.permutation(N)
        row = {"layers": [layers[p], layers[p + 1]],
               **_pair_figures(routes_LNK[p], routes_LNK[p + 1], E, perm_N)}
        if K > 1:
            first = _pair_figures(routes_LNK[p, :, :1], routes_LNK[p + 1, :, :1], E, perm_N)
            row.update({f"first_choice_{k}": v for k, v in first.items()})
        pairs.append(row)
    keys = [k for k in pairs[0] if k != "layers"]
    return {"num_experts": E, "top_k": K, "tokens": N, "moe_layers": layers, "uniform_prob": 1.0 / E,
            "max_prob_ceiling": 1.0 / K, "pairs": pairs,
            "mean": {k: float(np.mean([row[k] for row in pairs])) for k in keys}}


# ------------------------------------------------------------------ from a model


def moe_layers(cfg: TransformerConfig) -> list[int]:
    """Block indices of the MoE layers, in depth order."""
    return cfg.moe_blocks()


def check_model(cfg: TransformerConfig) -> list[int]:
    """The MoE block indices, or a clear AffinityError for a model without affinity to measure."""
    layers = moe_layers(cfg)
    if not layers:
        raise AffinityError(f"the model has no MoE layers (model.moe.num_experts = {cfg.moe.num_experts}, "
                            f"moe.every = {cfg.moe.every}, num_layers = {cfg.num_layers}); expert affinity "
                            "needs an MoE model")
    if len(layers) < 2:
        raise AffinityError(f"the model has {len(layers)} MoE layer (block {layers[0]}); inter-layer affinity "
                            "needs at least 2")
    if cfg.moe.router == "expert_choice":
        raise AffinityError("model.moe.router = 'expert_choice' routes per expert (a token reaches 0..E experts), "
                            "so there is no per-token route to compare across layers; inter-layer affinity needs "
                            "a token-choice router (softmax_topk or topk_softmax)")
    return layers


@functools.lru_cache(maxsize=8)
def _recorder(cfg: TransformerConfig):
    """(params, tokens_BT) -> the moe_routes collection; one jitted function per
    model config, so repeated calls reuse its compilations."""
    model = Transformer(cfg)
    return jax.jit(lambda p, t_BT: model.apply({"params": p}, t_BT, mutable=[moe.ROUTES])[1])


def routes_from_params(model_config: TransformerConfig | dict, params, tokens_BT: np.ndarray, *,
                       batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """routes_LNK of the model on `tokens_BT` (N = B·T, row-major), in batches of
    `batch_size` sequences (the last one padded, so one program serves all)."""
    cfg = model_config if isinstance(model_config, TransformerConfig) else TransformerConfig.from_dict(model_config)
    check_model(cfg)
    record = _recorder(cfg)
    params = nn.meta.unbox(params)  # straight from model.init, or plain arrays from a checkpoint
    tokens_BT = np.asarray(tokens_BT, np.int32)
    B = len(tokens_BT)
    if B == 0:
        raise AffinityError("no token sequences given")
    batch = min(batch_size, B)

    from tqdm.auto import tqdm

    chunks = []
    for i in tqdm(range(0, B, batch), desc="routing", unit="batch", disable=not progress, leave=False):
        t_BT = tokens_BT[i: i + batch]
        n = len(t_BT)
        if n < batch:  # each sequence routes on its own (one routing group), so padding changes nothing else
            t_BT = np.concatenate([t_BT, np.zeros((batch - n, t_BT.shape[1]), np.int32)])
        chunks.append(_routes_LGSK(record(params, t_BT))[:, :n])
    r = np.concatenate(chunks, axis=1)
    return r.reshape(r.shape[0], -1, r.shape[-1])


def affinity_from_params(model_config: TransformerConfig | dict, params, tokens_BT: np.ndarray, *,
                         batch_size: int = 16, progress: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """(A [L_moe - 1, E, E], summary) of the model with `params` on `tokens_BT`.
    The summary names the MoE layers by block index."""
    cfg = model_config if isinstance(model_config, TransformerConfig) else TransformerConfig.from_dict(model_config)
    routes_LNK = routes_from_params(cfg, params, tokens_BT, batch_size=batch_size, progress=progress)
    E = cfg.moe.num_experts
    return expert_affinity(routes_LNK, E), affinity_summary(routes_LNK, E, layers=moe_layers(cfg))


# ------------------------------------------------------------------ plot


def plot_affinity(affinity_PEE: np.ndarray, path: str | Path, layers: list[int] | None = None,
                  title: str | None = None) -> Path:
    """One heatmap per adjacent MoE-layer pair (rows: expert at l, columns:
    expert at l+1, colour: P(column | row)), one colour scale for all;
    `layers` names the MoE layers."""
    from atoll.experiments import outputs
    from atoll.experiments.reproduce.runs import save_figure

    affinity_PEE = np.asarray(affinity_PEE)
    P, E, _ = affinity_PEE.shape
    layers = list(range(P + 1)) if layers is None else list(layers)
    cols = min(P, 4)
    rows = math.ceil(P / cols)
    fig, axes = outputs.subplots(rows, cols, figsize=(3.2 * cols + 0.8, 3.0 * rows), squeeze=False)
    vmax = max(float(affinity_PEE.max()), 1e-9)
    for p, ax in enumerate(axes.flat):
        if p >= P:
            ax.axis("off")
            continue
        im = ax.imshow(affinity_PEE[p], vmin=0.0, vmax=vmax, cmap="viridis", interpolation="nearest")
        if E <= 8:
            for i in range(E):
                for j in range(E):
                    v = affinity_PEE[p, i, j]
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 * vmax else "white")
        ax.set_title(f"MoE layer {layers[p]} → {layers[p + 1]}", fontsize=9)
        ax.set_xlabel(f"expert at layer {layers[p + 1]}", fontsize=8)
        ax.set_ylabel(f"expert at layer {layers[p]}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)  # one per panel (same scale): tight_layout places it
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, Path(path))


# ------------------------------------------------------------------ a run's checkpoint


def _checkpoint_step(directory: Path, step: str | int) -> int:
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").exists()) \
        if directory.is_dir() else []
    if not steps:
        raise checkpoint.CheckpointError(f"no checkpoint in {directory}: train the run first (train_lm saves at "
                                         "config.train.checkpoint_every and at the end)")
    if str(step) == "latest":
        return steps[-1]
    try:
        wanted = int(step)
    except ValueError:
        raise AffinityError(f"--step={step!r}: give a step number or 'latest'") from None
    if wanted not in steps:
        raise checkpoint.CheckpointError(f"no checkpoint at step {wanted} in {directory}; saved steps: {steps}")
    return wanted


def _params_of(state: dict) -> Any:
    """The model's params: island 0's outer params for island runs, else the params."""
    if "outer" in state and "params" in state["outer"]:
        return jax.tree.map(lambda x: x[0], state["outer"]["params"])
    return state["params"]


def run(workdir: str | Path, *, step: str | int = "latest", windows: int = 64, out: str | Path | None = None,
        batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
    """The CLI's work: writes affinity.json and affinity.png into `out`
    (default WORKDIR/analysis) and returns what affinity.json holds."""
    workdir = Path(workdir).absolute()
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise AffinityError(f"{config_path} does not exist: --workdir must be a train_lm run directory")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    cfg = TransformerConfig.from_dict(config.model)
    # The backends the run named may not exist here (cudnn attention on a CPU);
    # routing is read off the same math whichever kernel computes it.
    cfg = dataclasses.replace(cfg, attention_impl=None, moe=dataclasses.replace(cfg.moe, grouped_matmul_impl=None))
    layers = check_model(cfg)
    if windows < 1:
        raise AffinityError(f"--windows={windows}: give at least 1")
    ckpt_dir = workdir / "checkpoints"
    at = _checkpoint_step(ckpt_dir, step)
    params = _params_of(checkpoint.read_on_host(ckpt_dir, at))

    d = config.data
    corpus = text.load_corpus(d.path, glob=d.glob, val_fraction=d.val_fraction, cache_dir=d.cache_dir,
                              progress=progress)
    tokens_BT = text.eval_windows(corpus.val, num_windows=windows, seq_len=d.seq_len)[:, :-1]
    affinity, summary = affinity_from_params(cfg, params, tokens_BT, batch_size=batch_size, progress=progress)

    out = workdir / "analysis" if out is None else Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    result = {"workdir": str(workdir), "step": at, "windows": windows, "seq_len": int(d.seq_len),
              "data": corpus.source, "router": cfg.moe.router, **summary, "affinity": affinity.tolist()}
    (out / "affinity.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_affinity(affinity, out / "affinity.png", layers,
                  title=f"{workdir.name} step {at}: P(expert at next MoE layer | expert), {summary['tokens']} tokens")
    return result


def _report(result: dict, out: Path) -> str:
    lines = [f"expert affinity of {result['workdir']} at step {result['step']} over {result['tokens']} tokens "
             f"(E = {result['num_experts']}, k = {result['top_k']}; uniform 1/E = {result['uniform_prob']:.3f})"]
    for row in result["pairs"]:
        a, b = row["layers"]
        lines.append(f"  layer {a:>3} → {b:<3} mean max P {row['mean_max_prob']:.3f} "
                     f"(independent {row['independent_max_prob']:.3f})  MI {row['mutual_information_bits']:.3f} bits "
                     f"(shuffled {row['shuffled_mutual_information_bits']:.3f})")
    lines.append(f"outputs in {out}: affinity.json affinity.png")
    return "\n".join(lines)


def main(argv) -> None:
    from absl import logging

    from atoll.parallel import runtime

    del argv
    runtime.apply_xla_defaults()
    logging.set_verbosity(logging.ERROR)  # orbax warns about metadata files it does without
    if not _FLAGS["workdir"].value:
        sys.exit("error: --workdir is required")
    out = Path(_FLAGS["out"].value or Path(_FLAGS["workdir"].value) / "analysis").absolute()
    try:
        result = run(_FLAGS["workdir"].value, step=_FLAGS["step"].value, windows=_FLAGS["windows"].value, out=out,
                     batch_size=_FLAGS["batch_size"].value)
    except (AffinityError, checkpoint.CheckpointError, text.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(_report(result, out))


_FLAGS: dict = {}


def _define_flags() -> None:
    """Only when run as a script: train_lm and the reproductions define --workdir
    and --out too, and absl refuses a flag defined twice in one process."""
    from absl import flags

    _FLAGS.update(
        workdir=flags.DEFINE_string("workdir", None, "A train_lm run directory (config.json, checkpoints/)."),
        step=flags.DEFINE_string("step", "latest", "Checkpoint step, or 'latest'."),
        windows=flags.DEFINE_integer("windows", 64, "Validation windows (of config.data.seq_len tokens) to route."),
        out=flags.DEFINE_string("out", None, "Output directory (default WORKDIR/analysis)."),
        batch_size=flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass."),
    )


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
