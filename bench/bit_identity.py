"""Prune with the elsa of one git worktree and store every tensor, or compare two stored runs bit for bit.

    PYTHONPATH=<tree> python bench/bit_identity.py run <out.pt> <family> <overrides...>
    python bench/bit_identity.py compare <a.pt> <b.pt>

``family``: ``tiny`` (conf/model/tiny.yaml) or one of tests/test_families.py's FAMILIES (built here with the
tiny model's tokenizer, so the same calibration data feeds every family). The run goes through the pipeline
(elsa.run.recipe.run, or elsa.pipeline.run in a tree from before the folder layout) with tests/conftest.py's TINY
overrides, no dense evaluation and no save; the model is taken where the run evaluates it, after the method (the
"eval" phase of ``Run.timed``, in both layouts). Used to check that a refactor leaves pruned weights
bit-identical (torch.equal on every tensor of the state dict)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TINY = ["model=tiny", "logger=none", "eval=quick", "eval.max_tokens=2048", "seqlen=128", "nsamples=4",
        "eval.dense=false", "save_model=false", "hardware.threads=1"]


class FamilySource:
    """A tiny random checkpoint of one family of tests/test_families.py, with the tiny Llama's tokenizer."""

    def __init__(self, name: str, family: str):
        self.name, self.family = name, family

    def check(self):
        pass

    def load(self):
        import transformers

        import elsa

        TinyLlamaSource = _module("elsa.model.structure", "elsa.models").TinyLlamaSource

        sys.path.insert(0, str(Path(elsa.__file__).resolve().parent.parent / "tests"))   # that tree's families
        from test_families import FAMILIES

        tok = TinyLlamaSource().tokenizer()
        cfg = FAMILIES[self.family]()
        cfg.vocab_size = len(tok)
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cfg).eval(), tok

    def fingerprint(self):
        return f"family-{self.family}"


def _module(name: str, before_layout: str):
    """The tree's module ``name``, or its path before the folder layout (a tree of an older commit). Decided by
    the tree's own files: an editable install of another checkout would otherwise answer an import of a module
    this tree lacks."""
    import importlib

    import elsa

    own = Path(elsa.__file__).resolve().parent.joinpath(*name.split(".")[1:]).with_suffix(".py")
    return importlib.import_module(name if own.is_file() else before_layout)


def run(out: str, family: str, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    import elsa

    P = _module("elsa.run.recipe", "elsa.pipeline")
    captured = {}
    timed = P.Run.timed

    def capture(self, phase, fn, *args, **kwargs):
        if phase == "eval":
            captured.update({k: v.detach().clone() for k, v in args[0].state_dict().items()})
        return timed(self, phase, fn, *args, **kwargs)

    P.Run.timed = capture
    from omegaconf import OmegaConf

    conf = Path(elsa.__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, f"output_dir={out}.dir", *overrides])
    if family != "tiny":
        cfg.model = OmegaConf.create({"_target_": "__main__.FamilySource", "name": family, "family": family})
    result = P.run(cfg)
    assert result.get("status") == "done", result.get("status")
    assert captured, "the run never evaluated its model"
    torch.save(captured, out)


def compare(a: str, b: str) -> int:
    from same_weights import differing      # bench/ is on sys.path: this script runs as bench/bit_identity.py
    x, y = torch.load(a), torch.load(b)
    differ, one_side = differing(x, y)
    bad = differ + one_side
    print(f"{a} vs {b}: {len(x)} tensors, {'identical' if not bad else f'{len(bad)} differ: {bad[:5]}'}")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
