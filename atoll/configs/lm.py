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

Any field can be overridden: --config.model.num_layers=8 --config.mesh.fsdp=2.
Mesh axes (mesh.*) multiply to the device count; one may be -1 ("the rest").
"""

from __future__ import annotations

import ml_collections

from atoll.configs import validation as v

VARIANTS = ("tiny", "small", "gpu_350m")


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
    t.keep_checkpoints = 2

    c.mesh = ml_collections.ConfigDict(
        {"island": 1, "data": -1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}
    )
    return c


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
    v.choice(c, "model.attention_impl", (None, "xla", "cudnn"))
    v.divides(c, "model.num_kv_heads", "model.num_heads", "grouped-query attention")
    if m.head_dim % 2:
        raise v.ConfigError(f"config.model.head_dim = {m.head_dim} must be even (rotary embedding)")
    v.positive(c, "data.seq_len")
    v.in_range(c, "data.val_fraction", 1e-4, 0.5)
    v.positive(c, "train.steps", "train.batch_size", "train.lr", "train.log_every",
               "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints")
    v.non_negative(c, "train.warmup_steps", "train.weight_decay", "train.grad_clip")
    v.in_range(c, "train.min_lr_ratio", 0.0, 1.0)
    v.in_range(c, "train.b1", 0.0, 0.99999)
    v.in_range(c, "train.b2", 0.0, 0.99999)
    for axis, size in c.mesh.items():
        if not isinstance(size, int) or size == 0 or size < -1:
            raise v.ConfigError(f"config.mesh.{axis} = {size!r} must be a positive int or -1")
    if c.mesh.island not in (1,):
        raise v.ConfigError(f"config.mesh.island = {c.mesh.island}: train_lm trains one island; "
                            "low-communication (island) training is not built yet, use island=1")
    tensor = c.mesh.tensor
    if tensor > 1:
        for field in ("num_heads", "num_kv_heads", "mlp_dim", "vocab_size"):
            if m[field] % tensor:
                raise v.ConfigError(f"config.model.{field} = {m[field]} must be divisible by "
                                    f"config.mesh.tensor = {tensor} (tensor parallelism splits it)")
