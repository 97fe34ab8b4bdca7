"""Corpora, token streams, calibration windows.

A corpus gives lists of documents per split ("train", "validation", "test"). Token streams are the
split's documents joined with the corpus' separator and tokenized once (cached on disk per tokenizer).
"""
from __future__ import annotations

import bz2
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch

from elsa.assets import cache_dir, installed_file, prepared
from elsa.errors import ElsaError, config_error

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
GENSIM = ("gensim", "4.4.0")
_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILE = "test/test_data/lee_background.cor"


def _bucket(key: str) -> str:
    """Deterministic document-level split: 15% test, 5% validation, 80% train."""
    b = int(hashlib.md5(key.encode()).hexdigest(), 16) % 100
    return "test" if b < 15 else "validation" if b < 20 else "train"


class Corpus:
    name: str = "corpus"
    join: str = "\n\n"

    def check(self) -> None:
        """Cheap checks before any expensive work (files exist, hub reachable)."""

    def documents(self, split: str) -> list[str]:
        raise NotImplementedError

    def fingerprint(self, split: str) -> str:
        return f"{self.name}-{split}"


def _clean_wiki(markup: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        # drop leftovers of tables, templates, categories and image captions
        if not line or line.startswith(("|", "!", "{", "}", "Category:", "thumb|")):
            continue
        heading = re.fullmatch(r"(=+)\s*([^=]+?)\s*\1", line)
        if heading:
            line = heading.group(2)
        line = re.sub(r"'{2,}", "", line)  # bold/italic quotes
        line = re.sub(r"\s+", " ", line)
        lines.append(line)
    return "\n".join(lines)


class EmbeddedCorpus(Corpus):
    """Real English text shipped inside PyPI packages (see shared/RESOURCES.md).

    source='wiki': 106 Wikipedia articles from gensim's test data; 'news': 300 Lee news documents.
    """

    def __init__(self, name: str, source: str, min_chars: int = 200):
        if source not in ("wiki", "news"):
            raise config_error("dataset.source", source, "one of wiki, news")
        self.name, self.source, self.min_chars = name, source, min_chars

    def _prepared(self) -> Path:
        key = f"corpora/{self.source}-v2"
        path = cache_dir() / key
        if path.exists():
            return path
        print(f"elsa: preparing the embedded '{self.source}' corpus (once) ...", flush=True)
        with prepared(key) as tmp:
            splits: dict[str, list[str]] = {s: [] for s in SPLITS}
            if self.source == "wiki":
                from gensim.corpora.wikicorpus import extract_pages

                src = installed_file("gensim", _WIKI_FILE, *GENSIM)
                with bz2.open(src, "rb") as fh:
                    for title, markup, _pageid in extract_pages(fh):
                        if markup.lstrip().lower().startswith("#redirect"):
                            continue
                        text = _clean_wiki(markup)
                        if len(text) >= self.min_chars:
                            splits[_bucket(title)].append(f"{title}\n{text}")
            else:
                src = installed_file("gensim", _NEWS_FILE, *GENSIM)
                for i, line in enumerate(src.read_text(encoding="utf-8", errors="replace").splitlines()):
                    line = line.strip()
                    if len(line) >= self.min_chars:
                        splits[_bucket(f"news-{i}")].append(line)
            for split, docs in splits.items():
                (tmp / f"{split}.json").write_text(json.dumps(docs))
        return path

    def documents(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise config_error("split", split, f"one of {', '.join(SPLITS)}")
        return json.loads((self._prepared() / f"{split}.json").read_text())

    def fingerprint(self, split: str) -> str:
        return f"{self.source}-v2-{split}"


HUB_ALTERNATIVE = "use dataset=wiki or dataset=news (embedded, offline)"


class HubCorpus(Corpus):
    """A Hugging Face dataset (needs internet on first use): wikitext2, c4, ...

    ``splits`` maps our split names to the dataset's; ``data_files`` pins shards (C4); ``max_docs``
    keeps the first documents of a split (C4 validation: 1100); ``text_field`` names the column.
    """

    def __init__(self, name: str, path: str, config_name: str | None = None, data_files: dict | None = None,
                 splits: dict | None = None, text_field: str = "text", join: str = "\n\n",
                 max_docs: dict | None = None):
        self.name, self.path, self.config_name = name, path, config_name
        self.data_files = dict(data_files) if data_files else None
        self.splits = dict(splits or {s: s for s in SPLITS})
        self.text_field, self.join = text_field, join
        self.max_docs = dict(max_docs or {})

    def check(self) -> None:
        from elsa.hub import require_hub

        require_hub(f"dataset {self.path}", HUB_ALTERNATIVE, cached=self._cached)

    def _cached(self) -> bool:
        """With HF_HUB_OFFLINE: the tokens of one of its splits are in elsa's cache (for any tokenizer), or the
        datasets library finds it in its local cache (resolving the builder reads no data)."""
        import datasets

        if any(any((cache_dir() / "tokens").glob(f"*/{self.fingerprint(s)}.pt")) for s in SPLITS):
            return True
        try:
            datasets.load_dataset_builder(self.path, self.config_name, data_files=self.data_files)
        except (ConnectionError, OSError, ValueError):
            return False
        return True

    def documents(self, split: str) -> list[str]:
        import datasets

        from elsa.hub import offline_errors

        try:
            ds = datasets.load_dataset(self.path, self.config_name, data_files=self.data_files,
                                       split=self.splits[split])
        except (ConnectionError, *offline_errors()) as exc:
            raise ElsaError(f"cannot reach the Hugging Face Hub to load dataset {self.path} "
                            f"({str(exc).splitlines()[0]}); "
                            f"{HUB_ALTERNATIVE}") from None
        docs = ds[self.text_field]
        if split in self.max_docs:
            docs = docs[: int(self.max_docs[split])]
        return list(docs)

    def fingerprint(self, split: str) -> str:
        h = hashlib.md5(json.dumps([self.path, self.config_name, self.data_files, self.splits, self.max_docs,
                                    self.join], sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.name}-{h}-{split}"


def tokenizer_key(tokenizer) -> str:
    ident = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer)])
    return hashlib.md5(ident.encode()).hexdigest()[:12]


