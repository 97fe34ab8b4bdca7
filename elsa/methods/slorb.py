"""SLoRB, AST's semi-structured low-rank bypass (Huang et al., AAAI 2025, "AST-Boosted").

A pruned matrix W (``[out, in]``, keep-mask m) gets a dense side branch that sees the inputs in groups of ``k``
consecutive features:

    y = (W * m) x + S (P x),     P: [in/k, in],  S: [out, in/k]

P starts as the group-sum matrix (row g is 1 on inputs g*k .. g*k+k-1), so P x sums each group of k inputs, and
may train (``trainable_projection``); S starts from the weights the mask removed, ``mean`` over each group of
k (``init=mean``, the paper's; ``sum``: their sum; ``zero``: nothing). The branch is dense parameters added
to the model (``out * in / k`` for S, ``in * in / k`` for a trainable P per matrix): results.json counts them
(``params.dense_by_kind.slorb``); they are trained with the model and never pruned.

The branch is a child module ``slorb`` of the Linear / Conv1D whose output it adds to (a forward hook), so it is
part of the state dict and of a saved HF dir (``<prefix>.slorb.weight``, ``<prefix>.slorb.proj``), which plain
``from_pretrained`` drops as unexpected keys; :func:`from_pretrained` loads the model with its branches:

    from elsa.methods.slorb import from_pretrained
    model = from_pretrained("<run dir>/model")      # the HF model, every SLoRB branch re-attached
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INITS = ("mean", "sum", "zero")
PREFIX = "slorb"


class SLoRB(nn.Module):
    """The bypass of one matrix: ``S (P x)``, added to its module's output."""

    elsa_kind = "slorb"   # elsa.model.structure.weight_accounting: dense parameters of this kind
    elsa_trains = True    # elsa.engines.training: trained whatever train_dense_params says (the branch exists to train)

    def __init__(self, in_features: int, out_features: int, k: int, trainable_projection: bool,
                 dtype=torch.float32, device=None):
        super().__init__()
        if in_features % k:
            raise ValueError(f"SLoRB: in_features {in_features} is not a multiple of k={k}")
        self.in_features, self.out_features, self.k = in_features, out_features, k
        groups = in_features // k
        self.weight = nn.Parameter(torch.zeros(out_features, groups, dtype=dtype, device=device))
        if trainable_projection:
            proj = torch.zeros(groups, in_features, dtype=dtype, device=device)
            proj.view(groups, groups, k)[torch.arange(groups), torch.arange(groups)] = 1.0
            self.proj = nn.Parameter(proj)
        else:
            self.proj = None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            return F.linear(x, self.proj)
        return x.reshape(*x.shape[:-1], self.in_features // self.k, self.k).sum(-1)  # the group sums, = P x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.project(x), self.weight)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"trainable_projection={self.proj is not None}")


def attach_branch(module: nn.Module, name: str, branch: nn.Module) -> nn.Module:
    """``module`` (a Linear or Conv1D) holds ``branch`` as its child ``name`` and returns its output plus the
    branch's from now on (SLoRB here, OATS's low-rank factors)."""
    setattr(module, name, branch)
    module.register_forward_hook(lambda mod, args, output: output + getattr(mod, name)(args[0]))
    return branch


def attach(module: nn.Module, branch: SLoRB) -> SLoRB:
    """``module`` (a Linear or Conv1D) returns its output plus ``branch``'s from now on."""
    return attach_branch(module, PREFIX, branch)


@torch.no_grad()
def init_from_pruned(branch: SLoRB, weight: torch.Tensor, keep: torch.Tensor, init: str) -> None:
    """S from the weights the mask removes (``weight``, ``keep``: ``[out, in]``), per group of k inputs."""
    if init == "zero":
        return
    pruned = (weight.float() * (~keep.bool()).float()).reshape(weight.shape[0], -1, branch.k)
    branch.weight.copy_(pruned.mean(-1) if init == "mean" else pruned.sum(-1))


def branches(model: nn.Module) -> dict[str, SLoRB]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SLoRB)}


def summary(model: nn.Module) -> dict | None:
    """What results.json records of a model's SLoRB branches, or None without any."""
    found = branches(model)
    if not found:
        return None
    one = next(iter(found.values()))
    return {"matrices": len(found), "k": one.k, "trainable_projection": one.proj is not None,
            "params": sum(p.numel() for b in found.values() for p in b.parameters())}


def load_with_branches(path: Path, prefix: str, **kwargs) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(the HF model of an HF dir or a compressed dir, without its branches; the ``.<prefix>.`` tensors of the
    branches a method added, which the HF class does not know), for a method's ``from_pretrained``."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from elsa.artifacts.compressed import INDEX, load_compressed, load_state_dict

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()    # the branches' tensors are "unexpected" to the HF class: they load below
    try:
        if (path / INDEX).exists():
            model = load_compressed(path, **kwargs)
            return model, {k: v for k, v in load_state_dict(path).items() if f".{prefix}." in k}
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(str(path / name), "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys() if f".{prefix}." in k})
    return model, tensors


def from_pretrained(path, **kwargs):
    """A saved HF dir of a model with SLoRB branches: the model (``AutoModelForCausalLM.from_pretrained``) with
    every branch re-attached from the ``.slorb.`` tensors of its safetensors files, so it computes what the
    pruned model computed when it was saved. A dir without branches loads as the plain model."""
    model, tensors = load_with_branches(Path(path), PREFIX, **kwargs)
    owners = sorted({k.rsplit(f".{PREFIX}.", 1)[0] for k in tensors})
    params = dict(model.named_parameters())
    for owner in owners:
        module = _owner(model, owner, params)
        w = tensors[f"{owner}.{PREFIX}.weight"]
        proj = tensors.get(f"{owner}.{PREFIX}.proj")
        in_features = proj.shape[1] if proj is not None else _in_features(module)
        branch = SLoRB(in_features, w.shape[0], in_features // w.shape[1], proj is not None, dtype=w.dtype,
                       device=next(module.parameters()).device)
        with torch.no_grad():
            branch.weight.copy_(w)
            if proj is not None:
                branch.proj.copy_(proj)
        attach(module, branch)
    return model


def _owner(model: nn.Module, name: str, params: dict) -> nn.Module:
    """The module a saved ``<name>.slorb.*`` belongs to; the saved names may carry a prefix the loaded model's
    names lack (or the other way round) when a checkpoint's base-model prefix differs."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        for full in params:
            owner = full.rsplit(".", 1)[0]
            if owner.endswith(name) or name.endswith(owner):
                return model.get_submodule(owner)
        raise


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.weight.shape[0]   # Conv1D: weight [in, out]
