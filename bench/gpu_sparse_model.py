"""The sparse replacement on a whole 2:4 model (bench/gpu_check.sh step 4a): the project's random Llama at the
size given (``model.hidden_size=1024 ...``), magnitude-pruned 2:4, every pruned Linear through
elsa.artifacts.linear.sparsify on the device (bf16 on CUDA, where the semi-structured kernel applies), and the
logits of a 512-token forward against the dense model's.

    python bench/gpu_sparse_model.py gpu|cpu [model.<key>=<int> ...]
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from elsa.model.structure import TinyLlamaSource  # noqa: E402
from elsa.artifacts.linear import block_linears, sparsify  # noqa: E402
from elsa.sparsity.patterns import Sparsity, mask_from_scores  # noqa: E402


def main(hw: str, sizes: list[str]) -> None:
    dev = "cuda" if hw == "gpu" else "cpu"
    kw = {a.split("=")[0].split(".", 1)[1]: int(a.split("=")[1]) for a in sizes}
    model, _ = TinyLlamaSource(**kw).load()
    model = model.to(dev, torch.bfloat16 if dev == "cuda" else torch.float32).eval()
    with torch.no_grad():
        for lin in block_linears(model).values():
            lin.weight.mul_(mask_from_scores(lin.weight.abs(), Sparsity.parse("2:4")).to(lin.weight.dtype))
        sparse = copy.deepcopy(model)
        plan = sparsify(sparse, regimes={"decode": 1, "prefill": 512})
        ids = torch.randint(0, model.config.vocab_size, (1, 512), device=dev,
                            generator=torch.Generator(device=dev).manual_seed(0))
        a, b = model(ids).logits.float(), sparse(ids).logits.float()
    print(f"kernels chosen: {plan['chosen']}; max |logit diff| {float((a - b).abs().max()):.4g} of max |logit| "
          f"{float(a.abs().max()):.4g}; same argmax at {float((a.argmax(-1) == b.argmax(-1)).float().mean()):.4f} "
          "of the positions")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
