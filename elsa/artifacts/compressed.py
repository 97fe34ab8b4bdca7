"""A compressed checkpoint for pruned models: each tensor with zeros as a bitmask plus its non-zero values.

    python -m elsa.sparse compress <hf dir> <out dir> [--nm 2:4]
    python -m elsa.sparse expand <compressed dir> <out dir>      # a plain HF dir that from_pretrained loads
    python -m elsa.sparse info <compressed dir>

The format is generic over tensors: it never needs to know a model's layouts (Linear [out, in], Conv1D
[in, out], fused experts [experts, out, in]). It re-encodes, tensor by tensor, the safetensors files that
``save_pretrained`` wrote, so whatever transformers writes and reads (tied weights, checkpoint key conversions of
MoE models) round-trips unchanged. Every floating tensor is stored in the smallest of:

- ``dense``: as it is;
- ``bitmask``: one bit per element (``numpy.packbits``, big bit order, over the flattened tensor) and the non-zero
  values in the tensor's dtype, in row-major order;
- ``nm`` (when an N:M target is given and the pattern holds along the last dim): ``N`` values per group of ``M``
  (zeros padded where a group holds fewer) and, per value, its position in the group in ceil(log2 M) bits.

Zeros whose sign bit is set (-0.0, what ``w * mask`` leaves) are recorded aside (positions or a second bitmask,
whichever is smaller), so decoding is bit-identical for any input. The pipeline stores pruned zeros as +0.0
(:func:`save_model`; equal values), so its checkpoints carry no such record.

With the run's pruning plan (elsa.artifacts.plan_record: the index's ``plan`` entry, an HF dir's
pruning_plan.json, which ``compress`` reads) each tensor is encoded by its planned target instead: an N:M target in
its own ``nm`` layout, a ratio as ``bitmask``, a tensor the plan leaves dense or does not list ``dense``; a
planned tensor that does not hold its target takes the smallest encoding and is listed in the index's
``plan_fallback`` with the reason.

The dir holds the compressed shards (``model-0000i-of-0000n.safetensors``), ``elsa_compressed.json`` (format name,
version, per-tensor encoding, the original file layout, shard sizes and SHA-256) and every other file of the HF
dir (config.json, tokenizer files, the HF shard index) as they are, so the dir describes itself.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from elsa.artifacts import plan_record
from elsa.assets import atomic_dir
from elsa.errors import ElsaError

FORMAT = "elsa-compressed"
VERSION = 1
INDEX = "elsa_compressed.json"
SHARD_BYTES = 2 * 2**30          # compressed shards are cut at about this size
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# -- one tensor -----------------------------------------------------------------------------------------------
def nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """True where the element is not zero (NaN counts as a value; -0.0 is a zero, its sign kept aside)."""
    return t != 0


def negative_zeros(t: torch.Tensor) -> torch.Tensor:
    """True where the element is -0.0 (a zero whose sign bit is set: what ``w * mask`` leaves)."""
    return (t == 0) & torch.signbit(t)


def _pack_small_ints(idx: torch.Tensor, bits: int) -> np.ndarray:
    """Pack unsigned ints < 2**bits, ``bits`` bits each (little bit order), into bytes."""
    raw = np.unpackbits(idx.to(torch.uint8).numpy().reshape(-1, 1), axis=1, bitorder="little")[:, :bits]
    return np.packbits(raw.reshape(-1), bitorder="little")


def _unpack_small_ints(packed: np.ndarray, bits: int, count: int) -> torch.Tensor:
    raw = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return torch.from_numpy((raw * weights).sum(axis=1).astype(np.int64))


def nm_holds(t: torch.Tensor, n: int, m: int) -> bool:
    """At most ``n`` non-zeros in every group of ``m`` consecutive elements along the last dim."""
    if t.dim() < 1 or t.shape[-1] % m or not t.is_floating_point():
        return False
    return bool((nonzero_mask(t).reshape(-1, m).sum(1) <= n).all())


def _negzero_bytes(count: int, numel: int) -> int:
    """-0.0 positions: none, int32/int64 positions or a second bitmask, whichever is smaller."""
    return 0 if count == 0 else min(count * (4 if numel < 2**31 else 8), math.ceil(numel / 8))


def encoded_bytes(t: torch.Tensor, nm: tuple[int, int] | None = None) -> dict[str, int]:
    """Bytes each applicable encoding takes for ``t``."""
    item, numel = t.element_size(), t.numel()
    out = {"dense": numel * item}
    if t.is_floating_point() and numel:
        nnz = int(nonzero_mask(t).sum())
        signs = _negzero_bytes(int(negative_zeros(t).sum()), numel)
        out["bitmask"] = math.ceil(numel / 8) + nnz * item + signs
        if nm and nm_holds(t, *nm):
            n, m = nm
            kept = numel // m * n
            out["nm"] = kept * item + math.ceil(kept * max(1, math.ceil(math.log2(m))) / 8) + signs
    return out


def encode(name: str, t: torch.Tensor, nm: tuple[int, int] | None = None,
           encoding: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The stored tensors and the index entry of one tensor, in its smallest encoding (or ``encoding``)."""
    t = t.contiguous()
    sizes = encoded_bytes(t, nm)
    if encoding is None:  # ties go to the sparse encodings (what a sparse kernel reads); nm before bitmask
        encoding = min(sizes, key=lambda k: (sizes[k], {"nm": 0, "bitmask": 1, "dense": 2}[k]))
    elif encoding not in sizes:
        raise ElsaError(f"tensor {name}: encoding {encoding} does not apply (possible: {', '.join(sizes)})")
    meta = {"encoding": encoding, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if encoding == "dense":
        return {name: t}, meta
    mask = nonzero_mask(t)
    meta["nnz"] = int(mask.sum())
    stored = {}
    neg = negative_zeros(t).reshape(-1)
    count = int(neg.sum())
    if count:
        if count * (4 if t.numel() < 2**31 else 8) <= math.ceil(t.numel() / 8):
            pos = torch.nonzero(neg).reshape(-1)
            stored[f"{name}::negzero_positions"] = pos.to(torch.int32) if t.numel() < 2**31 else pos
        else:
            stored[f"{name}::negzero_bitmask"] = torch.from_numpy(np.packbits(neg.numpy()))
        meta["negzeros"] = count
    if encoding == "bitmask":
        stored[f"{name}::bitmask"] = torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))
        stored[f"{name}::values"] = t[mask]
        return stored, meta
    n, m = nm
    bits = max(1, math.ceil(math.log2(m)))
    groups = mask.reshape(-1, m)
    # N distinct positions per group: the kept ones first (stable order), then zero positions to fill the slots
    order = torch.sort((~groups).to(torch.int8), dim=1, stable=True).indices[:, :n]
    values = torch.gather(t.reshape(-1, m), 1, order)
    meta.update(n=n, m=m, index_bits=bits)
    stored[f"{name}::values"] = values.reshape(-1)
    stored[f"{name}::indices"] = torch.from_numpy(_pack_small_ints(order, bits))
    return stored, meta


