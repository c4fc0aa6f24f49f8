"""Decoder-only LM on the embedded corpus (byte-level Python source).

Variants, chosen by the argument after the colon:

  tiny      What it shows: a small LM learns real text on a laptop CPU.
            Expected: validation bits/byte falls from 8 to about 2.5 in ~3-4
            minutes on a 2-core CPU; the unigram bar is ~4.6 bits/byte (Python
            3.11 stdlib). Hardware: any CPU.
            python -m atoll.experiments.train_lm --config=atoll/configs/lm.py:tiny --workdir=runs/tiny
  small     ~25M params, seq 512, for a few minutes on one GPU (or an hour on CPU).
            python -m atoll.experiments.train_lm --config=atoll/configs/lm.py:small --workdir=runs/small
  gpu_350m  ~350M params, seq 2048, bf16 compute, for one H100; the model the
            lm_step benchmark measures (MFU recorded in docs/BENCHMARKS.md).
            python -m atoll.experiments.bench.lm_step --config=atoll/configs/lm.py:gpu_350m
            python -m atoll.experiments.train_lm --config=atoll/configs/lm.py:gpu_350m --workdir=runs/350m
  long      What it shows: context parallelism. Each 2048-byte sequence is split
            over mesh.context = 4 devices (zig-zag layout: device d holds chunks
            d and 7-d of 8, so causal work is even), the batch over data = 2, and
            attention runs as config.model.context_parallel = ring (K/V travel
            around the ring; all_gather | tokenring are the other strategies,
            parallel/context.py; None leaves plain attention to XLA). Small model
            (d 64, 2 layers, 4 query / 2 kv heads of 16), 60 steps. Expected:
            validation ~4.0 bits/byte (under the ~4.6 unigram bar) in ~3-4 minutes
            on a 2-core CPU; summary.json's context_bytes_per_device_per_layer
            gives ring's 1.5 MiB forward + 3.5 MiB backward per device, layer and
            step. Hardware: 8 CPU host devices (the command asks for them).
            python -m atoll.experiments.train_lm --config=atoll/configs/lm.py:long --workdir=runs/long \
                [--config.model.context_parallel=tokenring]

Low-communication training (islands). `outer.method` picks the outer loop,
`mesh.island` the number of islands M; train.batch_size stays the global
batch (each island gets batch_size / M), so every method sees the same tokens.

  ddp               gradients all-reduced across islands every step (the baseline)
  diloco            DiLoCo: outer SGD, Nesterov, lr 0.7, momentum 0.9, every H steps
  fedavg            parameter averaging every H steps (outer lr 1, no momentum)
  streaming_diloco  P fragments on staggered steps, τ-step delayed application,
                    α-mixing, quantized exchange (fp32 | bf16 | int8 | fp4 = E3M0)
  noloco            no all-reduce: pairs of islands gossip (shared-seed matching)
  co2               one-round-delayed outer step against the current outer params
                    (fairscale-CO2: gap penalty λ, elementwise momentum clip)
  async_diloco      one-round-delayed Δ applied as it was (PCCL's async DiLoCo)
  edit              EDiT's pseudo-gradient penalty (anomalies, norm weights, clip)
  sparseloco        chunked top-k of an error-feedback buffer, 2-bit values

  python -m atoll.experiments.train_lm --config=atoll/configs/lm.py:tiny --workdir=runs/diloco \
      --config.mesh.island=4 --config.outer.method=diloco --config.outer.H=30
  Expected on a 2-core CPU (M=4, 400 steps): final val loss within a few % of
  --config.outer.method=ddp while exchanging 30x fewer bytes (summary.json:
  bytes_per_island, ddp_bytes_per_island). The side-by-side study is
  python -m atoll.experiments.reproduce.low_communication --preset=ci --out=runs/lowcomm

Islands of different speeds (diloco, fedavg): outer.speeds (relative step
rates, one per island) or outer.step_seconds (measured), and
outer.heterogeneity = wait_for_slowest (every island H steps a round) |
heterogeneous (a round is H steps of the fastest island; the others take the
steps that fit, and the outer mean weights them by tokens).
  python -m atoll.experiments.train_lm --config=atoll/configs/lm.py:tiny --workdir=runs/het \
      --config.mesh.island=4 --config.outer.method=diloco --config.outer.speeds="(1, 1, 0.5, 0.25)" \
      --config.outer.heterogeneity=heterogeneous
  The study in simulated wall-clock:
  python -m atoll.experiments.reproduce.heterogeneous_islands --preset=ci --out=runs/hetero

Mixture of experts (config.model.moe; core/moe.py): num_experts > 0 turns the
FFN of every moe.every-th block into an MoE layer. Routers softmax_topk |
topk_softmax | expert_choice; dispatch capacity | dropless; Switch,
per-sequence and z losses with weights; bias_rate for DeepSeek-V3's
aux-loss-free balancing; mesh.expert shards the experts (all-to-all).
  python -m atoll.experiments.train_lm --config=atoll/configs/lm.py:tiny --workdir=runs/moe \
      --config.model.moe.num_experts=8 --config.model.moe.top_k=2 --config.model.moe.expert_mlp_dim=192
  (8 experts of width 192, two per token: the tiny model's active FFN width,
  384, with 4x its FFN parameters.) Routing metrics per MoE layer go to
  metrics.jsonl (moe/L<i>/...); the study is
  python -m atoll.experiments.reproduce.moe_routing --preset=ci --out=runs/moe_routing

Any field can be overridden: --config.model.num_layers=8 --config.mesh.fsdp=2.
Mesh axes (mesh.*) multiply to the device count; one may be -1 ("the rest").
"""