def token_stream(tokenizer, corpus: Corpus, split: str) -> torch.Tensor:
    """The split's documents joined with the corpus separator, tokenized once (no special tokens)."""
    path = cache_dir() / "tokens" / tokenizer_key(tokenizer) / f"{corpus.fingerprint(split)}.pt"
    if path.exists():
        return torch.load(path)
    docs = corpus.documents(split)
    if not docs:
        raise ElsaError(f"dataset={corpus.name}: split '{split}' has no documents")
    # Tokenize per document (fast, batched) and join with the separator's tokens: identical to tokenizing
    # the joined text except at the document boundaries, where the separator forces a split anyway.
    sep = tokenizer(corpus.join, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
    for i, doc in enumerate(enc):
        if i:
            ids.extend(sep)
        ids.extend(doc)
    tokens = torch.tensor(ids, dtype=torch.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")     # two processes preparing it at once write apart
    torch.save(tokens, tmp)
    tmp.replace(path)
    return tokens


def windows(tokens: torch.Tensor, seqlen: int, bos: int | None, starts: list[int]) -> torch.Tensor:
    """Windows of ``seqlen`` tokens at the given starts; with a BOS id, BOS + seqlen-1 text tokens."""
    body = seqlen - (bos is not None)
    out = torch.stack([tokens[s:s + body].long() for s in starts])
    if bos is not None:
        out = torch.cat([torch.full((len(starts), 1), bos, dtype=torch.long), out], dim=1)
    return out


def sample_starts(n_tokens: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """``nsamples`` random window starts (seeded, independent of the global RNG)."""
    if n_tokens <= seqlen:
        raise ElsaError(f"seqlen={seqlen} is not allowed: the calibration split has only {n_tokens} tokens")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n_tokens - seqlen, (nsamples,), generator=g).tolist()


def eval_windows(tokens: torch.Tensor, seqlen: int, bos: int | None, max_tokens: int | None) -> torch.Tensor:
    """Non-overlapping windows covering the stream (at most ``max_tokens`` text tokens)."""
    body = seqlen - (bos is not None)
    n = len(tokens) if not max_tokens else min(len(tokens), int(max_tokens))
    count = n // body
    if count == 0:
        raise ElsaError(f"eval.max_tokens={max_tokens} is not allowed: fewer tokens than one window of seqlen={seqlen}")
    return windows(tokens, seqlen, bos, [i * body for i in range(count)])


class TrainWindows:
    """Non-overlapping ``seqlen`` windows of a token stream, visited in a seeded random order per epoch.

    Stateless in the step: micro-batch ``i`` is a pure function of (seed, i), so resuming needs only the
    step counter and the data position is exact.
    """

    def __init__(self, tokens: torch.Tensor, seqlen: int, batch_size: int, seed: int, bos: int | None):
        self.body = seqlen - (bos is not None)
        self.n = (len(tokens) - 1) // self.body
        if self.n < batch_size:
            raise ElsaError(f"seqlen={seqlen} is not allowed: the training split holds only {self.n} windows, "
                            f"fewer than method.batch_size={batch_size}")
        self.tokens, self.seqlen, self.batch_size, self.seed, self.bos = tokens, seqlen, batch_size, seed, bos
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def batch(self, index: int) -> torch.Tensor:
        """Micro-batch ``index`` (0, 1, 2, ...): (batch_size, seqlen) input ids."""
        rows = []
        for j in range(index * self.batch_size, (index + 1) * self.batch_size):
            w = int(self._order(j // self.n)[j % self.n])
            rows.append(self.tokens[w * self.body:(w + 1) * self.body].long())
        ids = torch.stack(rows)
        if self.bos is not None:
            ids = torch.cat([torch.full((len(rows), 1), self.bos, dtype=torch.long), ids], dim=1)
        return ids