STORED_SUFFIXES = ("", "::bitmask", "::values", "::indices", "::negzero_positions", "::negzero_bitmask")


def decode(name: str, stored: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    """The tensor back, bit for bit, from what :func:`encode` stored."""
    enc = meta.get("encoding")
    if enc == "dense":
        return stored[name]
    dtype = getattr(torch, meta["dtype"])
    shape = tuple(meta["shape"])
    numel = math.prod(shape)
    values = stored[f"{name}::values"]
    if enc == "bitmask":
        mask = torch.from_numpy(np.unpackbits(stored[f"{name}::bitmask"].numpy(), count=numel).astype(bool))
        if values.numel() != int(mask.sum()):
            raise ElsaError(f"compressed tensor {name}: {values.numel()} values for {int(mask.sum())} mask bits")
        out = torch.zeros(numel, dtype=dtype)
        out[mask] = values
    elif enc == "nm":
        n, m, bits = meta["n"], meta["m"], meta["index_bits"]
        idx = _unpack_small_ints(stored[f"{name}::indices"].numpy(), bits, values.numel()).reshape(-1, n)
        out = torch.zeros(numel // m, m, dtype=dtype)
        out.scatter_(1, idx, values.reshape(-1, n))   # a group's slots are distinct positions
        out = out.reshape(-1)
    else:
        raise ElsaError(f"compressed tensor {name}: unknown encoding {enc!r}")
    if f"{name}::negzero_positions" in stored:
        out[stored[f"{name}::negzero_positions"].long()] = -0.0
    elif f"{name}::negzero_bitmask" in stored:
        neg = np.unpackbits(stored[f"{name}::negzero_bitmask"].numpy(), count=numel).astype(bool)
        out[torch.from_numpy(neg)] = -0.0
    elif meta.get("negzeros"):
        raise KeyError(f"{name}::negzero_positions")
    return out.reshape(shape)


# -- a directory ------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def planned_encoding(t: torch.Tensor, entry: dict | None) -> tuple[tuple[int, int] | None, str | None, str | None]:
    """(N:M, encoding, why it is not the planned one) of a tensor under its entry of a pruning plan record
    (elsa.artifacts.plan_record; None: not listed): an N:M target's own nm layout, a ratio's bitmask, dense where
    the plan leaves it dense or does not list it. A planned tensor that does not hold its target gets encoding
    None (the size-based choice) and the reason, which the index records."""
    if entry is None or ("target" not in entry and "targets" not in entry) or not t.is_floating_point():
        return None, "dense", None
    parse = plan_record.parse_target
    targets = [None if v is None else parse(v) for v in entry.get("targets", [entry.get("target")])]
    if None in targets or (len(set(targets)) > 1 and any(s.is_nm for s in targets)):
        return None, None, "its parts have different targets (" + ", ".join(map(str, targets)) + ")"
    s = targets[0]
    if not s.is_nm:
        return None, "bitmask", None
    if entry.get("transposed"):
        return None, None, (f"planned {s}, stored [in, out]: its {s} groups run along the first dim, the nm "
                            "layout's along the last")
    if t.dim() < 1 or t.shape[-1] % s.m:
        return None, None, f"planned {s}, but its last dim {t.shape[-1] if t.dim() else 0} is not a multiple of {s.m}"
    bad = int((nonzero_mask(t).reshape(-1, s.m).sum(1) > s.n).sum())
    if bad:
        return None, None, f"planned {s}, but {bad} groups of {s.m} hold more than {s.n} non-zeros"
    return (s.n, s.m), "nm", None


def _encode_planned(key: str, t: torch.Tensor, nm, plan: dict | None, fallback: dict) -> tuple[dict, dict]:
    """encode() of one tensor: by its plan entry where there is a plan (a target it does not hold: the size-based
    choice, recorded in ``fallback``), else the smallest encoding."""
    if plan is None:
        return encode(key, t, nm)
    tnm, encoding, why = planned_encoding(t, plan["tensors"].get(key))
    if why is not None:
        fallback[key] = why
        return encode(key, t, nm)
    return encode(key, t, tnm, encoding)


def compress_dir(src: Path, out: Path, nm: tuple[int, int] | None = None, shard_bytes: int = SHARD_BYTES,
                 plan: dict | None = None) -> dict:
    """Write the compressed form of the HF dir ``src`` (what save_pretrained wrote) into ``out``; returns the
    index. ``plan``: the pruning plan record (elsa.artifacts.plan_record; default: ``src``'s pruning_plan.json
    if it has one), which sets each tensor's encoding (:func:`planned_encoding`) and is kept in the index's
    ``plan`` entry, the tensors that do not hold their target in ``plan_fallback``. Without a plan every tensor
    takes its smallest encoding; ``nm``: the N:M target, which lets the values+indices encoding compete where
    the pattern holds."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ElsaError(f"{src} holds no *.safetensors files (a dir written by save_pretrained is expected)")
    plan = plan_record.read_file(src) if plan is None else plan
    with atomic_dir(out, replace=True) as tmp:
        index = {"format": FORMAT, "version": VERSION, "nm": list(nm) if nm else None, "source_files": {},
                 "tensors": {}, "shards": {}}
        if plan is not None:
            index["plan"], index["plan_fallback"] = plan, {}
        pending, pending_bytes = {}, 0

        def flush():
            nonlocal pending, pending_bytes
            if not pending:
                return
            name = f"compressed-{len(index['shards']) + 1:05d}.safetensors"
            save_file(pending, str(tmp / name), metadata={"format": "pt", "elsa": FORMAT})
            for key in pending:
                index["tensors"][key.split("::")[0]]["file"] = name
            index["shards"][name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            pending, pending_bytes = {}, 0

        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                names = list(fh.keys())
                index["source_files"][f.name] = {"tensors": names, "metadata": fh.metadata() or {}}
                for key in names:
                    stored, meta = _encode_planned(key, fh.get_tensor(key), nm, plan, index.get("plan_fallback"))
                    size = sum(v.numel() * v.element_size() for v in stored.values())
                    if pending and pending_bytes + size > shard_bytes:
                        flush()
                    index["tensors"][key] = meta
                    pending.update(stored)
                    pending_bytes += size
        flush()
        for p in src.iterdir():            # config.json, tokenizer, generation config, the HF shard index ...
            if p.is_file() and p.suffix != ".safetensors":
                shutil.copy2(p, tmp / p.name)
        counts: dict[str, int] = {}
        for meta in index["tensors"].values():
            counts[meta["encoding"]] = counts.get(meta["encoding"], 0) + 1
        index["encodings"] = counts
        index["dense_bytes"] = sum(f.stat().st_size for f in files)
        index["compressed_bytes"] = sum(s["bytes"] for s in index["shards"].values())
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index


def read_index(path: Path) -> dict:
    """The index of a compressed dir, checked: one ElsaError line for anything that is not one we can read."""
    path = Path(path)
    if not path.is_dir():
        raise ElsaError(f"{path} is not a directory (a compressed model dir is expected)")
    f = path / INDEX
    if not f.is_file():
        hint = " (it is a plain HF dir: load it with from_pretrained)" if (path / "config.json").is_file() else ""
        raise ElsaError(f"{path} is not a compressed model dir: it holds no {INDEX}{hint}")
    try:
        index = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ElsaError(f"{f} is corrupt: not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ElsaError(f"{f} is not an {FORMAT} index (format={index.get('format') if isinstance(index, dict) else None!r})")
    if index.get("version") != VERSION:
        raise ElsaError(f"{path}: {FORMAT} format version {index.get('version')!r} is not known "
                        f"(this elsa reads version {VERSION})")
    for key in ("tensors", "shards", "source_files"):
        if not isinstance(index.get(key), dict):
            raise ElsaError(f"{f} is corrupt: no {key!r} table")
    return index


def _check_shards(path: Path, index: dict, verify: bool = True) -> None:
    for name, info in index["shards"].items():
        shard = path / name
        if not shard.is_file():
            raise ElsaError(f"{path}: shard {name} is missing")
        size = shard.stat().st_size
        if size != info.get("bytes"):
            raise ElsaError(f"{path}: shard {name} is corrupt ({size} bytes, the index says {info.get('bytes')})")
        if verify and _sha256(shard) != info.get("sha256"):
            raise ElsaError(f"{path}: shard {name} is corrupt (its SHA-256 differs from the index's)")


def _iter_files(path: Path, index: dict, verify: bool = True):
    """(source file name, {tensor name: decoded tensor}, metadata) for every file save_pretrained had written."""
    from safetensors import SafetensorError, safe_open

    _check_shards(path, index, verify)
    handles, keys = {}, {}
    try:
        for name in index["shards"]:
            try:
                handles[name] = safe_open(str(path / name), framework="pt").__enter__()
                keys[name] = set(handles[name].keys())
            except (SafetensorError, OSError) as exc:
                raise ElsaError(f"{path}: shard {name} is corrupt ({exc})") from None
        for fname, info in index["source_files"].items():
            tensors = {}
            for key in info["tensors"]:
                meta = index["tensors"].get(key)
                if meta is None or meta.get("file") not in handles:
                    raise ElsaError(f"{path}: tensor {key} is not in any shard of the index")
                h = handles[meta["file"]]
                stored = {key + k: h.get_tensor(key + k) for k in STORED_SUFFIXES if key + k in keys[meta["file"]]}
                try:
                    t = decode(key, stored, meta)
                except KeyError as exc:
                    raise ElsaError(f"{path}: tensor {key} is incomplete in {meta['file']} (no {exc})") from None
                if list(t.shape) != meta["shape"]:
                    raise ElsaError(f"{path}: tensor {key} decodes to {list(t.shape)}, the index says {meta['shape']}")
                tensors[key] = t
            yield fname, tensors, info.get("metadata") or {}
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def load_state_dict(path: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, decoded (the keys save_pretrained wrote)."""
    path = Path(path)
    index = read_index(path)
    out = {}
    for _fname, tensors, _meta in _iter_files(path, index, verify):
        out.update(tensors)
    return out


def expand(path: Path, out: Path, verify: bool = True) -> Path:
    """Write the plain HF dir of a compressed dir: the same safetensors files (names, tensors, metadata) that
    save_pretrained had written, and every other file as it is."""
    from safetensors.torch import save_file

    path, out = Path(path), Path(out)
    index = read_index(path)
    with atomic_dir(out, replace=True) as tmp:
        for fname, tensors, meta in _iter_files(path, index, verify):
            save_file(tensors, str(tmp / fname), metadata=meta or None)
        for p in path.iterdir():
            if p.is_file() and p.name != INDEX and p.name not in index["shards"]:
                shutil.copy2(p, tmp / p.name)
        if index.get("plan") is not None and not (tmp / plan_record.FILE).exists():
            plan_record.write_file(tmp, index["plan"])
    return out


def read_plan(path: Path) -> dict | None:
    """The pruning plan record saved with a model (elsa.artifacts.plan_record): a compressed dir's index ``plan``
    entry, or an HF dir's pruning_plan.json; None for a dir saved without one (an older dir, a plain HF dir)."""
    path = Path(path)
    if (path / INDEX).is_file():
        data = read_index(path).get("plan")
        return None if data is None else plan_record.check(data, str(path / INDEX))
    return plan_record.read_file(path)


def load_compressed(path: Path, dtype: torch.dtype | str | None = None, verify: bool = True, **kwargs):
    """The HF model of a compressed dir, its weights bit-identical to the model that was saved.

    Built by ``from_pretrained`` from the dir's config.json and the decoded state dict, so transformers applies
    the same key conversions and weight tying as when it loads the expanded dir."""
    from transformers import AutoConfig

    path = Path(path)
    sd = load_state_dict(path, verify)
    config = AutoConfig.from_pretrained(str(path))
    if dtype is None:
        dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), "auto")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ElsaError(f"{path}: transformers has no causal-LM class for config {type(config).__name__}") from None
    model = cls.from_pretrained(None, config=config, state_dict=sd, dtype=dtype, **kwargs)
    return model.eval()


