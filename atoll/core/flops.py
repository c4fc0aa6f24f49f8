"""Honest FLOP counts for a transformer LM train step, and device peaks.

Counted (per token, one forward + backward = 3 × forward):
  6 · N_matmul, where N_matmul counts the weights that take part in a matmul:
      every block's q/k/v/o and MLP weights, plus the output head (the tied
      embedding counts once, as the head; the input lookup is a gather, not FLOPs);
  attention scores and weighted sum: forward 4·T·N·K per layer for full
      attention; causal attention only computes the lower triangle, so we count
      half: 2·T·N·K, i.e. 6·Y·T·N·K for the train step.
Norms, rotary, softmax and the optimizer are left out, as everyone does.

MoE layers count their *active* weights: the router (D·E) plus top_k experts
(and the shared experts) per token, since that is the useful work. Capacity
dispatch pads every expert to capacity_factor × its fair share and computes
the padding too; those FLOPs are not counted (MFU stays a measure of useful
work; `executed_moe_flops_factor` says how much more the chips did).

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


def _moe_layers(c: TransformerConfig) -> int:
    return len(c.moe_blocks())


def _expert_width(c: TransformerConfig) -> int:
    return c.moe.expert_mlp_dim or c.mlp_dim


def block_matmul_params(c: TransformerConfig, *, active: bool = True) -> int:
    """Weights in the blocks' matmuls; MoE layers count top_k (+ shared) experts
    when `active`, all of them otherwise."""
    attn = c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.d_model * c.mlp_dim
    n_moe = _moe_layers(c)
    m = c.moe
    experts = (m.top_k if active else m.num_experts) + m.num_shared_experts
    moe_ffn = c.d_model * m.num_experts + experts * 3 * c.d_model * _expert_width(c)
    return c.num_layers * attn + (c.num_layers - n_moe) * mlp + n_moe * moe_ffn


def matmul_params(c: TransformerConfig) -> int:
    return block_matmul_params(c) + c.d_model * c.vocab_size


def total_params(c: TransformerConfig) -> int:
    norms = (2 * c.num_layers + 1) * c.d_model
    embeddings = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    biases = _moe_layers(c) * c.moe.num_experts if c.moe.bias_rate > 0 and c.moe.router != "expert_choice" else 0
    return block_matmul_params(c, active=False) + embeddings + norms + biases


def active_params(c: TransformerConfig) -> int:
    """Parameters a token passes through (what a dense model of the same cost has)."""
    return total_params(c) - block_matmul_params(c, active=False) + block_matmul_params(c)


def executed_moe_flops_factor(c: TransformerConfig) -> float:
    """Expert FLOPs computed / expert FLOPs useful: capacity_factor under capacity
    dispatch and expert choice (padding is computed), 1 for dropless."""
    if not c.moe.enabled or c.moe.dispatch == "dropless" and c.moe.router != "expert_choice":
        return 1.0
    return c.moe.capacity_factor


def train_flops_per_token(c: TransformerConfig, seq_len: int) -> float:
    return 6.0 * matmul_params(c) + 6.0 * c.num_layers * seq_len * c.num_heads * c.head_dim


def baseline_convention_flops_per_token(c: TransformerConfig, seq_len: int) -> float:
    # active, not total: an MoE token passes through top_k experts, not all of them
    return 6.0 * active_params(c) + 12.0 * c.num_layers * c.d_model * seq_len


def device_peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s for a device kind, or None when unknown (e.g. CPU)."""
    for name, peak in PEAK_BF16_FLOPS.items():  # ordered: "H100 PCIe" before "H100"
        if name in device_kind:
            return peak
    return None
