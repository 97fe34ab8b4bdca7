"""Every block walked by the layer-wise engine with the arguments the model gives THAT block.

Tiny random checkpoints of several families, built from transformers configs in milliseconds. A walk that
prunes nothing must reproduce the model's own forward at the last block; families with mixed layer types
(sliding and full attention, per-type rotary embeddings) fail this when every block is re-run with block 0's
arguments (measured before the fix: Gemma-2/Gemma-3 with a 16-token window and Qwen2 with sliding layers).
"""
import pytest
import torch
import transformers

from elsa.layerwise import LayerwiseEngine
from elsa.sparsity import Sparsity

from test_layerwise import NoOp, last_block_outputs

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=16),
    "qwen2-sliding": lambda: transformers.Qwen2Config(
        **COMMON, use_sliding_window=True, sliding_window=16, max_window_layers=2,
        layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"]),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=16),
    "gemma3": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=16,
                                                    sliding_window_pattern=2),
    "phi3": lambda: transformers.Phi3Config(**COMMON),
}


def tiny(family):
    cfg = FAMILIES[family]()
    cfg._attn_implementation = "eager"       # masks matter: eager attention applies them explicitly
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_noop_walk_equals_the_models_forward(family):
    model = tiny(family)
    ids = torch.randint(0, 128, (3, 128), generator=torch.Generator().manual_seed(0))
    engine = LayerwiseEngine(model, "cpu", batch_size=2)
    engine.run(NoOp(), ids, Sparsity(0.5), keep_outputs=True)
    got, want = torch.cat(engine.outputs), last_block_outputs(model, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), f"{family}: max diff {float((got - want).abs().max())}"


def test_mixed_layer_types_get_their_own_arguments():
    """Gemma-3's sliding and full blocks receive different rotary embeddings: what the engine hands block 1
    are not what it hands a full block, checked on the captured kwargs."""
    model = tiny("gemma3")
    engine = LayerwiseEngine(model, "cpu", batch_size=4)
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    _hiddens, kwargs = engine.capture(ids)
    types = model.config.layer_types
    a, b = types.index("sliding_attention"), types.index("full_attention")
    pa, pb = kwargs[a][0]["position_embeddings"], kwargs[b][0]["position_embeddings"]
    assert not torch.equal(pa[0], pb[0])
