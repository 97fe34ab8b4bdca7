"""Perplexity with the published protocol (and, elsewhere, zero-shot through lm-eval).

Protocol: the test split joined with the corpus separator, tokenized once, cut into non-overlapping
``seqlen`` windows (BOS + seqlen-1 text tokens where the tokenizer defines a BOS); perplexity is
exp(sum of token NLL / number of predicted tokens).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from elsa.assets import cache_dir
from elsa.data.corpora import Corpus, eval_windows, token_stream
from elsa.errors import ElsaError

log = logging.getLogger(__name__)


def bos_id(tokenizer, add_bos: bool = True) -> int | None:
    return tokenizer.bos_token_id if add_bos else None


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, device="cpu", desc: str = "perplexity") -> float:
    """exp(mean NLL) over every predicted token of the windows (each window scored independently)."""
    model.eval()
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
        ids = windows[i:i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    ppl = math.exp(nll / count)
    if not math.isfinite(ppl):
        log.warning("perplexity overflowed (mean NLL %.1f)", nll / count)
    return ppl


class PerplexityEval:
    """Perplexity of a model on the test split of each corpus, with a disk cache for dense models."""

    def __init__(self, corpora: dict[str, Corpus], seqlen: int, max_tokens: int | None, batch_size: int,
                 add_bos: bool, device: str):
        self.corpora, self.seqlen, self.max_tokens = corpora, seqlen, max_tokens
        self.batch_size, self.add_bos, self.device = batch_size, add_bos, device

    def windows(self, tokenizer, corpus: Corpus) -> torch.Tensor:
        return eval_windows(token_stream(tokenizer, corpus, "test"), self.seqlen, bos_id(tokenizer, self.add_bos),
                            self.max_tokens)

    def tokens(self, tokenizer) -> int:
        """Tokens one evaluation pushes through the model (every corpus' windows)."""
        return sum(self.windows(tokenizer, c).numel() for c in self.corpora.values())

    def run(self, model, tokenizer, label: str) -> dict[str, float]:
        return {name: perplexity(model, self.windows(tokenizer, c), self.batch_size, self.device,
                                 desc=f"{label} ppl {name}") for name, c in self.corpora.items()}

    def _key(self, model_fingerprint: str, tokenizer, name: str) -> str:
        c = self.corpora[name]
        ident = [model_fingerprint, c.fingerprint("test"), self.seqlen, self.max_tokens, self.add_bos,
                 len(tokenizer), str(self.device).split(":")[0]]
        return hashlib.md5(json.dumps(ident).encode()).hexdigest()

    def dense(self, model, tokenizer, model_fingerprint: str) -> dict[str, float]:
        """Dense perplexity, computed once per (model, corpus, protocol) and cached on disk."""
        out = {}
        for name, c in self.corpora.items():
            path = cache_dir() / "dense_ppl" / f"{self._key(model_fingerprint, tokenizer, name)}.json"
            if path.exists():
                out[name] = json.loads(path.read_text())["perplexity"]
                log.info("dense perplexity on %s: %.3f (cached)", name, out[name])
                continue
            out[name] = perplexity(model, self.windows(tokenizer, c), self.batch_size, self.device,
                                   desc=f"dense ppl {name}")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"perplexity": out[name], "model": model_fingerprint, "corpus": name,
                                       **self._protocol()}))
            tmp.replace(path)
        return out

    def _protocol(self) -> dict:
        return {"seqlen": self.seqlen, "max_tokens": self.max_tokens, "add_bos": self.add_bos,
                "device": str(self.device).split(":")[0]}

    def dense_cached(self, model_fingerprint: str) -> bool:
        """Whether :meth:`dense` would read every corpus from the cache (the plan then counts no dense pass),
        judged before any tokenizer loads: from the cached entries' model, corpus and protocol (entries written
        before they recorded the protocol count as absent)."""
        want = {"model": model_fingerprint, **self._protocol()}
        folder = cache_dir() / "dense_ppl"
        found = set()
        for path in folder.glob("*.json") if folder.is_dir() else ():
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if all(entry.get(k) == v for k, v in want.items()):
                found.add(entry.get("corpus"))
        return set(self.corpora) <= found


def check_finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise ElsaError(f"{what} is {value}: the model diverged")