def load_any(path: Path, dtype=None):
    """(model, tokenizer) of an HF dir or a compressed dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ElsaError(f"{path} is not a directory (an HF model dir or a compressed model dir is expected)")
    if (path / INDEX).exists():
        model = load_compressed(path, dtype)
    elif (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto").eval()
    else:
        raise ElsaError(f"{path} is neither an HF model dir (config.json) nor a compressed one ({INDEX})")
    return model, AutoTokenizer.from_pretrained(str(path))


def floor_bytes(index: dict) -> int:
    """The size the issue calls the floor: one bit per element of every tensor stored sparse, its non-zero values
    in its dtype, every other tensor as it is (the shards' headers not counted)."""
    total = 0
    for meta in index["tensors"].values():
        item = torch.empty((), dtype=getattr(torch, meta["dtype"])).element_size()
        numel = math.prod(meta["shape"])
        total += numel * item if meta["encoding"] == "dense" else math.ceil(numel / 8) + meta["nnz"] * item
    return total


def _say_fallback(out: Path, fallback: dict) -> None:
    """The tensors a plan's encoding could not take, said on stderr (the index keeps them all)."""
    key, why = next(iter(fallback.items()))
    more = f" (and {len(fallback) - 1} more)" if len(fallback) > 1 else ""
    print(f"elsa: {out}: {len(fallback)} tensors not in their planned encoding, stored by size instead (the "
          f"index's plan_fallback); {key}: {why}{more}", file=sys.stderr)


def _parse_nm(value: str | None):
    if not value:
        return None
    from elsa.sparsity.patterns import Sparsity

    s = Sparsity.parse(value)
    return (s.n, s.m) if s.is_nm else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elsa.sparse", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compress", help="compress an HF dir (save_pretrained output)")
    c.add_argument("src", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--nm", default=None, help="the N:M target (2:4) so that N:M tensors may use values+indices")
    e = sub.add_parser("expand", help="write the plain HF dir of a compressed dir")
    e.add_argument("src", type=Path)
    e.add_argument("out", type=Path)
    i = sub.add_parser("info", help="sizes and encodings of a compressed dir")
    i.add_argument("src", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "compress":
            index = compress_dir(args.src, args.out, _parse_nm(args.nm))
            print(f"{args.out}: {index['compressed_bytes'] / 1e6:.1f} MB of shards for {index['dense_bytes'] / 1e6:.1f} "
                  f"MB dense; encodings {index['encodings']}")
            if index.get("plan_fallback"):
                _say_fallback(args.out, index["plan_fallback"])
        elif args.cmd == "expand":
            if args.out.exists() and any(args.out.iterdir()):
                raise ElsaError(f"{args.out} exists and is not empty (expand writes a new dir)")
            expand(args.src, args.out)
            print(f"{args.out}: a plain HF dir (from_pretrained loads it)")
        else:
            index = read_index(args.src)
            _check_shards(args.src, index)
            fl = floor_bytes(index)
            print(json.dumps({"dense_bytes": index["dense_bytes"], "compressed_bytes": index["compressed_bytes"],
                              "floor_bytes": fl, "over_floor": index["compressed_bytes"] / fl - 1,
                              "dir_bytes": dir_bytes(args.src), "encodings": index["encodings"],
                              "pruning_plan": index.get("plan") is not None,
                              "plan_fallback": index.get("plan_fallback")}, indent=1))
    except ElsaError as exc:
        print(f"elsa: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


SAVE_FORMATS = ("hf", "compressed", "both")


def check_save_format(value) -> str:
    from elsa.errors import config_error

    if value not in SAVE_FORMATS:
        raise config_error("save_format", value, "hf (<run dir>/model, zeros baked in), compressed "
                           "(<run dir>/model_compressed: bitmask + non-zero values) or both")
    return value


def save_model(model, tok, out: Path, fmt: str, nm: tuple[int, int] | None = None, plan=None) -> dict:
    """Save a run's model as ``fmt`` (hf, compressed, both) under ``out``; returns what results.json records.
    ``plan``: the run's PruningPlan, recorded beside the weights (the HF dir's pruning_plan.json, the compressed
    index's ``plan``: elsa.artifacts.plan_record), which sets each tensor's compressed encoding."""
    out = Path(out)
    with torch.no_grad():   # -0.0 (w * mask) -> +0.0: the same values, and no sign-of-zero record to store
        for p in model.parameters():
            if p.is_floating_point():
                p.masked_fill_(p == 0, 0.0)
    hf = out / "model" if fmt in ("hf", "both") else Path(tempfile.mkdtemp(prefix=".model_hf.", dir=out))
    try:
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
        record = plan_record.record(plan, model) if plan is not None else None
        if record is not None:
            plan_record.write_file(hf, record)
        rec = {"save_format": fmt}
        if record is not None and record.get("unmapped"):   # their saved keys are unknown: stored as unlisted
            rec["plan_unmapped"] = record["unmapped"]
            print(f"elsa: the saved keys of {len(record['unmapped'])} planned parameters were not found "
                  f"(e.g. {record['unmapped'][0]}): the pruning plan does not list them", file=sys.stderr)
        if fmt in ("hf", "both"):
            rec["model_dir"] = str(hf)
        if fmt in ("compressed", "both"):
            index = compress_dir(hf, out / "model_compressed", nm, plan=record)
            rec["compressed"] = {"dir": str(out / "model_compressed"), "mb": dir_bytes(out / "model_compressed") / 1e6,
                                 "hf_mb": dir_bytes(hf) / 1e6, "shards_mb": index["compressed_bytes"] / 1e6,
                                 "dense_shards_mb": index["dense_bytes"] / 1e6, "floor_mb": floor_bytes(index) / 1e6,
                                 "encodings": index["encodings"]}
            if index.get("plan_fallback"):
                rec["compressed"]["plan_fallback"] = index["plan_fallback"]
                _say_fallback(out / "model_compressed", index["plan_fallback"])
    finally:
        if fmt == "compressed":
            shutil.rmtree(hf, ignore_errors=True)
    return rec
