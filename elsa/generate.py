"""Greedy generation from a saved model (an HF dir or a compressed dir), dense or with the sparse kernels.

    python -m elsa.generate outputs/<run>/model_compressed --prompt "The capital of France" --max-new-tokens 32 --sparse

Prints the text, the decode speed (tokens/s after the prompt) and, with ``--sparse``, which kernel each pruned
matrix runs. ``--compare`` runs dense and sparse side by side on the same prompt: the same tokens, both speeds.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from elsa.errors import ElsaError


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy decoding with the KV cache; returns (all token ids, seconds spent on the ``new_tokens`` decode
    steps after the prompt's forward pass)."""
    out = model(ids, use_cache=True)
    past, nxt = out.cache, out.logits[:, -1:].argmax(-1)     # transformers 5 names the KV cache ``cache``
    tokens = [nxt]
    t = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(nxt, cache=past, use_cache=True)
        past, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    return torch.cat([ids, *tokens], dim=1), time.perf_counter() - t


@torch.no_grad()
def prefill_seconds(model, tokens: int, vocab: int, reps: int = 1) -> float:
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        model(ids, use_cache=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def side_by_side(dense, sparse, ids: torch.Tensor, new_tokens: int, rounds: int = 3,
                 prefill_tokens: int | None = None) -> dict:
    """Decode tokens/s (and prefill seconds) of two models measured in alternating rounds in this process."""
    res = {"dense": [], "sparse": []}, {"dense": [], "sparse": []}
    same = True
    vocab = int(dense.config.vocab_size)
    for _ in range(rounds):
        for name, model in (("dense", dense), ("sparse", sparse)):
            out, secs = greedy(model, ids, new_tokens)
            res[0][name].append((new_tokens - 1) / secs)
            if name == "dense":
                ref = out
            else:
                same = same and torch.equal(out, ref)
            if prefill_tokens:
                res[1][name].append(prefill_seconds(model, prefill_tokens, vocab))
    dec = {k: statistics.median(v) for k, v in res[0].items()}
    out = {"decode_tokens_per_s": dec, "decode_speedup": dec["sparse"] / dec["dense"], "same_tokens": same,
           "new_tokens": new_tokens, "rounds": rounds, "threads": torch.get_num_threads()}
    if prefill_tokens:
        pre = {k: statistics.median(v) for k, v in res[1].items()}
        out.update(prefill_s=pre, prefill_speedup=pre["dense"] / pre["sparse"], prefill_tokens=prefill_tokens)
    return out


def measure(model, tok, new_tokens: int = 32, rounds: int = 3, prompt: str = "The history of the city") -> dict:
    """What a run records with measure_speed=true: the model as it is (dense kernels) against a copy with the
    sparse kernels, side by side, plus which kernels were chosen."""
    from elsa.sparse_linear import sparsify

    sparse = copy.deepcopy(model)
    plan = sparsify(sparse)
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    out = side_by_side(model, sparse, ids, new_tokens, rounds)
    out["kernels"] = plan["chosen"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elsa.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="an HF dir (<run>/model) or a compressed dir (<run>/model_compressed)")
    parser.add_argument("--prompt", default="The history of the city")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sparse", action="store_true", help="run the pruned matrices with the kernels measured fastest")
    parser.add_argument("--compare", action="store_true", help="dense and sparse side by side (implies --sparse)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens < 2:
            raise ElsaError(f"--max-new-tokens={args.max_new_tokens} is not allowed: a whole number >= 2")
        if args.threads is not None:
            if args.threads < 1:
                raise ElsaError(f"--threads={args.threads} is not allowed: a whole number >= 1")
            torch.set_num_threads(args.threads)
        from elsa.logs import quiet_third_party_logs
        from elsa.sparse import load_any

        quiet_third_party_logs()
        model, tok = load_any(args.model_dir)
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
        if args.compare:
            from elsa.sparse_linear import sparsify

            sparse = copy.deepcopy(model)
            plan = sparsify(sparse, progress=True)
            r = side_by_side(model, sparse, ids, args.max_new_tokens)
            out, _ = greedy(sparse, ids, args.max_new_tokens)
            print(tok.decode(out[0], skip_special_tokens=True))
            print(f"kernels {plan['chosen']}; decode {r['decode_tokens_per_s']['dense']:.1f} tokens/s dense, "
                  f"{r['decode_tokens_per_s']['sparse']:.1f} sparse ({r['decode_speedup']:.2f}x); "
                  f"same tokens: {r['same_tokens']}")
            return 0
        if args.sparse:
            from elsa.sparse_linear import sparsify

            plan = sparsify(model, progress=True)
            print(f"kernels {plan['chosen']}", file=sys.stderr)
        out, secs = greedy(model, ids, args.max_new_tokens)
        print(tok.decode(out[0], skip_special_tokens=True))
        print(f"decode: {(args.max_new_tokens - 1) / secs:.1f} tokens/s ({'sparse' if args.sparse else 'dense'}, "
              f"{torch.get_num_threads()} threads)", file=sys.stderr)
    except ElsaError as exc:
        print(f"elsa: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
