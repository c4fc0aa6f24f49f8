import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from atoll.core.sampling import sample_tokens
from atoll.core.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32)


def test_greedy_sampling_follows_the_argmax_of_a_full_forward_pass():
    model = Transformer(CFG)
    # Jitted: run op by op, the init and the forward passes would compile every
    # primitive separately (per prefix length), most of this test's time.
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    forward = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens))
    prompt = np.array([3, 1, 4], np.int32)
    out = sample_tokens(model, params, prompt, 5, window=8, temperature=0.0)
    seq = list(prompt)
    for t in out:  # each sampled token is the argmax given everything before it (no padding)
        logits = forward(params, jnp.asarray([seq]))
        assert int(jnp.argmax(logits[0, -1])) == int(t)
        seq.append(int(t))
    a = sample_tokens(model, params, prompt, 6, window=8, temperature=1.0, seed=1)
    b = sample_tokens(model, params, prompt, 6, window=8, temperature=1.0, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() < CFG.vocab_size