from __future__ import annotations

import ml_collections

from atoll.configs import validation as v

VARIANTS = ("tiny", "small", "gpu_350m", "long")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "lm"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    m = c.model
    m.vocab_size = 256
    m.d_model = 128
    m.num_layers = 4
    m.num_heads = 4
    m.num_kv_heads = 4
    m.head_dim = 32
    m.mlp_dim = 512
    m.tie_embeddings = False
    m.dtype = "float32"
    m.param_dtype = "float32"
    m.attention_impl = ml_collections.FieldReference(None, field_type=str)
    m.rope_theta = 10_000.0
    m.norm_eps = 1e-6
    m.scan_layers = True
    m.remat = "none"
    m.init_std = 0.02
    m.moe = moe_config()
    # Attention over a sequence split along mesh.context: None (XLA partitions plain
    # attention itself) | all_gather | ring | tokenring (parallel/context.py).
    m.context_parallel = ml_collections.FieldReference(None, field_type=str)

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # "" = embedded corpus (the running Python's stdlib sources)
    c.data.glob = "**/*"
    c.data.seq_len = 128
    c.data.val_fraction = 0.02
    c.data.cache_dir = ""  # "" = ~/.cache/atoll (or $ATOLL_CACHE)

    c.train = ml_collections.ConfigDict()
    t = c.train
    t.steps = 1000
    t.batch_size = 32  # global, in sequences
    t.lr = 3e-3
    t.warmup_steps = 100
    t.min_lr_ratio = 0.1
    t.b1 = 0.9
    t.b2 = 0.95
    t.weight_decay = 0.1
    t.grad_clip = 1.0
    t.log_every = 25
    t.eval_every = 250
    t.eval_batches = 4
    t.checkpoint_every = 500
    t.keep_checkpoints = 2      # the newest N steps stay on disk
    t.keep_checkpoint_every = 0  # ... and every step divisible by this (0: none)
    t.checkpoint_mode = "lazy"   # sync | async (orbax) | lazy (copy overlapped with the next steps)

    c.outer = outer_config()

    c.mesh = ml_collections.ConfigDict(
        {"island": 1, "data": -1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}
    )
    return c


OUTER_METHODS = ("none", "ddp") + ("diloco", "fedavg", "streaming_diloco", "noloco", "co2", "async_diloco",
                                   "edit", "sparseloco")

