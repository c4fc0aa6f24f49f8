"""Honest FLOP counts for a transformer LM train step, and device peaks.

Counted (per token, one forward + backward = 3 × forward):
  6 · N_matmul, where N_matmul counts the weights that take part in a matmul:
      every block's q/k/v/o and MLP weights, plus the output head (the tied
      embedding counts once, as the head; the input lookup is a gather, not FLOPs);
  attention scores and weighted sum: forward 4·T·N·K per layer for full
      attention; causal attention only computes the lower triangle, so we count
      half: 2·T·N·K, i.e. 6·Y·T·N·K for the train step.
Norms, rotary, softmax and the optimizer are left out, as everyone does.

`baseline_convention_flops_per_token` reproduces the convention of the H100
baseline in shared/research (6·N_all + 12·Y·D·T: embedding included, causal
attention counted in full) so the two can be compared; it is the larger one.
"""

from __future__ import annotations

from atoll.core.transformer import TransformerConfig

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by device-kind substring.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def block_matmul_params(c: TransformerConfig) -> int:
    attn = c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.d_model * c.mlp_dim
    return c.num_layers * (attn + mlp)


def matmul_params(c: TransformerConfig) -> int:
    return block_matmul_params(c) + c.d_model * c.vocab_size


def total_params(c: TransformerConfig) -> int:
    norms = (2 * c.num_layers + 1) * c.d_model
    embeddings = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    return block_matmul_params(c) + embeddings + norms


def train_flops_per_token(c: TransformerConfig, seq_len: int) -> float:
    return 6.0 * matmul_params(c) + 6.0 * c.num_layers * seq_len * c.num_heads * c.head_dim


def baseline_convention_flops_per_token(c: TransformerConfig, seq_len: int) -> float:
    return 6.0 * total_params(c) + 12.0 * c.num_layers * c.d_model * seq_len


def device_peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s for a device kind, or None when unknown (e.g. CPU)."""
    for name, peak in PEAK_BF16_FLOPS.items():  # ordered: "H100 PCIe" before "H100"
        if name in device_kind:
            return peak
    return None
