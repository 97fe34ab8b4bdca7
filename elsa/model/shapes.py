"""Shape rehearsals: a named architecture's exact configuration with only ``blocks`` decoder blocks and random
weights (model=shapes model.like=llama2-7b model.blocks=1).

The values below are the published ``config.json`` of each model on the Hugging Face Hub (the repo named in
``source``); only the keys that set shapes, attention and routing are written, every other key keeps the
transformers config class's default. ``num_hidden_layers`` is the full model's depth, kept as ``layers`` so
that the plan (elsa/plan.py) can extrapolate a rehearsal to the whole model; the rehearsal builds ``blocks``.

A rehearsal's perplexities are those of random weights: results.json records ``rehearsal`` and the report
labels the row, so they are never read as a model's.
"""
from __future__ import annotations

import torch

from elsa.errors import config_error, positive

ARCHITECTURES: dict[str, dict] = {
    "llama2-7b": {
        "source": "meta-llama/Llama-2-7b-hf config.json",
        "config_class": "LlamaConfig",
        "layers": 32,
        "config": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
                   "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    },
    "llama3-8b": {
        "source": "meta-llama/Meta-Llama-3-8B config.json",
        "config_class": "LlamaConfig",
        "layers": 32,
        "config": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
                   "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    },
    "mixtral-8x7b": {
        "source": "mistralai/Mixtral-8x7B-v0.1 config.json",
        "config_class": "MixtralConfig",
        "layers": 32,
        "config": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
                   "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
                   "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    },
    "qwen3-30b-a3b": {
        "source": "Qwen/Qwen3-30B-A3B config.json",
        "config_class": "Qwen3MoeConfig",
        "layers": 48,
        "config": {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                   "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
                   "max_position_embeddings": 40960, "num_local_experts": 128, "num_experts_per_tok": 8,
                   "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                   "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    },
    "gemma2-9b": {
        "source": "google/gemma-2-9b config.json",
        "config_class": "Gemma2Config",
        "layers": 42,
        "config": {"hidden_size": 3584, "intermediate_size": 14336, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192,
                   "sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    },
}


class ShapesSource:
    """A random-weight checkpoint with architecture ``like``'s exact configuration and ``blocks`` decoder blocks,
    built offline from the transformers config (no download), with the tiny model's offline BPE tokenizer
    (512 tokens: it fits every vocabulary here). ``config`` overrides table values (a smaller rehearsal for
    tests); the run records every value it used."""

    def __init__(self, name: str = "shapes", like: str = "llama2-7b", blocks: int = 1, seed: int = 0,
                 dtype: str = "float32", config: dict | None = None, init_std: float | None = None):
        from elsa.model.structure import _dtype

        if like not in ARCHITECTURES:
            raise config_error("model.like", like, f"one of {', '.join(ARCHITECTURES)}")
        self.name, self.like = name, like
        self.blocks = positive("model.blocks", blocks, whole=True)
        self.seed, self.dtype = seed, _dtype(dtype)
        self.overrides = dict(config or {})
        self.init_std = init_std
        self.layers = ARCHITECTURES[like]["layers"]

    def check(self) -> None:
        pass

    def tokenizer(self):
        from elsa.model.structure import TinyLlamaSource

        return TinyLlamaSource().tokenizer()

    def hf_config(self, tok=None):
        """The transformers config: the table's values, the overrides, ``blocks`` layers, the tokenizer's ids."""
        import transformers

        arch = ARCHITECTURES[self.like]
        values = {**arch["config"], **self.overrides, "num_hidden_layers": self.blocks}
        if tok is not None:
            if len(tok) > values["vocab_size"]:
                raise config_error("model.config.vocab_size", values["vocab_size"],
                                   f"at least the tokenizer's {len(tok)} tokens")
            values.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
        if self.init_std is not None:
            values["initializer_range"] = float(self.init_std)
        cfg = getattr(transformers, arch["config_class"])(**values)
        if getattr(cfg, "layer_types", None):       # mixed layer types (Gemma-2): the first `blocks` of the model
            cfg.layer_types = list(cfg.layer_types)[:self.blocks]
        return cfg

    @property
    def rehearsal(self) -> dict:
        """What results.json records: this is no model, its perplexities are those of random weights."""
        return {"kind": "shapes", "like": self.like, "blocks": self.blocks, "of_layers": self.layers,
                "source": ARCHITECTURES[self.like]["source"], "overrides": self.overrides,
                "note": "random weights with the architecture's shapes: time and memory rehearsal only; its "
                        "perplexities are not the model's"}

    def load(self):
        from transformers import AutoModelForCausalLM

        tok = self.tokenizer()
        cfg = self.hf_config(tok)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=self.dtype)
        return model.eval(), tok

    def fingerprint(self) -> str:
        extra = "".join(f"-{k}={v}" for k, v in sorted(self.overrides.items()))
        return f"shapes-{self.like}-b{self.blocks}-s{self.seed}{extra}:{self.dtype}"