# Outer lr and momentum per method when the config leaves them unset (-1), from
# the papers' and reference codes' defaults (../shared/research/low_communication.md).
OUTER_DEFAULTS = {
    "diloco": (0.7, 0.9),          # DiLoCo; every PyTorch reimplementation
    "fedavg": (1.0, 0.0),
    "streaming_diloco": (0.4, 0.9),  # Streaming DiLoCo's outer lr (secondary source)
    "noloco": (0.7, 0.5),          # gensyn noloco_mean_* configs (heavy-ball)
    "co2": (1.0, 0.5),             # fairscale-CO2 defaults
    "async_diloco": (0.7, 0.0),    # PCCL example: plain SGD, no momentum
    "edit": (0.7, 0.8),            # atorch EDiT example
    "sparseloco": (1.0, 0.0),      # templar: outer SGD lr 1, error feedback instead of momentum
}


def outer_config() -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.method = "none"
    o.H = 30               # inner steps per outer round
    o.lr = -1.0            # -1: the method's default (OUTER_DEFAULTS)
    o.momentum = -1.0
    o.nesterov = True
    o.fragments = 1        # streaming_diloco: P
    o.pattern = "strided"  # streaming_diloco: strided | sequential
    o.tau = 1              # streaming_diloco: steps between a fragment's send and its application
    o.alpha = 0.5          # streaming_diloco: θ_local ← α·θ_local + (1−α)·θ_outer
    o.quantization = "fp32"  # on the wire: fp32 | bf16 | int8 | fp4
    o.gap_penalty = 1.0    # co2: λ
    o.clip = 0.0           # co2: elementwise momentum clip (0 = off)
    o.edit_warmup = 120    # edit: syncs before anomaly detection starts
    o.edit_ewma_alpha = 0.02
    o.edit_z_threshold = 3.0
    o.edit_temperature = 1.0
    o.edit_clip = 0.0      # edit: global-norm clip of the averaged Δ (0 = off)
    o.topk_chunk = 4096    # sparseloco: chunk size (64x64)
    o.topk_k = 64          # sparseloco: entries kept per chunk (1.56 %)
    o.topk_bins = 4        # sparseloco: 2-bit values
    o.ef_decay = 0.95      # sparseloco: error-feedback decay β
    # Islands of different speeds (diloco, fedavg): relative step rates, or
    # measured seconds per step, one per island; () = all equal.
    o.speeds = ()
    o.step_seconds = ()
    o.heterogeneity = "wait_for_slowest"  # | heterogeneous: faster islands take more steps per round
    o.min_inner_steps = 1  # heterogeneous: an island fitting fewer per round spans rounds (stale)
    o.staleness_power = 0.0  # heterogeneous: weight ∝ tokens · (1 + rounds stale)^−power
    return o


HETEROGENEOUS_METHODS = ("diloco", "fedavg")


def moe_config() -> ml_collections.ConfigDict:
    """config.model.moe: num_experts = 0 keeps every FFN dense (core/moe.py has the math)."""
    e = ml_collections.ConfigDict()
    e.num_experts = 0          # E
    e.top_k = 2                # experts per token (expert_choice: on average)
    e.every = 1                # the FFN of every `every`-th block is MoE
    e.router = "topk_softmax"  # softmax_topk | topk_softmax | expert_choice
    e.dispatch = "capacity"    # capacity (drops overflow) | dropless (grouped matmul; token choice)
    e.capacity_factor = 1.25
    e.expert_mlp_dim = 0       # F per expert; 0: model.mlp_dim
    e.num_shared_experts = 0
    e.load_balance_weight = 0.01      # Switch loss
    e.sequence_balance_weight = 0.0   # per-sequence (expert-level) balance loss
    e.z_loss_weight = 1e-3            # router z-loss
    e.bias_rate = 0.0                 # aux-loss-free bias balancing (DeepSeek-V3: 1e-3); 0: off
    e.grouped_matmul_impl = ml_collections.FieldReference(None, field_type=str)
    return e


