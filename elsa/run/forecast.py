"""The plan of a run before any weight loads: predicted time and peak memory per phase.

    python -m elsa.plan <the same overrides as run.py>      # e.g. model=shapes model.like=llama2-7b method=sparsegpt

The model is built on the meta device from its config (no weight is read); the targets and ignores are applied
as the run would; every phase (load, calibration, the method's per-block work or training steps, evaluation,
save) gets a predicted time on this machine and a peak memory: resident on the CPU, and per GPU for
``hardware=gpu`` and ``hardware=fsdp`` (``--ranks N``).

Time: FLOPs (and bytes for memory-bound loops) over rates measured once on this machine at the run's thread
count (a matmul, a rank-1 update, a Cholesky and a random fill, ~2 s; cached under the elsa cache dir). Memory:
the shapes, the walk's held activations, and each method's declared state (:data:`COSTS`, keyed by the method's
class, looked up along its MRO). run.py runs the same plan first (:func:`check_run`), prints its one-line forecast
and refuses a run whose peak exceeds the machine's memory or ``hardware.memory_gb``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

GB = 1024 ** 3
GPU_REFERENCE = {"name": "one 80 GB GPU (reference: fp32 matmul at 15 TFLOP/s sustained, A100-class without TF32)",
                 "memory_gb": 80.0, "rates": {"mm": 15e12, "rank1": 2e11, "chol": 5e12, "fill": 5e10,
                           "svd": 2e10},    # assumed: a 4096^2 SVD in ~3 s (cuSOLVER is far below matmul rate)
                 "context_gb": 0.5}


# ---------------------------------------------------------------------------------------------------------
# rates of this machine


def _rss_gb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return 0.5


def machine_memory_gb() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return float("inf")


def _time(fn, repeat: int = 3, threads: int = 1) -> float:
    """The best of ``repeat`` calls in CPU seconds of this process per thread: on a shared machine the wall
    clock counts the other jobs' time slices; the plan applies the load's share separately (Plan.share)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, (time.process_time() - t) / threads)
    return max(best, 1e-9)


def probe(threads: int) -> dict:
    """FLOP/s of a 1024 matmul and a 1024 Cholesky at ``threads`` threads; of SparseGPT's rank-1 column update
    (128 x 4096, one thread: the loop runs single-threaded) and elements/s of a normal fill (a random init).
    Rates of an unshared machine: measured in CPU time (see :func:`_time`)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        mm = 2 * 1024 ** 3 / _time(lambda: a @ b, 3, threads)
        spd = a @ a.t() + 1024 * torch.eye(1024)
        chol = 1024 ** 3 / 3 / _time(lambda: torch.linalg.cholesky(spd), 3, threads)
        buf = torch.empty(16 * 2 ** 20)
        fill = buf.numel() / _time(lambda: buf.normal_(0, 0.02), 2)
        step = _time(_mlp_step(False), 2, threads) / _time(_mlp_step(True), 2, threads)
        tall = torch.randn(1024, 512)
        svd = 1024 * 512 * 512 / _time(lambda: torch.linalg.svd(tall, full_matrices=False), 2, threads)
        torch.set_num_threads(1)
        w, u, e = torch.randn(128, 4096), torch.randn(128), torch.randn(4096)
        rank1 = 2 * w.numel() / _time(lambda: w.addr_(u, e, alpha=-1.0), 20)
    finally:
        torch.set_num_threads(before)
    return {"mm": mm, "chol": chol, "rank1": rank1, "fill": fill, "bf16_step": step, "svd": svd}


def _mlp_step(bf16: bool, tokens: int = 512, width: int = 1024):
    """A training step's matmul part in miniature: forward and backward of a gated MLP (1024 -> 2816 -> 1024, the
    decoder's proportions) over 512 tokens, in fp32 or under bf16 autocast with fp32 weights (the casts, the
    fp32 elementwise work and the gradients' fp32 accumulation included, which is why a training step gains far
    less from bf16 than a bare matmul: ~2x against ~8x on this CPU)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=gen)
    up, gate = (torch.randn(width, 2816, generator=gen).mul_(0.02).requires_grad_() for _ in range(2))
    down = torch.randn(2816, width, generator=gen).mul_(0.02).requires_grad_()

    def go():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = (torch.nn.functional.silu(x @ gate) * (x @ up)) @ down
        y.float().square().mean().backward()
        for w in (up, gate, down):
            w.grad = None
    return go