def island_speeds(c: ml_collections.ConfigDict) -> list[float] | None:
    """Relative island speeds from config.outer.speeds or .step_seconds (None: all equal)."""
    from atoll.core.outer import speeds_from_step_seconds

    o = c.outer
    if o.step_seconds:
        return speeds_from_step_seconds([float(t) for t in o.step_seconds])
    return [float(s) for s in o.speeds] if o.speeds else None


def island_schedule(c: ml_collections.ConfigDict):
    """The IslandSchedule of a validated config (None: every island takes every step)."""
    from atoll.core.outer import island_schedule as schedule

    speeds, o = island_speeds(c), c.outer
    if speeds is None or o.method in ("none", "ddp"):
        return None
    return schedule(speeds, o.H, o.heterogeneity, min_steps=o.min_inner_steps, staleness_power=o.staleness_power)


def outer_spec(c: ml_collections.ConfigDict):
    """The validated OuterSpec for an island method, or None (none / ddp)."""
    from atoll.core.outer import OuterSpec

    o = c.outer
    if o.method in ("none", "ddp"):
        return None
    lr, momentum = OUTER_DEFAULTS[o.method]
    return OuterSpec(
        method=o.method, H=o.H, lr=lr if o.lr < 0 else o.lr, momentum=momentum if o.momentum < 0 else o.momentum,
        nesterov=o.nesterov, fragments=o.fragments, pattern=o.pattern, tau=o.tau, alpha=o.alpha,
        quantization=o.quantization, seed=c.seed, gap_penalty=o.gap_penalty, clip=o.clip or None,
        edit_warmup=o.edit_warmup, edit_ewma_alpha=o.edit_ewma_alpha, edit_z_threshold=o.edit_z_threshold,
        edit_temperature=o.edit_temperature, edit_clip=o.edit_clip or None, topk_chunk=o.topk_chunk,
        topk_k=o.topk_k, topk_bins=o.topk_bins, ef_decay=o.ef_decay)


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown lm config variant {variant!r}; choose one of {list(VARIANTS)}")
    c = base_config()
    c.name = f"lm:{variant}"
    if variant == "tiny":
        # Unrolled layers: XLA:CPU runs them ~15% faster than a scan at this size.
        c.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384,
                       scan_layers=False)
        c.data.seq_len = 128
        c.train.update(steps=400, batch_size=32, lr=3e-3, warmup_steps=50, eval_every=100,
                       checkpoint_every=200, log_every=20)
    elif variant == "small":
        c.model.update(d_model=512, num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64, mlp_dim=1408)
        c.data.seq_len = 512
        c.train.update(steps=5000, batch_size=64, lr=1e-3, warmup_steps=250, eval_every=500,
                       checkpoint_every=1000, log_every=50)
    elif variant == "gpu_350m":
        c.model.update(d_model=1024, num_layers=24, num_heads=8, num_kv_heads=8, head_dim=128,
                       mlp_dim=3584, dtype="bfloat16", scan_layers=False)
        c.data.seq_len = 2048
        c.train.update(steps=20_000, batch_size=16, lr=3e-4, warmup_steps=1000, eval_every=1000,
                       checkpoint_every=2000, log_every=50, eval_batches=8)
    elif variant == "long":
        c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=256,
                       scan_layers=False)
        c.model.context_parallel = "ring"
        c.data.seq_len = 2048
        c.train.update(steps=60, batch_size=8, lr=3e-3, warmup_steps=10, eval_every=30,
                       checkpoint_every=30, log_every=10, eval_batches=2)
        c.mesh.update(data=2, context=4)
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad field."""
    from atoll.core.transformer import DTYPES, REMAT_POLICIES  # configs stay import-light

    m = c.model
    v.positive(c, "model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads",
               "model.num_kv_heads", "model.head_dim", "model.mlp_dim", "model.rope_theta",
               "model.norm_eps", "model.init_std")
    v.choice(c, "model.dtype", DTYPES)
    v.choice(c, "model.param_dtype", ("float32", "bfloat16"))
    v.choice(c, "model.remat", REMAT_POLICIES)
    v.choice(c, "model.attention_impl", (None, "xla", "cudnn", "pallas"))
    v.divides(c, "model.num_kv_heads", "model.num_heads", "grouped-query attention")
    if m.attention_impl == "pallas" and (m.dtype not in ("bfloat16", "float16") or m.head_dim not in (64, 128)):
        raise v.ConfigError(
            f"config.model.attention_impl = 'pallas' needs model.dtype bfloat16 or float16 and head_dim 64 or "
            f"128; got {m.dtype} and {m.head_dim}")
    if m.head_dim % 2:
        raise v.ConfigError(f"config.model.head_dim = {m.head_dim} must be even (rotary embedding)")
    v.positive(c, "data.seq_len")
    v.in_range(c, "data.val_fraction", 1e-4, 0.5)
    v.positive(c, "train.steps", "train.batch_size", "train.lr", "train.log_every",
               "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints")
    v.non_negative(c, "train.warmup_steps", "train.weight_decay", "train.grad_clip", "train.keep_checkpoint_every")
    v.choice(c, "train.checkpoint_mode", ("sync", "async", "lazy"))
    v.in_range(c, "train.min_lr_ratio", 0.0, 1.0)
    v.in_range(c, "train.b1", 0.0, 0.99999)
    v.in_range(c, "train.b2", 0.0, 0.99999)
    for axis, size in c.mesh.items():
        if not isinstance(size, int) or size == 0 or size < -1:
            raise v.ConfigError(f"config.mesh.{axis} = {size!r} must be a positive int or -1")
    _validate_outer(c)
    _validate_moe(c)
    _validate_context(c)
    tensor = c.mesh.tensor
    if tensor > 1:
        for field in ("num_heads", "num_kv_heads", "mlp_dim", "vocab_size"):
            if m[field] % tensor:
                raise v.ConfigError(f"config.model.{field} = {m[field]} must be divisible by "
                                    f"config.mesh.tensor = {tensor} (tensor parallelism splits it)")
        if m.moe.num_experts and m.moe.expert_mlp_dim % tensor:
            raise v.ConfigError(f"config.model.moe.expert_mlp_dim = {m.moe.expert_mlp_dim} must be divisible by "
                                f"config.mesh.tensor = {tensor} (tensor parallelism splits each expert's width)")


def _validate_outer(c: ml_collections.ConfigDict) -> None:
    from atoll.core.outer import PATTERNS, WIRE_FORMATS

    o, islands = c.outer, c.mesh.island
    v.choice(c, "outer.method", OUTER_METHODS)
    if o.method == "none":
        if islands not in (1, -1):
            raise v.ConfigError(
                f"config.mesh.island = {islands} needs an outer loop: set config.outer.method to 'ddp' or "
                f"one of {list(OUTER_METHODS[2:])}")
        return
    if islands == -1:
        raise v.ConfigError("config.mesh.island must be given explicitly (not -1) for island training")
    v.positive(c, "outer.H", "outer.fragments", "outer.gap_penalty", "outer.edit_temperature",
               "outer.topk_chunk", "outer.topk_k", "outer.topk_bins")
    v.non_negative(c, "outer.tau", "outer.clip", "outer.edit_warmup", "outer.edit_clip")
    v.in_range(c, "outer.alpha", 0.0, 1.0)
    v.in_range(c, "outer.ef_decay", 0.0, 1.0)
    v.in_range(c, "outer.edit_ewma_alpha", 0.0, 1.0)
    v.choice(c, "outer.pattern", PATTERNS)
    v.choice(c, "outer.quantization", WIRE_FORMATS)
    for field in ("lr", "momentum"):
        if o[field] != -1.0 and o[field] < 0:
            raise v.ConfigError(f"config.outer.{field} = {o[field]} must be >= 0 (or -1 for the method default)")
    if o.method == "streaming_diloco":
        if o.fragments > c.model.num_layers:
            raise v.ConfigError(f"config.outer.fragments = {o.fragments} exceeds config.model.num_layers = "
                                f"{c.model.num_layers} (fragments are groups of whole layers)")
        v.divides(c, "outer.fragments", "outer.H", "each fragment syncs once per H steps, staggered by H/P")
        if o.tau >= o.H:
            raise v.ConfigError(f"config.outer.tau = {o.tau} must be < config.outer.H = {o.H} (a fragment's "
                                "reduced Δ must land before its next send)")
    elif o.fragments != 1:
        raise v.ConfigError(f"config.outer.fragments = {o.fragments} is only for streaming_diloco "
                            f"(method is {o.method!r})")
    if o.quantization != "fp32" and o.method not in ("diloco", "fedavg", "streaming_diloco", "co2", "async_diloco"):
        raise v.ConfigError(f"config.outer.quantization = {o.quantization!r} is not available for {o.method!r} "
                            "(it has its own wire format); use fp32")
    _validate_heterogeneity(c)
    if o.method == "noloco" and islands % 2:
        raise v.ConfigError(f"config.mesh.island = {islands}: noloco pairs islands, so it needs an even count")
    if c.train.batch_size % islands:
        raise v.ConfigError(f"config.train.batch_size = {c.train.batch_size} must be divisible by "
                            f"config.mesh.island = {islands} (each island trains on its share)")


def _validate_moe(c: ml_collections.ConfigDict) -> None:
    from atoll.core.moe import DISPATCHES, ROUTERS
    from atoll.kernels.grouped_matmul import IMPLEMENTATIONS

    e = c.model.moe
    v.non_negative(c, "model.moe.num_experts")
    if not isinstance(e.num_experts, int):
        raise v.ConfigError(f"config.model.moe.num_experts = {e.num_experts!r} must be an int (0: dense)")
    expert_axis = c.mesh.expert
    if e.num_experts == 0:
        if expert_axis not in (1, -1):
            raise v.ConfigError(f"config.mesh.expert = {expert_axis} shards MoE experts, but "
                                "config.model.moe.num_experts = 0 (a dense model); set num_experts or "
                                "use the devices on another axis")
        return
    v.choice(c, "model.moe.router", ROUTERS)
    v.choice(c, "model.moe.dispatch", DISPATCHES)
    v.choice(c, "model.moe.grouped_matmul_impl", (None, *IMPLEMENTATIONS))
    v.positive(c, "model.moe.top_k", "model.moe.every", "model.moe.capacity_factor")
    v.non_negative(c, "model.moe.expert_mlp_dim", "model.moe.num_shared_experts", "model.moe.load_balance_weight",
                   "model.moe.sequence_balance_weight", "model.moe.z_loss_weight", "model.moe.bias_rate")
    if e.top_k > e.num_experts:
        raise v.ConfigError(f"config.model.moe.top_k = {e.top_k} exceeds config.model.moe.num_experts = "
                            f"{e.num_experts}")
    if c.model.num_layers % e.every:
        raise v.ConfigError(f"config.model.moe.every = {e.every} must divide config.model.num_layers = "
                            f"{c.model.num_layers} (the scanned unit is a group of `every` blocks)")
    if e.grouped_matmul_impl == "pallas":
        F = e.expert_mlp_dim or c.model.mlp_dim
        if e.dispatch != "dropless":
            raise v.ConfigError("config.model.moe.grouped_matmul_impl = 'pallas' is the dropless dispatch's "
                                "kernel: set config.model.moe.dispatch = 'dropless' (or leave the impl None)")
        if c.model.dtype not in ("bfloat16", "float16") or c.model.d_model % 64 or F % 64:
            raise v.ConfigError(
                "config.model.moe.grouped_matmul_impl = 'pallas' needs model.dtype bfloat16 or float16 and "
                f"d_model and the expert width multiples of 64; got {c.model.dtype}, {c.model.d_model} and {F}")
    if e.router == "expert_choice" and e.bias_rate:
        raise v.ConfigError("config.model.moe.bias_rate balances token-choice routing; expert_choice is "
                            "balanced by construction (set bias_rate = 0)")
    if e.router == "expert_choice" and e.dispatch != "capacity":
        raise v.ConfigError("config.model.moe.router = 'expert_choice' fills every expert to capacity: set "
                            "config.model.moe.dispatch = 'capacity'")
    if expert_axis == -1:
        raise v.ConfigError("config.mesh.expert must be given explicitly (not -1) for expert parallelism")
    if e.num_experts % expert_axis:
        raise v.ConfigError(f"config.model.moe.num_experts = {e.num_experts} must be divisible by "
                            f"config.mesh.expert = {expert_axis} (each expert shard holds E / expert experts)")
    if c.mesh.context not in (1, -1):
        raise v.ConfigError("config.model.moe with config.mesh.context > 1: each sequence is a routing group, "
                            "and context parallelism would split it over devices; use context = 1 for MoE")
    if (c.outer.method == "streaming_diloco" and c.outer.fragments > 1 and e.every > 1
            and c.model.scan_layers):
        raise v.ConfigError("streaming_diloco fragments are groups of layers, and with config.model.moe.every > 1 "
                            "a scanned model stacks every `every`-th layer together; set "
                            "config.model.scan_layers = False (or moe.every = 1)")
    if expert_axis > 1 and e.dispatch == "dropless":
        raise v.ConfigError("config.model.moe.dispatch = 'dropless' with config.mesh.expert > 1 needs "
                            "jax.lax.ragged_all_to_all, which has no CPU lowering and is not wired in yet; use "
                            "dispatch = 'capacity' for expert parallelism")


def _validate_context(c: ml_collections.ConfigDict) -> None:
    from atoll.parallel.context import STRATEGIES  # configs stay import-light

    v.choice(c, "model.context_parallel", (None, *STRATEGIES))
    strategy, C = c.model.context_parallel, c.mesh.context
    # A strategy with context = 1 runs plain attention; with -1 the mesh decides (train_lm checks the length).
    if strategy is not None and C > 1 and c.data.seq_len % (2 * C):
        raise v.ConfigError(
            f"config.data.seq_len = {c.data.seq_len} must be a multiple of 2 × config.mesh.context = {2 * C}: "
            f"config.model.context_parallel = {strategy!r} gives each of the {C} devices two chunks of the "
            "sequence (zig-zag layout)")


def _validate_heterogeneity(c: ml_collections.ConfigDict) -> None:
    from atoll.core.outer import HETEROGENEITY_MODES

    o = c.outer
    v.choice(c, "outer.heterogeneity", HETEROGENEITY_MODES)
    v.non_negative(c, "outer.staleness_power")
    if not 1 <= o.min_inner_steps <= o.H:
        raise v.ConfigError(f"config.outer.min_inner_steps = {o.min_inner_steps} must be between 1 and "
                            f"config.outer.H = {o.H}")
    if o.speeds and o.step_seconds:
        raise v.ConfigError("give config.outer.speeds or config.outer.step_seconds, not both")
    for field in ("speeds", "step_seconds"):
        values = o[field]
        if not values:
            continue
        if len(values) != c.mesh.island:
            raise v.ConfigError(f"config.outer.{field} has {len(values)} entries; it needs one per island "
                                f"(config.mesh.island = {c.mesh.island})")
        if any(not isinstance(x, (int, float)) or not x > 0 for x in values):
            raise v.ConfigError(f"config.outer.{field} = {tuple(values)} must all be positive numbers")
    if o.heterogeneity == "heterogeneous":
        if not (o.speeds or o.step_seconds):
            raise v.ConfigError("config.outer.heterogeneity = 'heterogeneous' needs island speeds: set "
                                "config.outer.speeds (relative step rates) or config.outer.step_seconds")
        if o.method not in HETEROGENEOUS_METHODS:
            raise v.ConfigError(f"config.outer.heterogeneity = 'heterogeneous' works with "
                                f"{list(HETEROGENEOUS_METHODS)} (method is {o.method!r})")
        if o.quantization != "fp32":
            raise v.ConfigError("config.outer.heterogeneity = 'heterogeneous' sends a token-weighted fp32 "
                                f"mean; set config.outer.quantization = 'fp32' (it is {o.quantization!r})")