def rates(threads: int, refresh: bool = False) -> dict:
    """This machine's rates at ``threads`` (cached per CPU model and thread count: ``<cache>/plan/rates.json``)."""
    from elsa.assets import cache_dir
    from elsa.machine import cpu_id, cpu_name

    path = cache_dir() / "plan" / "rates.json"
    key = f"cputime4-{cpu_id()}-{threads}t"   # 4: keyed by the CPU itself (name, flags, cores: machine.cpu_id)
    cached = json.loads(path.read_text()) if path.exists() else {}
    if key in cached and not refresh:
        return cached[key]
    cached[key] = probe(threads) | {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                    "load": round(os.getloadavg()[0], 2), "cpu": cpu_name()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")      # FSDP ranks may probe at once
    tmp.write_text(json.dumps(cached, indent=1))
    tmp.replace(path)
    return cached[key]


# ---------------------------------------------------------------------------------------------------------
# the model's shapes, from the meta device


@dataclass
class Shapes:
    """What the plan knows of the model: counts in elements, sizes in features."""

    dtype_bytes: int
    params: int                       # every parameter of the built model (tied once)
    outside: int                      # embeddings, final norm, lm_head
    block_params: int                 # one decoder block (block 0)
    blocks: int                       # built
    layers: int                       # the full model's depth (a rehearsal's extrapolation; = blocks otherwise)
    hidden: int
    heads: int
    head_dim: int
    vocab: int
    matrices: list = field(default_factory=list)   # block 0: (name, out, in, share of tokens it sees)
    groups: list = field(default_factory=list)     # in_features of each statistics group (shared inputs: one)
    mlp: int = 0                      # the widest matrix input of the block's MLP (intermediate size)
    mlp_token: float = 0.0            # MLP intermediate features per token (MoE: top-k x the expert's)
    eager: bool = False               # eager attention (scores materialised)
    prunable: int = 0                 # prunable weights of the whole built model
    group_experts: list = field(default_factory=list)   # the expert of each statistics group (None: not an expert)
    experts: dict = field(default_factory=dict)          # matrix name -> its expert index (fused experts) or None

    def one_expert(self) -> "Shapes":
        """Block 0 as ``hardware.low_memory`` walks it at its peak: the matrices outside the fused experts and
        one expert's (the walk collects and prunes the experts one at a time)."""
        from dataclasses import replace

        keep = [e is None or e == 0 for e in self.group_experts]
        return replace(self, matrices=[m for m in self.matrices if self.experts.get(m[0]) in (None, 0)],
                       groups=[g for g, k in zip(self.groups, keep) if k],
                       group_experts=[e for e, k in zip(self.group_experts, keep) if k])

    @property
    def largest(self) -> int:
        """Elements of block 0's largest prunable matrix."""
        return max(o * i for _n, o, i, _s in self.matrices)

    @property
    def expert_count(self) -> int:
        """The fused experts of block 0 (0: none)."""
        return len({e for e in self.group_experts if e is not None})

    def block_flops(self, tokens: int, seqlen: int) -> float:
        """Forward FLOPs of one block over ``tokens`` tokens in windows of ``seqlen``."""
        matmul = 2 * tokens * sum(o * i * share for _n, o, i, share in self.matrices)
        attention = 2 * tokens * seqlen * self.heads * self.head_dim     # QK^T and AV, causal half
        return matmul + attention

    def activation_bytes(self, tokens: int) -> float:
        """A block forward's transient activations for ``tokens`` tokens (float32): attention's q/k/v/out and
        the MLP's widest intermediates (gate, up, act, product for the routed share)."""
        return 4 * tokens * (6 * self.hidden + 4 * self.mlp_token)


def _meta_model(source):
    from transformers import AutoModelForCausalLM

    cfg = source.hf_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return model, cfg


def _shares(block, matrices) -> dict[str, float]:
    """The share of tokens each matrix sees: 1, or top-k / experts for the experts of an MoE layer."""
    from elsa.model.structure import in_moe

    cfg_k = None
    for mod in block.modules():
        k = getattr(mod, "top_k", None) or getattr(mod, "num_experts_per_tok", None)
        if isinstance(k, int):
            cfg_k = k
    out = {}
    for name, m in matrices.items():
        experts = m.source.experts
        if in_moe(block, name.path, name.expert) and cfg_k:
            n = experts or max(len(x) for x in block.modules() if isinstance(x, torch.nn.ModuleList))
            out[name] = cfg_k / n
        else:
            out[name] = 1.0
    return out


def _groups(model, block, matrices) -> list[tuple[int, int | None]]:
    """Statistics groups as the engine forms them: one per input tensor the block's Linears are fed (q/k/v share
    one, gate/up one), found by a forward on the meta device with hooks; a matrix the meta forward did not reach
    (fused experts: their routing reads data) and every expert matrix has its own. (in_features, expert index
    of a fused expert tensor's matrix or None) per group."""
    linears = {n: m.source.module for n, m in matrices.items()
               if m.expert is None and isinstance(m.source.module, torch.nn.Linear)}
    seen: dict[str, int] = {}
    held: list[torch.Tensor] = []      # every input stays alive: a freed tensor's id can be reused by the next

    def hook(name):
        def fn(_m, args, _o):          # returns None: a forward hook's return value would replace the output
            held.append(args[0])
            seen.setdefault(name, id(args[0]))
        return fn
    handles = [mod.register_forward_hook(hook(n)) for n, mod in linears.items()]
    try:
        model(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta"))
    except Exception:               # noqa: BLE001 - data-dependent routing on meta: the experts stay unseen
        pass
    finally:
        for h in handles:
            h.remove()
    groups: dict[object, tuple[int, int | None]] = {}
    for name, m in matrices.items():
        groups.setdefault(seen.get(name, name), (m.in_features, m.expert))
    return list(groups.values())


def model_shapes(source, ignore=(), targets=()) -> Shapes:
    from elsa.sparsity.plan import PruningPlan
    from elsa.sparsity.patterns import Sparsity

    model, cfg = _meta_model(source)
    plan = PruningPlan.build(model, Sparsity(ratio=0.5), ignore, targets)   # the shapes do not depend on the ratio
    blocks = plan.blocks
    block = blocks[0]
    mats = plan.block(0).matrices()
    shares = _shares(block, mats)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    block_params = sum(p.numel() for p in block.parameters())
    first = next(iter(model.parameters()))
    hidden = int(getattr(cfg, "hidden_size", 0) or first.shape[-1])
    heads = int(getattr(cfg, "num_attention_heads", 1))
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    # the MLP's inputs: matrix inputs that are neither the hidden size nor the heads' output (o_proj's input)
    mlp_in = {n: m.in_features for n, m in mats.items() if m.in_features not in (hidden, heads * head_dim)}
    groups = _groups(model, block, mats)
    return Shapes(dtype_bytes=getattr(source, "dtype", torch.float32).itemsize, params=total,
                  outside=total - block_params * len(blocks), block_params=block_params, blocks=len(blocks),
                  layers=int(getattr(source, "layers", len(blocks))), hidden=hidden, heads=heads, head_dim=head_dim,
                  vocab=int(getattr(cfg, "vocab_size", 0)),
                  matrices=[(n.local, m.out_features, m.in_features, shares[n]) for n, m in mats.items()],
                  groups=[g for g, _e in groups], group_experts=[e for _g, e in groups],
                  experts={n.local: n.expert for n in mats}, mlp=max(mlp_in.values(), default=hidden),
                  mlp_token=sum(i * shares[n] for n, i in mlp_in.items()) or hidden,
                  eager=getattr(cfg, "_attn_implementation", None) == "eager",
                  prunable=sum(m.out_features * m.in_features for _i, m, _t in plan.matrices()))


# ---------------------------------------------------------------------------------------------------------
# work and the methods' declarations


@dataclass
class Work:
    """FLOPs by the rate that runs them: ``mm`` matmuls at the run's threads, ``mm1`` / ``chol1`` matmuls and
    factorisations inside single-threaded loops (SparseGPT's), ``chol`` factorisations at the run's threads,
    ``vec`` vector / elementwise / sort work (the rank-1 update's rate), ``svd`` thin SVDs at the run's threads in
    units of rows x cols x min(rows, cols) (a 1024 x 512 SVD's rate: OATS's SVDs of 576-4096-wide matrices took
    0.5-1.2x this model's time on this CPU)."""

    mm: float = 0.0
    mm1: float = 0.0
    chol: float = 0.0
    chol1: float = 0.0
    vec: float = 0.0
    svd: float = 0.0

    def __add__(self, o: "Work") -> "Work":
        return Work(*(a + b for a, b in zip(vars(self).values(), vars(o).values())))

    def __mul__(self, k: float) -> "Work":
        return Work(*(a * k for a in vars(self).values()))

    def seconds(self, r: dict, r1: dict) -> float:
        return (self.mm / r["mm"] + self.chol / r["chol"] + self.mm1 / r1["mm"] + self.chol1 / r1["chol"]
                + self.vec / r1["rank1"] + (self.svd / r["svd"] if self.svd else 0.0))


@dataclass
class BlockCost:
    """A layer-wise method's declaration for one block: bytes held through the block (statistics), bytes of
    its largest transient work, and its FLOPs beyond the engine's walk."""

    held: float
    work: float
    flops: Work
    note: str = ""
    lean: "BlockCost | None" = None   # under hardware.low_memory, when the method streams state of its own
    disk: float = 0.0                 # bytes it then writes and reads on disk per block
    disk_held: float = 0.0            # bytes of its files on disk at once (under the walk's temporary dir)


# a decoder block's elementwise work (norms, rotary, the gated activation, residuals, the attention's reshapes)
# in vector FLOPs at the rank-1 rate per token and feature (hidden + the MLP's per-token intermediate): a Llama
# block's forward, one thread, CPU time, took 7.5-10.8 ns per token and feature more than its matmuls and
# attention at the probed matmul rate (d = 576, 1024, 4096; /tmp script, 2026-12-05 23:19 UTC): ~9 ns at
# 20 GFLOP/s. Small at 7B widths (~3% of a block), ~40% of a forward at the default model's 576
FORWARD_VEC = 180.0
# the re-run's error measure (LayerwiseEngine._rerun_measuring): two float64-accumulated squared norms of each
# matrix's outputs, ~7.7 ns an output element at 7B widths (memory bound), ~1.9 at the default model's
ERROR_VEC = 120.0

# the unit OATS's alternations (OATS_PASSES) and the training methods' per-step masks were fitted in: vector FLOPs
# per element at the rank-1 rate (~15 ns at 20 GFLOP/s); a layer-wise method's top-k mask is topk_vec below
SORT = 300.0


def topk_vec(elements: int) -> float:
    """A 50% top-k mask of a matrix of ``elements`` (whole-matrix or row-wise alike), vector FLOPs per element
    at the rank-1 rate: measured (one thread, CPU time, 2026-12-06 00:15 UTC, rank-1 rate 19.6 GFLOP/s)
    15-22 ns an element at 576 x 576 and 1536 x 576, 26-28 ns at 4096 x 4096 to 11008 x 4096: ~350 and ~550,
    between them by the log of the size (the llama2-7b magnitude block: 6 CPU-s where SORT alone said 3)."""
    low, high = 350.0, 550.0
    t = min(1.0, max(0.0, (math.log2(max(elements, 1)) - 20) / 4))     # 1M elements -> 0, 16M -> 1
    return low + (high - low) * t


def _hessians(S: Shapes) -> float:
    return 4.0 * sum(g * g for g in S.groups)


def _accumulate(S: Shapes, T: int) -> Work:
    """H += x^T x over T tokens for every statistics group (an expert's group: its routed share)."""
    share = {i: s for _n, _o, i, s in S.matrices}
    return Work(mm=sum(2.0 * T * share.get(g, 1.0) * g * g for g in S.groups))


def _sparsegpt_matrix(rows: int, cols: int, blocksize: int = 128) -> Work:
    """SparseGPT on one matrix (one thread): chol + inverse + chol (4/3 n^3), the lazy batch updates
    (rows x cols^2) and the in-block rank-1 updates (blocksize x rows x cols)."""
    return Work(chol1=4.0 / 3 * cols ** 3, mm1=float(rows) * cols * cols, vec=float(blocksize) * rows * cols)


def _sparsegpt_work(S: Shapes, names=None) -> tuple[Work, float]:
    mats = [(o, i) for n, o, i, _s in S.matrices if names is None or n in names]
    work = sum((_sparsegpt_matrix(o, i) for o, i in mats), Work())
    peak = max((4.0 * (4 * i * i + 3 * o * i) for o, i in mats), default=0.0)
    return work, peak


def wanda_cost(m, S: Shapes, T: int) -> BlockCost:
    biggest = S.largest
    return BlockCost(held=4.0 * sum(S.groups), work=4.0 * 4 * biggest,
                     flops=Work(vec=sum(3.0 * T * s * i for _n, _o, i, s in S.matrices) +
                                sum(topk_vec(o * i) * o * i for _n, o, i, _s in S.matrices)))


def dsnot_cost(m, S: Shapes, T: int) -> BlockCost:
    """Its base's scores (Wanda's statistics, or SparseGPT's Hessians and solve), then up to ``cycles`` grow /
    prune swaps per row over sorted candidates on every matrix it refines (attention only with skip=mlp)."""
    base = sparsegpt_cost(m, S, T) if m.base == "sparsegpt" else wanda_cost(m, S, T)
    refined = [(o, i) for n, o, i, _s in S.matrices if not (m.skip == "mlp" and S.mlp in (o, i))]
    swaps = Work(vec=sum((60.0 + 10.0 * m.cycles) * o * i for o, i in refined))
    return BlockCost(base.held, base.work + 4.0 * 4 * S.largest,
                     base.flops + swaps, f"{len(refined)} of {len(S.matrices)} matrices refined")


# OATS's work per alternation and weight outside its matmuls and SVDs: the row-wise top-k of the sparse part and
# the alternation's elementwise passes (residuals, abs, mask, error norm, the top-k's copies). Measured on one
# subspace alternation of a 4096 x 11008 matrix at 50%, one thread, CPU time (torch.profiler, 2026-12-05 17:57
# UTC): 2.7 s of 4.3, 60 ns a weight, the top-k ~48 ns of it: 4 x SORT at the cached rank-1 rate (20 GFLOP/s).
# The llama2-7b cell (subspace, 80 alternations) had used 1,640 CPU-s where the plan, at SORT alone and without
# the rank-r product of every alternation, said 840.
OATS_PASSES = 4 * SORT


def oats_cost(m, S: Shapes, T: int) -> BlockCost:
    """Wanda's statistics, then per matrix ``iters`` alternations of a rank-r SVD (exact each time, or exact at
    the first and last with one subspace step between: ``method.svd``), the low-rank product, and a per-row
    top-k of the rest."""
    work = Work()
    for _n, o, i, _s in S.matrices:
        rank = max(1, int(m.rank_ratio * 0.5 * o * i / (o + i)))       # the rank at 50%
        k = rank + 10                                                    # with the subspace's oversampling
        exact = m.iters if m.svd == "exact" else min(m.iters, 2)
        work += Work(svd=exact * float(o) * i * min(o, i), vec=m.iters * OATS_PASSES * o * i,
                     mm=m.iters * 2.0 * o * i * rank + (m.iters - exact) * (4.0 * o * i * k + 2.0 * k * k * o))
    biggest = S.largest
    return BlockCost(held=4.0 * sum(S.groups), work=4.0 * 7 * biggest, flops=work +
                     wanda_cost(m, S, T).flops, note=f"{m.iters} SVD alternations per matrix ({m.svd})")


def safe_cost(m, S: Shapes, T: int) -> BlockCost:
    """SAFE trains each block on its calibration inputs: ``epochs`` passes over all T tokens, each step a forward
    and backward at w and, with SAM (rho > 0), a second one at the perturbed weights; before them one forward for
    the dense block's outputs, and three more for the block's MSE (projected z0, trained, final). It holds the
    dense outputs (T x hidden) and Adam's moments, z, u and a copy of the weights (24 B a weight); a batch's
    activations are the walk's transient (Adam's per-step work, ~5 / batch tokens of the matmuls', is left out).
    Without the SAM pass and the four forwards the plan was half the measured time of a llama2-7b block (9 min
    planned, 15 min to the block's end)."""
    params = sum(o * i for _n, o, i, _s in S.matrices)
    passes = m.epochs * (2 if m.rho > 0 else 1) * 3 + 4      # forward = 1, backward = 2 matmul passes
    return BlockCost(held=4.0 * T * S.hidden + 24.0 * params, work=0.0,
                     flops=Work(mm=passes * 2.0 * T * sum(o * i * s for _n, o, i, s in S.matrices)),
                     note=f"{m.epochs} epochs of training per block" + (" (SAM: two passes a step)"
                                                                          if m.rho > 0 else ""))


def magnitude_cost(m, S: Shapes, T: int) -> BlockCost:
    biggest = S.largest
    return BlockCost(held=0.0, work=4.0 * 4 * biggest,
                     flops=Work(vec=sum(topk_vec(o * i) * o * i for _n, o, i, _s in S.matrices)))


def sparsegpt_cost(m, S: Shapes, T: int) -> BlockCost:
    work, peak = _sparsegpt_work(S)
    return BlockCost(held=_hessians(S), work=peak, flops=_accumulate(S, T) + work)


def sparsellm_cost(m, S: Shapes, T: int) -> BlockCost:
    """SparseGPT on attention; the MLP's auxiliary problem holds X, Y (T x d) and S, U, P, XW_1, XW_u (T x I)
    for every calibration token, with ~3 more T x I and ~6 I x I during an alternation. With
    hardware.low_memory (``lean``) those per-token variables wait on disk in chunks of TOKEN_CHUNK tokens, one
    chunk of each (and a chunk's new values and temporaries: 2 d + 10 I per token) resident, read and written
    ~(5 d + 20 I) x 4 B per token and alternation."""
    from elsa.methods.sparsellm import TOKEN_CHUNK

    d, I, k = S.hidden, S.mlp, m.iterations
    if any(share < 1 for *_x, share in S.matrices):   # MoE: no MLP it models (refused, or SparseGPT's fallback)
        return sparsegpt_cost(m, S, T)
    mlp = {n for n, _o, i, _s in S.matrices if i == I} | \
          {n for n, o, _i, _s in S.matrices if o == I}
    attn_work, attn_peak = _sparsegpt_work(S, {n for n, *_ in S.matrices} - mlp)
    refit = _sparsegpt_matrix(I, d) * 2 + _sparsegpt_matrix(d, I)
    per_alt = Work(mm=2 * I * I * d + 2 * T * d * I * 9 + 2 * T * I * I * 2 + 4 * I * I * d,
                   chol=2 * I ** 3 + d ** 3, vec=200.0 * T * I) + refit
    once = Work(mm=2 * T * d * d + 2 * T * I * I + 6 * T * d * I) + refit
    fixed = _hessians(S) + 4.0 * 6 * I * d
    work, flops = max(attn_peak, 4.0 * 6 * I * I), _accumulate(S, T) + attn_work + per_alt * k + once
    note = f"{k} alternations over all {T:,} tokens"
    # refit=reference forms X's pseudo-inverse (T x d) and the down projection's input A's (T x I, its SVD) whole
    whole = 4.0 * T * (2 * d + 3 * I) if m.recipe.refit == "reference" else 0.0
    chunk = min(T, TOKEN_CHUNK)
    on_disk = 4.0 * T * (2 * d + 5 * I)
    lean = BlockCost(held=fixed + 4.0 * chunk * (2 * d + 10 * I) + whole, work=work, flops=flops,
                     note=f"{note}; hardware.low_memory: the MLP's per-token variables on disk "
                          f"({on_disk / GB:.1f} GB), {chunk:,} tokens of each resident",
                     disk=on_disk + 4.0 * T * (k * (5 * d + 20 * I) + 2 * d + I), disk_held=on_disk)
    return BlockCost(held=fixed + 4.0 * T * (2 * d + 7 * I), work=work, flops=flops, note=note, lean=lean)


def _admm_cost(S: Shapes, T: int, iters: int, pcg_iters: int, note: str) -> BlockCost:
    """Per matrix: eigendecomposition of H, then ``iters`` ADMM iterations of two matmuls with the eigenvectors
    (4 rows n^2) and a top-k, then PCG (2 rows n^2 per iteration). torch.linalg.eigh took 2.1-2.5 n^3 at the
    probe's Cholesky rate here (one thread, n = 2048 and 4096: 0.64 s and 4.46 s), so 3 n^3 of it."""
    work = Work()
    for _n, o, i, _s in S.matrices:
        work += Work(chol=3.0 * i ** 3, mm=(4.0 * iters + 2.0 * pcg_iters) * o * i * i,
                     vec=topk_vec(o * i) * iters * o * i)
    peak = max(4.0 * (5 * i * i + 10 * o * i) for _n, o, i, _s in S.matrices)
    return BlockCost(held=_hessians(S), work=peak, flops=_accumulate(S, T) + work, note=note)


# ALPS stops when a support check finds no change, which its growing rho forces within tens of iterations: the mean
# over a run's matrices was 21.4 on one llama2-7b-shaped block at 50% (16 x 2048 tokens; 2048 s against a plan of
# 2.4 h at max_iters), 31.5 on the tiny test model and 30.9 on a Phi-3-shaped one (results.json
# method_stats.admm_iterations_mean). The plan counts this many, and names max_iters as the bound.
ALPS_TYPICAL_ITERS = 30


def alps_cost(m, S: Shapes, T: int) -> BlockCost:
    """ALPS: its typical ADMM iterations per matrix (``ALPS_TYPICAL_ITERS``, or max_iters when lower); the note
    gives the time bound at max_iters."""
    iters = min(ALPS_TYPICAL_ITERS, m.max_iters)
    note = f"{iters} ADMM iterations per matrix, as ALPS typically stops (at most {m.max_iters})"
    return _admm_cost(S, T, iters, m.pcg_iters, note)


def ladmm_cost(m, S: Shapes, T: int) -> BlockCost:
    """L-ADMM: its ``iters`` ADMM iterations per matrix (the mask grown over the first ``grow_iters``), then the
    PCG refit when ``refit``."""
    return _admm_cost(S, T, m.iters, m.pcg_iters if m.refit else 0, f"{m.iters} ADMM iterations per matrix")


# the optimizers: state bytes per trainable weight, vector FLOPs per weight and step (at the rank-1 rate), the
# step's transient bytes per weight and a one-time setup (CPU s). Fitted to measured runs (docs/results.md, issue
# 27): on a 51 M-parameter llama2-7b-shaped rehearsal (4 narrow blocks, 10 steps) both held ~12 B per weight
# more than their state at the peak (AdamW's foreach temporaries; AdamW8bit's de-quantised moments); torchao's
# AdamW8bit cost ~30 CPU-s once (its compiled step) and, on the default model's field runs (ELSA-L against
# ELSA, 60 steps), ~300 vector FLOPs per weight and step more than AdamW.
OPTIMIZERS = {"adamw": {"state": 8.0, "flops": 30.0, "transient": 12.0, "setup_cpu_s": 0.0},
              "adamw8bit": {"state": 2.0, "flops": 330.0, "transient": 12.0, "setup_cpu_s": 30.0}}


@dataclass
class TrainCost:
    """A training method's declaration, per pruned weight: bytes of its own state (ELSA's z, u and masks); the
    trainable values it adds in place of the weights (a learned mask's logits: the weights stay frozen, with no
    gradient or optimizer state; None: the weights train); bytes its forward keeps for the backward beyond the
    engine's activations; vector FLOPs (at the rank-1 rate) of its own work each optimizer step and each forward."""

    state: float = 0.0
    logits: float | None = None
    saved: float = 0.0
    step_vec: float = 0.0
    forward_vec: float = 0.0


def codec_bytes(codec, target) -> float:
    """Bytes per weight of a z / u codec (elsa.engines.admm) at the run's target density (half when unknown)."""
    return codec.bytes_per_weight(1.0 - (target.ratio if target is not None else 0.5))


def elsa_train_cost(m, target) -> TrainCost:
    """z and u in their codecs and two bit-packed masks (mask0, mask_prev); a top-k projection every ``interval``
    steps."""
    state = codec_bytes(m.z_codec, target) + codec_bytes(m.u_codec, target) + 0.25
    return TrainCost(state=state, step_vec=SORT / max(m.interval, 1))


def training_cost(m, target) -> TrainCost:
    """A training method that declares nothing of its own: a top-k mask of every pruned weight each step (AST's)."""
    return TrainCost(step_vec=SORT)


# the learned masks' relaxed sample and its backward, per logit and forward, in vector FLOPs at the rank-1 rate,
# and the bytes per logit the sample keeps for the backward: `python bench/mask_step.py` (each method's own
# ``soft`` times a 4096 x 4096 weight under bf16 autocast, one thread, CPU time, the rank-1 rate probed in the
# same process; 2026-12-05 18:45 UTC: MaskLLM 2:4, 1.5 logits a weight, 110 ns and 10 B a weight, 1,529 FLOPs a
# logit; LEAP 35 ns and 8 B, 727; at 20.8 GFLOP/s). The llama2-7b cells (issue 27) had taken 31 s (MaskLLM) and
# 15 s (LEAP) a step where the plan, which counted neither, said ~10 s.
MASK_STEP = {"maskllm": (1500.0, 6.7), "leap": (700.0, 8.0)}


def maskllm_train_cost(m, target) -> TrainCost:
    """C(M, N) logits per group of M weights (2:4: 6 per 4), sampled by Gumbel-softmax each step."""
    per_weight = math.comb(target.m, target.n) / target.m if target is not None and target.is_nm else 1.5
    flops, saved = MASK_STEP["maskllm"]
    return TrainCost(logits=per_weight, saved=saved * per_weight, forward_vec=flops * per_weight)


def leap_train_cost(m, target) -> TrainCost:
    """One logit per weight, sampled by Gumbel-sigmoid each step."""
    flops, saved = MASK_STEP["leap"]
    return TrainCost(logits=1.0, saved=saved, forward_vec=flops)


def hessian_cost(m, S: Shapes, T: int) -> BlockCost:
    return BlockCost(held=_hessians(S), work=0.0, flops=_accumulate(S, T),
                     note=f"{type(m).__name__} declares no work of its own: statistics and the walk only")


def walk_cost(m, S: Shapes, T: int) -> BlockCost:
    return BlockCost(held=0.0, work=0.0, flops=Work(),
                     note=f"{type(m).__name__} declares no cost: the walk only")


def _costs() -> dict:
    from elsa.engines.layerwise import LayerwisePruner
    from elsa.methods.alps import ALPS
    from elsa.methods.sparsegpt import HessianPruner
    from elsa.methods.elsa import Elsa
    from elsa.methods.magnitude import Magnitude
    from elsa.methods.sparsegpt import SparseGPT
    from elsa.methods.sparsellm import SparseLLM
    from elsa.methods.training_method import TrainingMethod
    from elsa.methods.dsnot import DSnoT
    from elsa.methods.leap import Leap
    from elsa.methods.maskllm import MaskLLM
    from elsa.methods.ladmm import LADMM
    from elsa.methods.oats import OATS
    from elsa.methods.ria import RIA
    from elsa.methods.safe import SAFE
    from elsa.methods.wanda import Wanda
    return {Wanda: wanda_cost, RIA: wanda_cost, DSnoT: dsnot_cost, OATS: oats_cost, SAFE: safe_cost, LADMM: ladmm_cost, SparseGPT: sparsegpt_cost, SparseLLM: sparsellm_cost, ALPS: alps_cost,
            Magnitude: magnitude_cost, Elsa: elsa_train_cost, MaskLLM: maskllm_train_cost, Leap: leap_train_cost,
            TrainingMethod: training_cost,
            HessianPruner: hessian_cost, LayerwisePruner: walk_cost}


def _separable(method, S: Shapes) -> bool:
    """Whether hardware.low_memory's lean walk applies (elsa.engines.layerwise, ``LayerwisePruner.separable``): the base
    ``prune_block``, or SparseLLM's SparseGPT fallback on the MoE blocks it cannot model."""
    from elsa.engines.layerwise import LayerwisePruner

    if not isinstance(method, LayerwisePruner):
        return False
    return type(method).prune_block is LayerwisePruner.prune_block or \
        bool(S.expert_count and getattr(method, "fallback", None) == "sparsegpt")


def declared(method):
    """The cost declaration of ``method``'s class, the nearest along its MRO (ELSA-L: ELSA's)."""
    costs = _costs()
    for cls in type(method).__mro__:
        if cls in costs:
            return costs[cls]
    return None


# ---------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Phase:
    name: str
    seconds: float
    cpu_gb: float                   # peak resident memory of the process during the phase
    gpu_gb: float | None = None     # peak per GPU (hardware=gpu / fsdp)
    note: str = ""
    disk_gb: float = 0.0            # hardware.low_memory's files under the temporary dir at once


@dataclass
class Setting:
    """What the plan reads of a run: built components and the run's sizes."""

    source: object
    method: object
    start: object | None
    device: str = "cpu"
    ranks: int = 1                  # FSDP processes (one GPU each)
    threads: int = 1
    nsamples: int = 0
    seqlen: int = 512
    eval_tokens: int | None = 65536
    eval_batch: int = 4
    eval_passes: int = 1            # the pruned model's; +1 for a dense one not yet cached, +1 for a start's
    save: bool = True
    ignore: tuple = ()
    targets: tuple = ()
    target: object = None           # the run's sparsity (elsa.sparsity.patterns.Sparsity)
    load: float | None = None       # the CPU's load average to plan for (None: the current one)
    low_memory: bool = False        # hardware.low_memory: experts one at a time, the walk's dense copy on disk


class Plan:
    """Predicted time and peak memory per phase for one :class:`Setting` on this machine (or the reference GPU)."""

    LOAD_GBPS = 0.5                 # reading a checkpoint (assumed)
    SPILL_GBPS = 1.0                # hardware.low_memory's dense copy: written once, read back per batch (assumed)
    SAVE_GBPS = 0.3                 # writing safetensors (assumed)

    def __init__(self, st: Setting, shapes: Shapes | None = None, base_gb: float | None = None,
                 rates_cpu: dict | None = None):
        self.st = st
        self.S = shapes or model_shapes(st.source, st.ignore, st.targets)
        self.base = _rss_gb() if base_gb is None else base_gb
        self.gpu = st.device.startswith("cuda")
        self.share = 1.0    # the share of the probed rate this run gets: the CPU is shared with the load
        if self.gpu:
            self.r = self.r1 = GPU_REFERENCE["rates"]
        else:
            self.r = rates_cpu or rates(st.threads)
            self.r1 = self.r if st.threads == 1 else rates(1)
            self.load_avg = os.getloadavg()[0] if st.load is None else st.load
            self.share = min(1.0, (os.cpu_count() or 1) / (self.load_avg + st.threads))
        self.phases: list[Phase] = []
        self.notes: list[str] = []

    # -- sizes ------------------------------------------------------------------------------------------
    @property
    def weights_gb(self) -> float:
        return self.S.params * self.S.dtype_bytes / GB

    def forward_transient(self, tokens: int) -> float:
        S = self.S
        out = S.activation_bytes(tokens) + 4.0 * S.largest
        if S.eager:            # scores, softmax and their float copies
            out += 3 * 4.0 * (tokens // self.st.seqlen or 1) * S.heads * self.st.seqlen ** 2
        return out

    def seconds(self, work: Work) -> float:
        return work.seconds(self.r, self.r1) / self.share

    def forward_work(self, tokens: int, blocks: int, head: bool = False) -> Work:
        S = self.S
        head_flops = 2.0 * tokens * S.vocab * S.hidden if head else 0.0
        return Work(mm=blocks * S.block_flops(tokens, self.st.seqlen) + head_flops,
                    vec=blocks * tokens * FORWARD_VEC * (S.hidden + S.mlp_token))

    # -- phases -----------------------------------------------------------------------------------------
    def load(self) -> Phase:
        S, src = self.S, self.st.source
        if getattr(src, "rehearsal", None) is not None or not hasattr(src, "path"):   # built from a config
            secs = 1.5 * S.params / rates(1)["fill"] / (1.0 if self.gpu else self.share)   # built on the CPU
        else:
            secs = self.weights_gb / self.LOAD_GBPS
        return Phase("load", secs, self.base + self.weights_gb, note=f"{S.params / 1e9:.2f} B parameters")

    def walk(self, method, label: str) -> list[Phase]:
        """The layer-wise engine: capture (the dense forward up to the last block), then every block."""
        S, st = self.S, self.st
        T, b = st.nsamples * st.seqlen, getattr(method, "batch_size", 8) * st.seqlen
        cost = declared(method)(method, S, T)
        if st.low_memory and cost.lean is not None:    # the method streams state of its own (SparseLLM)
            cost = cost.lean
        hidden = 2 * 4.0 * T * S.hidden
        block = copy = S.block_params * S.dtype_bytes   # the block, and its dense copy (the re-run's error measure)
        passes, spill, on_disk = 2, 0.0, cost.disk_held   # the statistics' forward and the re-run
        if st.low_memory and _separable(method, S):
            # one fused expert's statistics at a time (+ the rest's), one forward per expert; the dense copy
            # on disk, one matrix read back at a time
            if S.expert_count and method.square_stats:
                lean = declared(method)(method, S.one_expert(), T)
                cost = BlockCost(lean.held, lean.work, cost.flops, cost.note)
                passes += S.expert_count - 1
            spill = block * (1 + -(-T // b)) / GB / self.SPILL_GBPS
            copy = 4.0 * S.largest
            on_disk += block
        # the re-run measures every matrix's error in float64: x (W - W_dense)^T and y - delta, each doubled
        extra = self.forward_transient(min(b, T)) + 24.0 * min(b, T) * max(o * s for _n, o, _i, s in S.matrices)
        waiting = S.outside * S.dtype_bytes if st.low_memory else 0.0   # low_memory: on disk during the walk
        on_disk += waiting
        resident = self.base + self.weights_gb + (hidden + copy - waiting + cost.held + max(extra, cost.work)) / GB
        per_block = self.seconds(self.forward_work(T, passes) + Work(
            mm=2.0 * T * sum(o * i * s for _n, o, i, s in S.matrices),
            vec=ERROR_VEC * T * sum(o * s for _n, o, _i, s in S.matrices)) + cost.flops) + spill + \
            cost.disk / GB / self.SPILL_GBPS
        capture = self.seconds(self.forward_work(T, S.blocks - 1))
        gpu = None
        if self.gpu:    # one block at a time on the device; the model stays on the CPU
            gpu = GPU_REFERENCE["context_gb"] + (hidden + block + copy + cost.held + max(extra, cost.work)) / GB
            resident = self.base + self.weights_gb - waiting / GB
        tag = f"{T:,} tokens ({st.nsamples} x {st.seqlen})"
        return [Phase(f"{label}: calibration", capture, self.base + self.weights_gb + hidden / 2 / GB,
                      gpu and GPU_REFERENCE["context_gb"] + hidden / 2 / GB + S.outside * 4 / GB,
                      f"the dense forward over {tag}"),
                Phase(f"{label}: {S.blocks} block(s)", per_block * S.blocks + 2 * waiting / GB / self.SPILL_GBPS,
                      resident, gpu,
                      f"{per_block:,.0f} s per block; holds {cost.held / GB:.2f} GB of statistics" +
                      (f"; {cost.note}" if cost.note else ""), disk_gb=on_disk / GB)]

    def bf16_step(self, t) -> float:
        """The training step's forward and backward speed-up under ``method.autocast_bf16`` as the run will resolve
        it on this CPU (elsa.engines.precision: auto is bf16 where its matmul is MIN_SPEEDUP faster), from the
        probe's miniature step; 1.0 for fp32, and on the reference GPU (its rate is an fp32 one)."""
        setting = getattr(t, "autocast_bf16", False)
        if self.gpu or setting is False:
            return 1.0
        if setting == "auto":
            from elsa.engines.precision import MIN_SPEEDUP, bf16_speedup

            if bf16_speedup("cpu") < MIN_SPEEDUP:
                return 1.0
        return float(self.r.get("bf16_step", 1.0))

    def train(self, method) -> Phase:
        S, st, t = self.S, self.st, method.train
        cost = declared(method)(method, st.target)
        optimizer = OPTIMIZERS[t.optimizer]
        opt = optimizer["state"]
        # method.train_dense_params=false: only the pruned matrices train (no gradient or optimizer state for
        # the embeddings, norms and head); a learned mask trains its logits instead, the weights frozen;
        # hardware.low_memory: the optimizer's step temporaries are one tensor's (AdamW per tensor or fused; the
        # CPU AdamW8bit's C kernel steps tensor by tensor), not every weight's
        per_pruned = 1.0 if cost.logits is None else cost.logits
        trained = S.prunable * per_pruned + (S.params - S.prunable) * t.train_dense_params
        largest = max([S.largest * per_pruned] + [S.vocab * S.hidden] * t.train_dense_params)
        transient = optimizer["transient"] * (largest if st.low_memory else trained)
        fixed = S.params * S.dtype_bytes + trained * (4 + opt) + transient + S.prunable * (cost.state + cost.saved)
        if method.distils:    # the teacher; with hardware.low_memory it shares the student's frozen weights
            fixed += (S.prunable if st.low_memory and not t.train_dense_params else S.params) * S.dtype_bytes
        tokens = t.batch_size * st.seqlen
        per_layer = 4.0 * tokens * ((S.hidden if t.gradient_checkpointing else 8 * S.hidden + 5 * S.mlp_token))
        acts = S.blocks * per_layer + 3 * 4.0 * tokens * S.vocab + self.forward_transient(tokens)
        bf16 = self.bf16_step(t)
        step = self.seconds(self.forward_work(tokens * t.grad_accum, S.blocks, head=True) * 3) / bf16 + \
            self.seconds(Work(vec=optimizer["flops"] * trained + (cost.step_vec + cost.forward_vec * t.grad_accum) * S.prunable))
        checkpoints = t.steps // t.checkpoint_every if t.checkpoint_every else 0
        secs = step * t.steps + optimizer["setup_cpu_s"] / self.share + checkpoints * (
            S.params * S.dtype_bytes + trained * opt + S.prunable * cost.state) / GB / self.SAVE_GBPS
        self.hour_steps = int(3600 / max(step, 1e-9))
        per_rank = fixed / st.ranks + acts + 2 * 4.0 * S.block_params
        gpu = GPU_REFERENCE["context_gb"] + per_rank / GB if self.gpu else None
        cpu = self.base + (self.weights_gb if self.gpu else (fixed + acts) / GB)
        own = (f"{S.dtype_bytes + 4 + opt + cost.state:.0f} B per pruned weight (weight, gradient, optimizer, method)"
               if cost.logits is None else
               f"{S.dtype_bytes + cost.saved + per_pruned * (4 + 4 + opt):.0f} B per pruned weight (the frozen weight, "
               f"{per_pruned:g} mask logit(s) with gradient and optimizer, the sampled mask kept for the backward)")
        note = (f"{t.steps} steps x {t.batch_size} x {t.grad_accum} windows of {st.seqlen}"
                f"{f' under bf16 autocast (its forward and backward measured {bf16:.1f}x fp32 here)' if bf16 != 1.0 else ''}; "
                f"{own} + {optimizer['transient']:.0f} B in the optimizer's step")
        return Phase("training", secs, cpu, gpu, note + (f"; {st.ranks} ranks" if st.ranks > 1 else ""))

    def evaluate(self) -> Phase:
        S, st = self.S, self.st
        tokens = st.eval_tokens or 300_000
        batch = st.eval_batch * st.seqlen
        secs = self.seconds(self.forward_work(tokens, S.blocks, head=True)) * st.eval_passes
        extra = (self.forward_transient(batch) + 3 * 4.0 * batch * S.vocab) / GB
        gpu = GPU_REFERENCE["context_gb"] + self.weights_gb + extra if self.gpu else None
        return Phase("evaluation", secs, self.base + self.weights_gb + (0 if self.gpu else extra), gpu,
                     f"{st.eval_passes} pass(es) over {tokens:,} tokens" +
                     ("" if st.eval_tokens else " (eval.max_tokens=null: the whole split, ~300k assumed)"))

    def save(self) -> Phase:
        return Phase("save", self.weights_gb / self.SAVE_GBPS, self.base + self.weights_gb)

    def build(self) -> "Plan":
        st = self.st
        self.phases = [self.load()]
        for stage, label in ((st.start, "start"), (st.method, "method")):
            if stage is None:
                continue
            if getattr(stage, "needs_calibration", False) and not hasattr(stage, "train"):
                self.phases += self.walk(stage, f"{label} {type(stage).__name__}")
            elif hasattr(stage, "train"):
                self.phases.append(self.train(stage))
            else:      # magnitude and other calibration-free methods: one pass over the weights
                work = declared(stage)(stage, self.S, 0).flops * self.S.blocks if declared(stage) else Work()
                self.phases.append(Phase(f"{label} {type(stage).__name__}", self.seconds(work),
                                         self.base + self.weights_gb))
        self.phases.append(self.evaluate())
        if st.save:
            self.phases.append(self.save())
        return self

    # -- summaries --------------------------------------------------------------------------------------
    @property
    def peak_cpu_gb(self) -> float:
        return max(p.cpu_gb for p in self.phases)

    @property
    def peak_gpu_gb(self) -> float | None:
        gpus = [p.gpu_gb for p in self.phases if p.gpu_gb is not None]
        return max(gpus) if gpus else None

    @property
    def peak_disk_gb(self) -> float:
        return max(p.disk_gb for p in self.phases)

    @property
    def total_s(self) -> float:
        return sum(p.seconds for p in self.phases)

    def prune_s(self) -> float:
        return sum(p.seconds for p in self.phases if p.name.startswith(("method", "start", "training")))

    def where(self) -> str:
        st = self.st
        if self.gpu:
            return GPU_REFERENCE["name"] + (f" x {st.ranks} ranks" if st.ranks > 1 else "")
        return (f"this CPU at {st.threads} thread(s) ({self.r['mm'] / 1e9:.0f} GFLOP/s matmul measured; load "
                f"{self.load_avg:.1f} on {os.cpu_count()} cores leaves it {self.share:.0%} of that)")

    def forecast(self) -> str:
        gpu = f", {self.peak_gpu_gb:.1f} GB per GPU" if self.peak_gpu_gb is not None else ""
        gpu += f", {self.peak_disk_gb:.1f} GB on disk" if self.peak_disk_gb else ""
        parts = ", ".join(f"{p.name} {duration(p.seconds)}" for p in self.phases)
        hour = ""
        if any(p.name == "training" and p.seconds > 3600 for p in self.phases):
            hour = f"; one hour of training here is method.steps={self.hour_steps}"
        return (f"plan: {duration(self.total_s)} on {self.where()}; peak {self.peak_cpu_gb:.1f} GB resident{gpu} "
                f"({parts}){hour}")

    def table(self) -> str:
        rows = [f"{'phase':<40} {'time':>10} {'CPU GB':>8} {'GPU GB':>8} {'disk GB':>8}  note"]
        for p in self.phases:
            gpu = "-" if p.gpu_gb is None else f"{p.gpu_gb:.2f}"
            disk = f"{p.disk_gb:.2f}" if p.disk_gb else "-"
            rows.append(f"{p.name:<40} {duration(p.seconds):>10} {p.cpu_gb:>8.2f} {gpu:>8} {disk:>8}  {p.note}")
        rows.append(f"{'total / peak':<40} {duration(self.total_s):>10} {self.peak_cpu_gb:>8.2f} "
                    f"{'-' if self.peak_gpu_gb is None else f'{self.peak_gpu_gb:.2f}':>8} "
                    f"{f'{self.peak_disk_gb:.2f}' if self.peak_disk_gb else '-':>8}")
        return "\n".join(rows)

    def as_dict(self) -> dict:
        return {"forecast": self.forecast(), "total_s": self.total_s, "prune_s": self.prune_s(),
                "peak_cpu_gb": self.peak_cpu_gb, "peak_gpu_gb": self.peak_gpu_gb, "peak_disk_gb": self.peak_disk_gb,
                "base_gb": self.base, "where": self.where(), "rates": {k: v for k, v in self.r.items()},
                "share": self.share,
                "phases": [vars(p) for p in self.phases]}


def duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def full_model(shapes: Shapes) -> Shapes:
    """A rehearsal's shapes extrapolated to the architecture's full depth."""
    from dataclasses import replace

    scale = shapes.layers / shapes.blocks
    return replace(shapes, blocks=shapes.layers, params=int(shapes.outside + shapes.layers * shapes.block_params),
                   prunable=int(shapes.prunable * scale))


# ---------------------------------------------------------------------------------------------------------
# what would fit


def _variant(plan: Plan, **changes) -> Plan:
    from dataclasses import replace

    return Plan(replace(plan.st, **changes), plan.S, plan.base, plan.r if not plan.gpu else None).build()


def _low_memory(method):
    """ELSA-L's state on the same recipe: z fp8, u bf16, 8-bit AdamW."""
    import copy

    from elsa.engines.admm import Bf16Codec, Fp8Codec

    low = copy.copy(method)
    low.z_codec, low.u_codec = Fp8Codec(), Bf16Codec()
    low.train = copy.copy(method.train)
    low.train.optimizer = "adamw8bit"
    return low


def _frozen_outside(method):
    """The same training with only the pruned matrices trained (method.train_dense_params=false)."""
    import copy

    lean = copy.copy(method)
    lean.train = copy.copy(method.train)
    lean.train.train_dense_params = False
    return lean


def _lean(plan: Plan, peak) -> tuple[str, Plan] | None:
    """hardware.low_memory (and, for a training method, method.train_dense_params=false), when it lowers the
    peak: the same pruned weights (layer-wise) or the same method on the pruned matrices only (training)."""
    st, method = plan.st, plan.st.method
    tries = [] if st.low_memory else [("hardware.low_memory=true", {"low_memory": True})]
    if hasattr(method, "train") and method.train.train_dense_params:
        tries.append(("hardware.low_memory=true method.train_dense_params=false",
                      {"low_memory": True, "method": _frozen_outside(method)}))
    best = None
    for text, changes in tries:
        p = _variant(plan, **changes)
        if peak(p) < peak(plan) - 0.05 and (best is None or peak(p) < peak(best[1])):
            best = (text, p)
    return best


def _fewer_samples(plan: Plan, fits) -> Plan | None:
    """The plan with the most calibration windows, halving ``nsamples``, that ``fits``; None if none does."""
    n = plan.st.nsamples
    while n > 1:
        n //= 2
        p = _variant(plan, nsamples=n)
        if fits(p):
            return p
    return None


def alternatives(plan: Plan, limit_gb: float) -> list[str]:
    """Changes of the run that the plan says fit under ``limit_gb`` (per device)."""
    st, out = plan.st, []
    peak = (lambda p: p.peak_gpu_gb) if plan.gpu else (lambda p: p.peak_cpu_gb)
    method = st.method
    lean = _lean(plan, peak)
    if lean is not None and peak(lean[1]) <= limit_gb:
        out.append(f"{lean[0]} ({peak(lean[1]):.1f} GB)")
    if hasattr(method, "train"):
        low = _variant(plan, method=_low_memory(method))
        if peak(low) <= limit_gb and type(method).__name__ == "Elsa":
            out.append(f"method=elsa_l ({peak(low):.1f} GB)")
        for ranks in (2, 4, 8, 16, 32, 64):
            fsdp = _variant(plan, device="cuda", ranks=ranks)
            if fsdp.peak_gpu_gb <= GPU_REFERENCE["memory_gb"]:
                out.append(f"hardware=fsdp with {ranks} ranks ({fsdp.peak_gpu_gb:.1f} GB per 80 GB GPU)")
                break
    elif getattr(method, "needs_calibration", False):
        fewer = _fewer_samples(plan, lambda p: peak(p) <= limit_gb)
        if fewer is not None:
            out.append(f"nsamples={fewer.st.nsamples} ({fewer.st.nsamples * st.seqlen:,} calibration tokens, "
                       f"{peak(fewer):.1f} GB)")
        from elsa.methods.sparsegpt import SparseGPT

        if isinstance(method, SparseGPT) and type(method) is not SparseGPT:
            plain = _variant(plan, method=SparseGPT(method.percdamp, method.blocksize, method.batch_size))
            if peak(plain) <= limit_gb:
                out.append(f"method=sparsegpt ({peak(plain):.1f} GB)")
        off = _variant(plan, device="cuda") if not plan.gpu else None
        if off is not None and off.peak_gpu_gb <= GPU_REFERENCE["memory_gb"]:
            out.append(f"hardware=gpu: one block at a time on an 80 GB GPU ({off.peak_gpu_gb:.1f} GB on it, "
                       f"{off.peak_cpu_gb:.1f} GB resident)")
    return out


def disk_alternatives(plan: Plan, free_gb: float, memory_gb: float) -> list[str]:
    """Changes of the run that the plan says fit in ``free_gb`` of disk (and ``memory_gb`` resident)."""
    st, out = plan.st, []
    p = _fewer_samples(plan, lambda p: p.peak_disk_gb <= free_gb and p.peak_cpu_gb <= memory_gb)
    if p is not None:
        n = p.st.nsamples
        out.append(f"nsamples={n} ({n * st.seqlen:,} calibration tokens, {p.peak_disk_gb:.1f} GB on disk, "
                   f"{p.peak_cpu_gb:.1f} GB resident)")
    usual = _variant(plan, low_memory=False)
    if usual.peak_cpu_gb <= memory_gb:
        out.append(f"hardware.low_memory=false ({usual.peak_cpu_gb:.1f} GB resident, nothing on disk)")
    out.append("TMPDIR=<a folder on a disk with room> (the files go under Python's temporary dir)")
    return out


def free_disk_gb(path: str) -> float:
    """The space free for the run's temporary files under ``path``."""
    return shutil.disk_usage(path).free / GB


# ---------------------------------------------------------------------------------------------------------
# from a run's config


def setting(cfg, source, method, start, ranks: int | None = None) -> Setting:
    """The plan's view of a composed run config and its built components."""
    from elsa.eval.perplexity import PerplexityEval
    from elsa.sparsity.patterns import Sparsity

    hw = cfg.hardware
    threads = int(hw.get("threads") or torch.get_num_threads())
    device = str(hw.get("device", "cpu"))
    fsdp = bool(hw.get("fsdp", False))
    ranks = ranks or (int(os.environ.get("WORLD_SIZE", "1")) if fsdp else 1)
    needs = method.needs_calibration or bool(start is not None and start.needs_calibration)
    passes = 1 + bool(getattr(method, "eval_initial", False) or start is not None and
                      getattr(method, "eval_initial", False))
    ev = cfg.eval
    if ev.get("dense", True):         # the dense model's pass, unless its perplexity is already cached
        cached = PerplexityEval(dict.fromkeys(ev.corpora), int(cfg.seqlen), ev.get("max_tokens"), 1,
                                bool(ev.get("add_bos", True)), device)
        passes += not (hasattr(source, "fingerprint") and cached.dense_cached(source.fingerprint()))
    return Setting(source=source, method=method, start=start, device=device, ranks=ranks, threads=threads,
                   nsamples=int(cfg.nsamples) if needs else 0, seqlen=int(cfg.seqlen),
                   eval_tokens=cfg.eval.get("max_tokens"), eval_batch=int(cfg.eval.get("batch_size", 4)),
                   eval_passes=passes, save=bool(cfg.get("save_model", True)),
                   ignore=tuple(cfg.get("ignore") or ()), targets=tuple(cfg.get("targets") or ()),
                   target=Sparsity.parse(cfg.sparsity),
                   low_memory=bool(hw.get("low_memory", False)))


def limit_gb(cfg, device: str) -> tuple[float, str]:
    """The memory a run may use on its device: ``hardware.memory_gb``, else the machine's (the GPU's)."""
    asked = cfg.hardware.get("memory_gb")
    if asked is not None:
        from elsa.errors import positive

        return positive("hardware.memory_gb", asked), "hardware.memory_gb"
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GB, "the GPU's memory"
        return GPU_REFERENCE["memory_gb"], "the reference GPU's memory"
    return machine_memory_gb(), "this machine's memory"


def check_run(run, quiet: bool = False) -> dict | None:
    """run.py's plan (elsa.run.recipe.Run.execute, after validate, before any weight loads): print the forecast;
    refuse with one line when the predicted peak exceeds the device's memory. None when the model's config
    cannot be read without loading it (a hub id offline, a GGUF not yet converted)."""
    import logging

    from elsa.errors import ElsaError, nothing_to_prune

    if not hasattr(run.source, "hf_config"):
        return None
    try:
        plan = Plan(setting(run.cfg, run.source, run.method, run.start)).build()
    except ElsaError:
        raise
    except Exception as exc:     # noqa: BLE001 - a plan must never stop a run it cannot read
        logging.getLogger(__name__).info("no plan: %s: %s", type(exc).__name__, exc)
        return None
    if plan.S.prunable == 0:     # ignore / targets leave nothing: refuse before any weight loads
        raise nothing_to_prune(list(plan.st.ignore), list(plan.st.targets))
    if not quiet:
        print(plan.forecast(), flush=True)
    limit, what = limit_gb(run.cfg, plan.st.device)
    of = (lambda p: p.gpu_gb or 0.0) if plan.gpu else (lambda p: p.cpu_gb)
    peak = max(of(p) for p in plan.phases)
    if peak > limit:
        alts = alternatives(plan, limit)
        raise ElsaError(f"the plan needs {peak:.1f} GB {'per GPU' if plan.gpu else 'resident'} at its peak "
                        f"({max(plan.phases, key=of).name}), more than "
                        f"{what} ({limit:.1f} GB); what fits: {'; '.join(alts) or 'nothing the plan knows'} "
                        "(python -m elsa.plan <overrides> prints every phase)")
    if plan.peak_disk_gb:            # hardware.low_memory's files: the walk's temporary dir must hold them
        where = tempfile.gettempdir()
        free = free_disk_gb(where)
        if plan.peak_disk_gb > free:
            phase = max(plan.phases, key=lambda p: p.disk_gb)
            raise ElsaError(f"the plan needs {plan.peak_disk_gb:.1f} GB on disk at its peak ({phase.name}: "
                            f"hardware.low_memory's files under {where}), more than the {free:.1f} GB free there; "
                            f"what fits: {'; '.join(disk_alternatives(plan, free, limit))} "
                            "(python -m elsa.plan <overrides> prints every phase)")
    return plan.as_dict()
