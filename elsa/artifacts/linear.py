"""Sparse inference: a drop-in replacement for the pruned nn.Linear matrices, its kernel chosen by measurement.

    from elsa.artifacts.linear import sparsify
    plan = sparsify(model)            # in place: every pruned Linear of the decoder blocks -> SparseLinear

Per matrix and per regime (``decode``: a few tokens, memory-bound; ``prefill``: many tokens, compute-bound), every
available kernel is checked against the dense product on a probe input and timed side by side with it
(interleaved rounds); a sparse kernel is used only where its third-quartile time beats dense's first-quartile
time by ``min_gain`` (default 10%). The choices are then checked in the whole model, per regime, against the
same model all dense (:func:`verify_in_model`), and a regime whose chosen kernels do not make the model faster
runs dense everywhere: per-matrix wins need not add up inside the model. Kernels:

- ``dense``: ``F.linear`` (MKL sgemm/sgemv), the reference;
- ``torch_csr``: torch's CSR tensor (int32 indices) times the activations, which goes to MKL's sparse BLAS;
- ``csr16`` / ``csr16_1t``: a small C kernel (compiled once with the system C compiler into the elsa cache, called
  through ctypes): CSR with uint16 column indices and the values in fp32 (6 bytes per non-zero against 4 per dense
  weight, against 12 for torch's int64 CSR), AVX2 gathers for the batch-1 product, 64-token tiles for prefill;
  on all threads or one (a small matrix does not repay a parallel region). fp32 only; without a compiler the
  candidate is absent and the others compete;
- on CUDA: ``semi_structured`` (2:4 through ``torch.sparse.to_sparse_semi_structured``, fp16/bf16, where the
  pattern holds and the shape is one the kernels take) and ``torch_csr`` (cuSPARSE). On CPU they are skipped
  with the reason recorded.

Pruned matrices: the nn.Linear and Conv1D (GPT-2, multiplied as its ``[out, in]`` transpose) layers inside the decoder
blocks, MoE routers aside (:func:`block_linears`), and every expert of a fused 3-D expert tensor
(:func:`block_experts`: Mixtral, Qwen-MoE, OLMoE, GPT-OSS, ...): each expert's ``[out, in]`` slice is a matrix
with its own kernel choice, and the experts module runs :func:`sparse_experts_forward`, the routed loop over the
experts its tokens chose, with the flags transformers' experts interface sets on the module (``has_gate``,
``is_transposed``, ``has_bias``, ``_apply_gate``). An experts module without those flags keeps its own forward and
stays dense (recorded in the plan). lm_head and embeddings stay dense; a dense matrix's decode may run from a
transposed copy where torch's product is that much faster with it (:func:`dense_layouts`, measured per class and
saved with the plan; the dense baseline of elsa.artifacts.generate gets the same choice).

With a pruning plan (``sparsify(model, pruning_plan=...)``: the run's PruningPlan, or the record saved beside the
weights, elsa.artifacts.plan_record) the plan says which matrices are pruned and to what target: only planned
matrices get kernels, the N:M kernels are offered where the target is N:M, and a matrix the plan leaves dense
stays as it is with the plan's reason. Without one the zeros decide (2:4 kernels where the zeros hold 2:4).
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
import statistics
import time
import types
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

REGIMES = {"decode": 1, "prefill": 512}   # tokens per probe; a call with <= DECODE_MAX tokens is "decode"
DECODE_MAX = 8
MIN_GAIN = 1.10                          # a sparse kernel must be at least this much faster than dense

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#define TILE 64

static inline float rowdot_i32(const int32_t* c, const float* v, int64_t n, const float* x) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int64_t k = 0;
    for (; k + 4 <= n; k += 4) {
        a0 += v[k] * x[c[k]]; a1 += v[k + 1] * x[c[k + 1]];
        a2 += v[k + 2] * x[c[k + 2]]; a3 += v[k + 3] * x[c[k + 3]];
    }
    for (; k < n; k++) a0 += v[k] * x[c[k]];
    return (a0 + a1) + (a2 + a3);
}

static inline float rowdot_u16(const uint16_t* c, const float* v, int64_t n, const float* x) {
    int64_t k = 0;
    float s = 0.f;
#ifdef __AVX512F__
    __m512 z0 = _mm512_setzero_ps(), z1 = _mm512_setzero_ps();
    for (; k + 32 <= n; k += 32) {   /* widen 16 positions, gather x at them, multiply-add the values */
        __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(c + k)));
        __m512i i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(c + k + 16)));
        z0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + k), _mm512_i32gather_ps(i0, x, 4), z0);
        z1 = _mm512_fmadd_ps(_mm512_loadu_ps(v + k + 16), _mm512_i32gather_ps(i1, x, 4), z1);
    }
    if (k + 16 <= n) {
        __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(c + k)));
        z0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + k), _mm512_i32gather_ps(i0, x, 4), z0);
        k += 16;
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(z0, z1));
#elif defined(__AVX2__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; k + 16 <= n; k += 16) {   /* widen 8 positions, gather x at them, multiply-add the values */
        __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(c + k)));
        __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(c + k + 8)));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + k), _mm256_i32gather_ps(x, i0, 4), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + k + 8), _mm256_i32gather_ps(x, i1, 4), a1);
    }
    a0 = _mm256_add_ps(a0, a1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    s = _mm_cvtss_f32(h);
#else
    float a1 = 0.f, a2 = 0.f, a3 = 0.f;
    for (; k + 4 <= n; k += 4) {
        s += v[k] * x[c[k]]; a1 += v[k + 1] * x[c[k + 1]];
        a2 += v[k + 2] * x[c[k + 2]]; a3 += v[k + 3] * x[c[k + 3]];
    }
    s = (s + a1) + (a2 + a3);
#endif
    for (; k < n; k++) s += v[k] * x[c[k]];
    return s;
}

/* y[b, r] = sum over row r's non-zeros of val * x[b, col]; x [batch, cols], y [batch, rows] */
#define SPMV(NAME, IDX)                                                                                \
void spmv_##NAME(int64_t rows, int64_t cols, int64_t batch, const int64_t* rowptr, const IDX* col,     \
                 const float* val, const float* x, float* y, int nthreads) {                           \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                                \
    for (int64_t r = 0; r < rows; r++) {                                                               \
        int64_t s = rowptr[r], n = rowptr[r + 1] - s;                                                  \
        for (int64_t b = 0; b < batch; b++)                                                            \
            y[b * rows + r] = rowdot_##NAME(col + s, val + s, n, x + b * cols);                        \
    }                                                                                                  \
}

/* yt[r, b] = sum over row r's non-zeros of val * xt[col, b]; xt [cols, batch], yt [rows, batch]; TILE tokens
   at a time so that the accumulators stay in registers and a tile of xt in cache */
#define SPMM(NAME, IDX)                                                                                \
void spmm_##NAME(int64_t rows, int64_t cols, int64_t batch, const int64_t* rowptr, const IDX* col,     \
                 const float* val, const float* xt, float* yt, int nthreads) {                         \
    for (int64_t b0 = 0; b0 < batch; b0 += TILE) {                                                     \
        int64_t w = batch - b0 < TILE ? batch - b0 : TILE;                                             \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
        for (int64_t r = 0; r < rows; r++) {                                                           \
            float acc[TILE];                                                                           \
            memset(acc, 0, sizeof(acc));                                                               \
            for (int64_t k = rowptr[r]; k < rowptr[r + 1]; k++) {                                      \
                const float v = val[k];                                                                \
                const float* xr = xt + (int64_t)col[k] * batch + b0;                                   \
                if (w == TILE) { for (int j = 0; j < TILE; j++) acc[j] += v * xr[j]; }                 \
                else { for (int j = 0; j < w; j++) acc[j] += v * xr[j]; }                              \
            }                                                                                          \
            memcpy(yt + r * batch + b0, acc, w * sizeof(float));                                       \
        }                                                                                              \
    }                                                                                                  \
}
SPMV(u16, uint16_t)
SPMV(i32, int32_t)
SPMM(u16, uint16_t)
SPMM(i32, int32_t)
"""

_LIB: dict = {}


def kernel_library():
    """The compiled C kernels (ctypes), or None (the reason in ``_LIB['reason']``, logged once). Compiled once per
    source and CPU (``-march=native``) into ``$ELSA_CACHE/kernels``; a second call reuses the loaded library."""
    if "lib" in _LIB:
        return _LIB["lib"]
    from elsa.artifacts.kernels import compile_library

    lib, reason = None, None
    try:
        lib = compile_library(_C_SOURCE, "spmm")
        P, I = ctypes.c_void_p, ctypes.c_int64
        for fn in ("spmv_u16", "spmv_i32", "spmm_u16", "spmm_i32"):
            getattr(lib, fn).argtypes = [I, I, I, P, P, P, P, P, ctypes.c_int]
            getattr(lib, fn).restype = None
    except OSError as exc:
        lib, reason = None, str(exc)
        log.warning("elsa: the C sparse kernel is not available (%s); torch's kernels compete alone", exc)
    _LIB["lib"], _LIB["reason"] = lib, reason
    return lib


# -- kernels -------------------------------------------------------------------------------------------------
class CSR16:
    """CSR for the C kernel: int64 row pointers, uint16 (or int32 when in_features > 65536) columns, fp32 values."""

    def __init__(self, weight: torch.Tensor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().to_sparse_csr()
        self.rows, self.cols = weight.shape
        self.rowptr = csr.crow_indices().to(torch.int64).contiguous()
        self.wide = self.cols > 65536
        cols = csr.col_indices()
        # int16 storage of uint16 positions: the bits are what the kernel reads
        cols = cols.to(torch.int32)
        self.col = (cols if self.wide else torch.where(cols >= 32768, cols - 65536, cols).to(torch.int16)).contiguous()
        self.val = csr.values().to(torch.float32).contiguous()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rowptr, self.col, self.val))

    def __call__(self, x2d: torch.Tensor, threads: int) -> torch.Tensor:
        lib = kernel_library()
        x2d = x2d.contiguous()
        b = x2d.shape[0]
        kind = "i32" if self.wide else "u16"
        if b <= DECODE_MAX:
            y = torch.empty(b, self.rows, dtype=torch.float32)
            getattr(lib, f"spmv_{kind}")(self.rows, self.cols, b, self.rowptr.data_ptr(), self.col.data_ptr(),
                                         self.val.data_ptr(), x2d.data_ptr(), y.data_ptr(), threads)
            return y
        xt = x2d.t().contiguous()
        yt = torch.empty(self.rows, b, dtype=torch.float32)
        getattr(lib, f"spmm_{kind}")(self.rows, self.cols, b, self.rowptr.data_ptr(), self.col.data_ptr(),
                                     self.val.data_ptr(), xt.data_ptr(), yt.data_ptr(), threads)
        return yt.t()


def semi_structured_support(weight: torch.Tensor) -> tuple[bool, str]:
    """Whether torch's 2:4 semi-structured kernels can take this weight: (ok, reason). Checked without running
    them, so the decision is testable on CPU: CUDA, fp16/bf16 (the CUTLASS/cuSPARSELt kernels), 2:4 along the
    input dim, and both dims multiples of the kernels' tile (64 rows, 128 columns for 16-bit types)."""
    from elsa.sparsity.patterns import nm_violations

    if weight.dim() != 2:
        return False, f"a 2-D matrix is needed, not {weight.dim()}-D"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return False, f"dtype {str(weight.dtype).removeprefix('torch.')} (semi-structured kernels take fp16/bf16)"
    rows, cols = weight.shape
    if rows % 64 or cols % 128:
        return False, f"shape {rows}x{cols} (rows must be a multiple of 64, columns of 128)"
    if nm_violations(weight, 2, 4):
        return False, "the weight is not 2:4 along its input dim"
    if not weight.is_cuda:
        return False, "semi-structured sparsity runs on CUDA only"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(weight.device) < (8, 0):
        return False, "a CUDA device of compute capability >= 8.0 is needed"
    return True, "ok"


def _sized(fn: Callable, nbytes: int) -> Callable:
    fn.nbytes = int(nbytes)          # what one product reads of the matrix: the bytes model of the plan
    return fn


DETECT = "detect"      # no pruning plan: the N:M kernels are offered where the weight's zeros hold 2:4


def candidates(weight: torch.Tensor, bias: torch.Tensor | None, only: set[str] | None = None,
               nm: tuple[int, int] | None | str = DETECT) -> tuple[dict[str, Callable], dict[str, str]]:
    """{kernel name: fn(x2d) -> y2d} for this weight on its device, and {kernel: why not} for those left out.
    Each fn carries ``nbytes``, the bytes of the matrix it reads. ``only``: build just these (and dense).
    ``nm``: the matrix's planned N:M pattern, or None (a ratio target: no N:M kernel), or DETECT (no plan: 2:4
    where the zeros hold it)."""
    w = weight.detach()
    want = (lambda k: only is None or k in only)
    out: dict[str, Callable] = {"dense": _sized(lambda x: F.linear(x, w, bias), w.numel() * w.element_size())}
    skipped: dict[str, str] = {}
    add_bias = (lambda y: y + bias) if bias is not None else (lambda y: y)
    if want("torch_csr"):
        try:
            with warnings.catch_warnings():   # "sparse CSR support is in beta": measured and checked here
                warnings.simplefilter("ignore", UserWarning)
                csr = w.to_sparse_csr()
                csr = torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(),
                                              size=w.shape, check_invariants=False)
            out["torch_csr"] = _sized(lambda x: add_bias(torch.mm(csr, x.t()).t()),
                                      csr.values().numel() * (w.element_size() + 4) + (w.shape[0] + 1) * 4)
        except (RuntimeError, NotImplementedError) as exc:
            skipped["torch_csr"] = str(exc).splitlines()[0][:200]
    if w.is_cuda:
        ok, why = _semi_structured(w, nm)
        if ok and want("semi_structured"):
            from torch.sparse import to_sparse_semi_structured

            ss = to_sparse_semi_structured(w)
            out["semi_structured"] = _sized(lambda x: F.linear(x, ss, bias), w.numel() * w.element_size() * 9 // 16)
        elif not ok:
            skipped["semi_structured"] = why
        skipped["csr16"] = skipped["bitmask"] = skipped["nm"] = "the C kernels run on CPU"
        return out, skipped
    skipped["semi_structured"] = _semi_structured(w, nm)[1]
    if w.dtype != torch.float32:
        skipped["csr16"] = f"the C kernel takes fp32 weights, not {str(w.dtype).removeprefix('torch.')}"
    elif kernel_library() is None:
        skipped["csr16"] = f"not compiled: {_LIB.get('reason')}"
    elif want("csr16") or want("csr16_1t"):
        k = CSR16(w)
        threads = torch.get_num_threads()
        if want("csr16"):
            out["csr16"] = _sized(lambda x: add_bias(k(x, threads)), k.nbytes())
        if threads > 1 and want("csr16_1t"):
            out["csr16_1t"] = _sized(lambda x: add_bias(k(x, 1)), k.nbytes())
    out.update(_compressed_candidates(w, bias, add_bias, want, skipped, nm))
    return out, skipped


def _semi_structured(w: torch.Tensor, nm) -> tuple[bool, str]:
    """semi_structured_support, where a plan (``nm`` not DETECT) offers the 2:4 kernels only to a 2:4 target."""
    if nm != DETECT and nm != (2, 4):
        return False, f"the pruning plan's target is {'a ratio' if nm is None else '%d:%d' % nm}, not 2:4"
    return semi_structured_support(w)


DECODE_ONLY = ("bitmask", "nm", "csr", "span")     # elsa.artifacts.kernels: 1..DECODE_MAX tokens


def _compressed_candidates(w: torch.Tensor, bias: torch.Tensor | None, add_bias: Callable, want: Callable,
                           skipped: dict, nm=DETECT) -> dict:
    """The kernels that read the checkpoint's own layouts (elsa.artifacts.kernels), on all torch threads; the
    ``nm`` layout in the planned N:M (``nm``: see :func:`candidates`)."""
    from elsa.artifacts import kernels as SK
    out = {}
    pattern = (2, 4) if nm == DETECT else nm
    for layout in DECODE_ONLY:
        if layout == "nm" and pattern is None:
            skipped[layout] = "the pruning plan's target for this matrix is a ratio"
            continue
        why = SK.unavailable() or SK.layout_support(w, layout, *([pattern] if layout == "nm" else []))
        if why:
            skipped[layout] = why
        elif want(layout):
            k = SK.CompressedKernel(w, layout, threads=torch.get_num_threads(), bias=bias,
                                    **({"nm": pattern} if layout == "nm" else {}))
            out[layout] = _sized(lambda x, k=k: add_bias(k(x)), k.nbytes())
            # SparseLinear's decode path (any shape, the bias added): the kernel as the torch op where its C++
            # implementation is built (a call ~1-2 us shorter than the ctypes call), else the ctypes call
            out[layout].nd = k.forward_op if SK.op_backend() == "c++" else k.forward_nd
    return out


# -- choosing by measurement ---------------------------------------------------------------------------------
def _synced(fn: Callable[[], object], device: torch.device | None) -> Callable[[], object]:
    """``fn`` followed by a wait for the GPU: CUDA kernels return before they finish, so a wall clock around an
    unsynchronised call times the launch, not the product."""
    if device is None or device.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize(device))[0]


def interleaved_timer(fns: dict[str, Callable[[], object]], reps: int = 15, warmup: int = 2,
                      median: bool = False, clock: Callable[[], float] = time.perf_counter,
                      before: Callable[[], object] | None = None) -> dict[str, float]:
    """Seconds per call of each fn, timed in interleaved rounds so that a change of machine load hits every
    candidate alike: for ``dense`` the first quartile of its calls, for the others the third quartile, so that a
    sparse kernel is chosen only when it is faster even on its slow calls against dense's fast ones (on a loaded
    machine medians of isolated calls picked kernels that were slower inside the model). ``median``: the median
    of every fn's calls (the check of a choice the bytes model made, which needs no handicap on either side).
    ``clock``: wall time, or ``time.thread_time`` (one thread's CPU time: benchmarks on a shared machine).
    ``before``: called, untimed, before every timed call (a benchmark's cache eviction: bench/bench_sparse.py)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(reps):
        for name, fn in fns.items():
            if before is not None:
                before()
            t = clock()
            fn()
            times[name].append(clock() - t)
    def quartile(v: list[float], q: int) -> float:
        return statistics.quantiles(v, n=4, method="inclusive")[q - 1] if len(v) > 1 else v[0]

    if median:
        return {k: statistics.median(v) for k, v in times.items()}
    return {k: quartile(v, 1 if k == "dense" else 3) for k, v in times.items()}


def choose(times: dict[str, float], min_gain: float = MIN_GAIN) -> str:
    """The fastest kernel when it beats ``dense`` by ``min_gain``, else ``dense``: sparse is never chosen slower."""
    best = min(times, key=lambda k: (times[k], k != "dense"))
    return best if best != "dense" and times[best] * min_gain <= times["dense"] else "dense"


SCREEN = 3.0   # a candidate whose first timed call takes over 3x dense's is recorded from that call alone
BYTES_MARGIN = 1.25                    # decode: a kernel must read this many times fewer bytes than dense
BYTES_KERNELS = ("bitmask", "nm", "csr", "span")   # ranked by bytes for decode (csr: csr16's layout, fp32 or bf16
                                                   # values; span: bf16 only)
CHECK_REPS = 31                        # interleaved calls per side when a bytes-model choice is checked
CHECK_MAX_REPS = 301                   # ... up to this many where calls are short (CHECK_BUDGET_S per side)
CHECK_BUDGET_S = 0.05


def default_timer(fns: dict[str, Callable], x: torch.Tensor, tokens: int) -> dict[str, float]:
    return interleaved_timer({k: _synced(lambda f=f: f(x), x.device) for k, f in fns.items()},
                             reps=15 if tokens <= DECODE_MAX else 3, warmup=0)


def one_thread_clock(device: torch.device | None = None) -> Callable[[], float]:
    """With one torch thread on the CPU every product runs on the calling thread: its CPU time
    (``time.thread_time``) is the work without the waits for a core that other jobs on a shared machine cause;
    with more threads, or on a GPU, wall time."""
    cpu = device is None or device.type == "cpu"
    return time.thread_time if cpu and torch.get_num_threads() == 1 else time.perf_counter


_EVICT: dict = {}


def evictor() -> Callable[[], float]:
    """A read of a buffer twice the CPU's last-level cache (elsa.machine.last_level_cache_bytes): called before a
    timed call, the call reads its matrix from memory, as every matrix of a model's decode step does (each is
    read once a token, and the model is larger than the caches). Read-only: no dirty line is written back during
    the next timed call. The buffer is kept until :func:`release_evictor`."""
    from elsa.machine import last_level_cache_bytes

    if "buf" not in _EVICT:
        _EVICT["buf"] = torch.ones(2 * last_level_cache_bytes() // 4)
    buf = _EVICT["buf"]
    return lambda: float(buf.sum())


def release_evictor() -> None:
    _EVICT.clear()


def check_timer(fns: dict[str, Callable[[], object]], tokens: int,
                device: torch.device | None = None, cold: bool = False) -> dict[str, float]:
    """The clock of the bytes model's check: medians of CHECK_REPS interleaved calls per side, more (up to
    CHECK_MAX_REPS, about CHECK_BUDGET_S per side) where calls are short: the classes of small matrices, whose
    kernel and dense calls cost about the same, are where a median of 31 moved between runs. ``cold`` (CPU): the
    caches evicted before every call (:func:`evictor`), CHECK_REPS calls per side: decode as a model runs it,
    every matrix from memory (:func:`by_bytes`' second look at a vetoed kernel, :func:`dense_layouts`)."""
    cpu = device is None or device.type == "cpu"
    if cold and cpu:
        return interleaved_timer(fns, reps=CHECK_REPS, warmup=2, median=True, clock=one_thread_clock(device),
                                 before=evictor())
    t = time.perf_counter()
    for fn in fns.values():
        fn()
    per_call = (time.perf_counter() - t) / max(len(fns), 1)
    reps = min(CHECK_MAX_REPS, max(CHECK_REPS, int(CHECK_BUDGET_S / max(per_call, 1e-9))))
    return interleaved_timer(fns, reps=reps, warmup=2, median=True, clock=one_thread_clock(device))


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol relative to the output's max, rtol) of a kernel's output against dense: a different summation order
    moves an fp32 sum by ~1e-6 of its scale, a bf16 output by one rounding step (2**-8)."""
    return (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)


ALT_GAIN = 1.5                         # decode: a kernel reading more bytes is chosen only this much faster
VETO = 1.05                            # decode: the bytes model's kernel is out only when this much slower than dense
BYTES_TIE = 1.25                       # decode: kernels within this of each other's bytes: the faster is chosen ...
TIE_GAIN = 1.10                        # ... when this much faster (else the one with fewer bytes)
STREAMING = frozenset({"bitmask", "nm", "span"})   # no gathers: bound by their bytes; a tie of two goes by bytes ...
STREAMING_GAIN = 2.0                   # ... unless the other is this much faster (a CPU where one is instruction-bound)


def by_bytes(fns: dict[str, Callable], measure: Callable[[list[str]], dict[str, float]],
             margin: float = BYTES_MARGIN, alt_gain: float = ALT_GAIN, veto: float = VETO,
             measure_cold: Callable[[list[str]], dict[str, float]] | None = None) -> tuple[str, dict]:
    """The decode choice from a model of bytes moved, checked by measurement: the kernels of ``BYTES_KERNELS``
    that read ``margin`` times fewer bytes than dense (``fn.nbytes``), at most the two fewest, are timed with
    dense in one interleaved run (``measure(names)`` -> {"dense": s, name: s, ...}, medians). A kernel ``veto``
    times slower than dense is out; of the others the one with fewer bytes is chosen unless the other is
    ``alt_gain`` times faster (where compute, not memory, bounds a kernel: gathers against mask expansion at high
    sparsity). The choice can move only where a measured ratio sits at ``veto`` (against dense) or at
    ``alt_gain`` (between kernels). A strict 1.0 against dense flipped one class of 60 of the default model's
    small matrices between two runs of the same command on a quiet machine (issue 30's 2-thread rerun at 90%),
    where a kernel's call and dense's cost about the same: within ``veto`` the bytes model's choice stands; the
    whole-model check (:func:`verify_in_model`) still sends a model slower with its kernels back to dense.

    Kernels within ``BYTES_TIE`` of each other's bytes are a tie the faster one wins when ``TIE_GAIN`` faster: at
    90% the chunked ``csr`` and ``bitmask`` read about the same (1.02-1.12x on the default model's classes, fp32 or
    bf16), ``csr`` 1.3-2.3x faster. With a tie at 1.10 the bf16 192 x 576 class (csr 1.101x bitmask's bytes) fell
    outside it, into the ``alt_gain`` rule, where its measured 1.47-1.52x sat on the 1.5 threshold: two of four
    plans of one run of ``bench/accept30.sh`` (2026-12-05 21:41 UTC) chose ``bitmask`` for it, the others ``csr``.
    An N:M matrix is not offered to ``bitmask``: ``nm`` reads the same bytes in the checkpoint's own 2:4 layout,
    and the two measured within 10% of each other (a tie at 1.0 would flip).

    A tie of two ``STREAMING`` kernels (no gathers: ``bitmask``, ``nm``, ``span``) goes by bytes unless the other is
    ``STREAMING_GAIN`` (2x) faster, as on a CPU where one of them is bound by an instruction: at 90% in
    bf16 ``span`` and ``bitmask`` read within 4% of each other on the default model's classes, and their measured
    ratio on its ~9 us matrices moved from 0.68 to 1.59 across eight plans (``bench/accept30.sh`` x2, 2026-12-06,
    AMD EPYC), so a timed tie-break flipped two classes between plans of the same command; where one of them is
    much faster (``span`` 1.5-2.2x at the 7B shapes) it also reads fewer bytes.

    A kernel the veto puts out is timed again with the caches evicted before every call (``measure_cold``, as a
    model's decode reads it) and stays out only if it is slower there too: a 192 x 576 fp32 class (442 KB, held in
    L2 when timed again and again) measured its 2:4 kernel at 0.86-1.12x dense across four plans of one command
    (2026-12-06, AMD EPYC), and 1.55-1.75x dense cold. The tie rules above keep the cached timings they were set
    on: timed cold, the kernels' ratios to each other moved about their thresholds as much (docs/results.md)."""
    dense = fns["dense"].nbytes
    ranked = sorted((fns[k].nbytes, k) for k in BYTES_KERNELS if k in fns and not (k == "bitmask" and "nm" in fns))
    rec = {"bytes": {"dense": dense, **{k: b for b, k in ranked}}, "checked": {}}
    names = [k for b, k in ranked if b * margin <= dense][:2]
    if not names:
        return "dense", rec
    t = measure(names)
    rec["checked"] = {k: round(t["dense"] / t[k], 3) for k in names}
    ok = [k for k in names if t[k] <= veto * t["dense"]]
    if len(ok) < len(names) and measure_cold is not None:
        out = [k for k in names if k not in ok]
        tc = measure_cold(out)
        rec["checked_cold"] = {k: round(tc["dense"] / tc[k], 3) for k in out}
        ok = [k for k in names if k in ok or tc[k] <= veto * tc["dense"]]
    if not ok:
        return "dense", rec
    tie = lambda k: fns[k].nbytes <= fns[ok[0]].nbytes * BYTES_TIE  # noqa: E731
    gain = lambda k: (STREAMING_GAIN if {k, ok[0]} <= STREAMING else TIE_GAIN) if tie(k) else alt_gain  # noqa: E731
    faster = [k for k in ok[1:] if t[k] * gain(k) < t[ok[0]]]
    return (faster[0] if faster else ok[0]), rec


def plan_matrix(weight: torch.Tensor, bias: torch.Tensor | None, regimes: dict[str, int] = REGIMES,
                timer: Callable | None = None, min_gain: float = MIN_GAIN, atol: float | None = None,
                rtol: float | None = None, kernels: set[str] | None = None,
                nm: tuple[int, int] | None | str = DETECT) -> tuple[dict, dict[str, Callable]]:
    """Every candidate kernel of one matrix in every regime; returns the plan (chosen kernel per regime, times in
    microseconds, rejections) and the candidate fns. A candidate whose output differs from dense (``tolerance``)
    is rejected. Decode (<= DECODE_MAX tokens), where a kernel of ``BYTES_KERNELS`` is a candidate: chosen by
    :func:`by_bytes`. Otherwise by timing every candidate (:func:`choose`); with the default timer, one whose
    first call takes over ``SCREEN`` times dense's is not timed further and keeps that call's time.
    ``timer(fns, tokens) -> {name: seconds}`` replaces the clock of both (tests); ``kernels``: the candidates
    to consider (dense always); ``nm``: the planned N:M (:func:`candidates`)."""
    fns, skipped = candidates(weight, bias, only=kernels, nm=nm)
    d_atol, d_rtol = tolerance(weight.dtype)
    atol, rtol = atol or d_atol, rtol or d_rtol
    g = torch.Generator(device="cpu").manual_seed(0)
    plan = {"sparsity": float((weight == 0).float().mean()), "skipped": skipped, "rejected": {}, "times_us": {}}
    for regime, tokens in regimes.items():
        x = torch.randn(tokens, weight.shape[1], generator=g).to(weight.device, weight.dtype)
        here = {k: f for k, f in fns.items() if tokens <= DECODE_MAX or k not in DECODE_ONLY}
        ok, first = _checked(here, x, plan["rejected"], regime, atol, rtol)
        if tokens <= DECODE_MAX and any(k in ok for k in BYTES_KERNELS):
            clock = timer or (lambda f, t: check_timer(f, t, x.device))
            cold = timer or (lambda f, t: check_timer(f, t, x.device, cold=True))
            timed = lambda c: lambda names: c(  # noqa: E731
                {n: _synced(lambda n=n: ok[n](x), x.device) for n in ("dense", *names)}, tokens)
            plan[regime], plan.setdefault("bytes_model", {})[regime] = by_bytes(ok, timed(clock),
                                                                                measure_cold=timed(cold))
            continue
        # the screen (one call) serves the timed choice only: before the bytes model it put nm out of one decode
        # plan of four for a 2:4 class on a first call's hiccup (accept30, 2026-12-06 08:42 UTC), where its check
        # measured it 1.1-1.9x dense
        screened = {} if timer else {k: first[k] for k in ok if k != "dense" and first[k] > SCREEN * first["dense"]}
        ok = {k: f for k, f in ok.items() if k not in screened}
        times = timer({k: (lambda f=f: f(x)) for k, f in ok.items()}, tokens) if timer else default_timer(ok, x, tokens)
        plan["times_us"][regime] = {k: round(v * 1e6, 2) for k, v in {**times, **screened}.items()}
        if screened:
            plan.setdefault("screened", {})[regime] = sorted(screened)
        plan[regime] = choose(times, min_gain)
    return plan, fns


def _checked(fns: dict[str, Callable], x: torch.Tensor, rejected: dict, regime: str, atol: float,
             rtol: float) -> tuple[dict[str, Callable], dict[str, float]]:
    """The candidates whose output on ``x`` matches dense's (the others recorded in ``rejected``), and each one's
    first call's seconds after a warm-up call."""
    fns["dense"](x)                                   # warm-up
    t = time.perf_counter()
    ref = _synced(lambda: fns["dense"](x), x.device)()
    first, ok = {"dense": time.perf_counter() - t}, {"dense": fns["dense"]}
    for name, fn in fns.items():
        if name == "dense":
            continue
        try:
            fn(x)                                     # warm-up
            t = time.perf_counter()
            got = _synced(lambda fn=fn: fn(x), x.device)()
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
            rejected[name] = f"failed in regime {regime}: {str(exc).splitlines()[0][:160]}"
            continue
        first[name] = time.perf_counter() - t
        if got.shape != ref.shape or not torch.allclose(got.float(), ref.float(), atol=atol * float(ref.abs().max()),
                                                        rtol=rtol):
            rejected[name] = f"output differs from dense in regime {regime}"
        else:
            ok[name] = fn
    return ok, first


class SparseLinear(nn.Module):
    """An nn.Linear replacement that runs the kernel its plan chose for the call's number of tokens."""

    def __init__(self, linear: nn.Module, plan: dict, fns: dict[str, Callable]):
        """``linear``: the nn.Linear, or transformers' Conv1D (weight stored ``[in, out]``), it replaces."""
        super().__init__()
        self.out_features, self.in_features = matrix_view(linear).shape
        self.plan = plan
        # a regime the plan did not measure runs dense; only the chosen kernels are kept, and the dense weight
        # only where some regime runs dense
        chosen = {r: plan.get(r, "dense") for r in REGIMES}
        self.kernels = {r: fns[k] for r, k in chosen.items()}
        self.bias = linear.bias
        self.weight = linear.weight if "dense" in chosen.values() else None
        nd = getattr(self.kernels["decode"], "nd", None)
        self._decode_op = None if nd is None else nd.__self__.forward_op     # the same kernel as one torch op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decode = x.numel() <= DECODE_MAX * self.in_features
        if decode and self._decode_op is not None and torch.compiler.is_compiling():
            return self._decode_op(x)              # torch.compile: the kernel in the graph, not a graph break
        fn = self.kernels["decode" if decode else "prefill"]
        nd = getattr(fn, "nd", None)              # the compiled kernels take [..., in] as it is
        if nd is not None:
            return nd(x)
        x2d = x.reshape(-1, self.in_features)
        return fn(x2d).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={self.plan['sparsity']:.3f}, decode={self.plan.get('decode')}, "
                f"prefill={self.plan.get('prefill')}")


DENSE_T_GAIN = 1.35   # decode: a dense matrix runs from a transposed copy only when this much faster (cold medians);
                      # on the default model's classes (AMD EPYC, 2026-12-06) the head measured 1.7-2.2, gate/up 1.42-1.46,
                      # q/o 1.03-1.26 and bf16 k/v 1.27-1.28 across eight plans: 1.25 flipped two classes between plans


class TransposedLinear(nn.Module):
    """A dense nn.Linear run from a contiguous ``[in, out]`` copy of its weight (``x @ weight_t``): torch's fp32
    product for short rows (the default model's 576 inputs, its 49152 x 576 head) streams a weight stored as
    ``[out, in]`` at half the rate of its transpose on the CPUs measured (docs/results.md), and decode is that
    product. Chosen per matrix by :func:`dense_layouts`, for the dense baseline and a sparse model's dense matrices
    alike. ``weight`` is the ``[out, in]`` view of the copy (code that reads a head's weight still finds it); the
    module it replaced keeps its own weight (a tied embedding still looks tokens up in it)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.weight_t = linear.weight.detach().t().contiguous()
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, stored transposed"


def dense_matrices(model: nn.Module) -> dict[str, nn.Linear]:
    """The dense nn.Linear matrices a decode step multiplies: the output head and the block matrices that are still
    nn.Linear (a sparse model's dense ones; routers aside), by full module name."""
    from elsa.errors import ElsaError

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {n: m for n, m in model.named_modules() if m is head and type(m) is nn.Linear}
    try:
        out.update({n: m for n, m in block_linears(model).items() if type(m) is nn.Linear})
    except ElsaError:        # no Linear left in the blocks (every one sparse): the head only
        pass
    return out


def dense_layouts(model: nn.Module, saved: dict | None = None, timer: Callable | None = None) -> dict:
    """Per dense matrix (:func:`dense_matrices`), its decode layout: ``n`` (as stored,
    ``F.linear``) or ``t`` (:class:`TransposedLinear`, a transposed copy), measured at one token (medians of
    interleaved calls, one measurement per shape, dtype and bias) and chosen ``t`` only DENSE_T_GAIN faster;
    modules chosen ``t`` are replaced in place. ``saved``: a previous result (a saved plan's, or the dense
    baseline's, so that a sparse model's dense matrices run as the baseline's do): its choices are applied,
    nothing timed. ``timer``: check_timer's signature (tests). CPU only ({} elsewhere). Returns
    {name: {"layout", "gain"}}."""
    mats = dense_matrices(model)
    if not mats or next(iter(mats.values())).weight.device.type != "cpu":
        return {}
    out, measured = {}, {}
    with torch.no_grad():
        for name, lin in mats.items():
            w, b = lin.weight, lin.bias
            if saved is not None:
                if name not in saved:
                    continue
                out[name] = dict(saved[name])
            else:
                key = (tuple(w.shape), w.dtype, b is not None)
                if key not in measured:      # as in a decode step, each call reads its weight from memory
                    tl = TransposedLinear(lin)  # the two modules a decode step would call
                    x = torch.randn(1, w.shape[1], dtype=w.dtype, generator=torch.Generator().manual_seed(0))
                    times = (timer or check_timer)({"n": lambda: lin(x), "t": lambda: tl(x)}, 1, w.device, cold=True)
                    gain = times["n"] / times["t"]
                    measured[key] = {"layout": "t" if gain >= DENSE_T_GAIN else "n", "gain": round(gain, 3)}
                    del tl
                out[name] = dict(measured[key])
            if out[name]["layout"] == "t":
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, TransposedLinear(lin))
    release_evictor()
    return out


def matrix_view(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of an nn.Linear, or of a Conv1D (stored ``[in, out]``: its transpose, a view)."""
    from elsa.model.structure import _stored_transposed

    return module.weight.t() if _stored_transposed(module) else module.weight


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear and Conv1D (GPT-2) inside the decoder blocks except MoE routers, by full module name: the
    matrices a pruned model has zeros in (lm_head and embeddings are outside the blocks). Fused 3-D expert tensors
    are not modules of their own and stay dense."""
    from elsa.model.structure import _conv1d_class, blocks_and_prefix, routers

    kinds = (nn.Linear, _conv1d_class()) if _conv1d_class() else (nn.Linear,)
    blocks, prefix = blocks_and_prefix(model)
    out = {}
    for i, block in enumerate(blocks):
        skip = {id(m) for m in routers(block).values()}
        out.update({f"{prefix}.{i}.{n}": m for n, m in block.named_modules()
                    if isinstance(m, kinds) and id(m) not in skip})
    return out


EXPERT_FLAGS = ("has_gate", "is_transposed", "has_bias")


def block_experts(model: nn.Module) -> dict[str, tuple[nn.Module, list[str]]]:
    """The fused expert modules inside the decoder blocks: {module name: (module, its 3-D expert parameters)}.
    Found structurally (``elsa.model.structure.expert_tensors``: 3-D parameters of a module that is not a convolution), as
    the pruning engine finds them."""
    from elsa.model.structure import blocks_and_prefix, expert_tensors

    blocks, prefix = blocks_and_prefix(model)
    out = {}
    for i, block in enumerate(blocks):
        for n, m in block.named_modules():
            params = [a for a, _p in expert_tensors(m)]
            if params:
                out[f"{prefix}.{i}.{n}" if n else f"{prefix}.{i}"] = (m, params)
    return out


class ExpertKernel:
    """One expert's matrix: the kernel its plan chose per regime, called on that expert's routed tokens."""

    def __init__(self, plan: dict, fns: dict[str, Callable], in_features: int):
        self.plan, self.in_features = plan, in_features
        self.kernels = {r: fns[plan.get(r, "dense")] for r in REGIMES}

    def __call__(self, x2d: torch.Tensor) -> torch.Tensor:
        return self.kernels["decode" if x2d.shape[0] <= DECODE_MAX else "prefill"](x2d)


def _expert_matrix(module: nn.Module, attr: str, e: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expert ``e``'s ``[out, in]`` matrix of parameter ``attr`` (contiguous) and its bias, if the module has one."""
    w = getattr(module, attr)[e]
    w = (w.t() if getattr(module, "is_transposed", False) else w).detach().contiguous()
    bias = getattr(module, f"{attr}_bias", None) if getattr(module, "has_bias", False) else None
    return w, (bias[e].detach() if bias is not None else None)


def sparse_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts module's forward over per-expert kernels (``self._elsa_kernels[attr][e]``): for each expert
    some token was routed to, its tokens through the up (or gate_up) kernel, the module's gate or activation, the
    down kernel and the optional post-expert norm, weighted by the routing weight and summed per token, as
    transformers' eager experts loop does with dense matrices."""
    kernels = self._elsa_kernels
    first = "gate_up_proj" if self.has_gate else "up_proj"
    out = torch.zeros(hidden_states.shape[0], hidden_states.shape[-1], dtype=torch.float32,
                      device=hidden_states.device)
    experts = len(kernels["down_proj"])
    for e in torch.unique(top_k_index).tolist():
        if e >= experts:                     # expert-parallel sentinel: no expert here
            continue
        token_idx, pos = torch.where(top_k_index == e)
        h = kernels[first][e](hidden_states[token_idx])
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = kernels["down_proj"][e](h)
        if getattr(self, "has_post_expert_norm", False):
            h = self.post_expert_norm(h)
        out.index_add_(0, token_idx, (h * top_k_weights[token_idx, pos, None]).float())
    return out.to(hidden_states.dtype)


def _reuse(plan: dict, weight: torch.Tensor, bias, regimes: dict[str, int], measured_on: str, nm=DETECT):
    """The kernels a measured (or saved) plan chose, built for this matrix, each checked against dense on it (a
    mismatch falls back to dense). Only the chosen kernels are built."""
    fns, _skipped = candidates(weight, bias, only={plan.get(r, "dense") for r in regimes}, nm=nm)
    out = {"sparsity": float((weight == 0).float().mean()), "measured_on": measured_on, "rejected": {}}
    atol, rtol = tolerance(weight.dtype)
    g = torch.Generator().manual_seed(0)
    for r, tokens in regimes.items():
        k = plan.get(r, "dense")
        x = torch.randn(min(tokens, DECODE_MAX + 1) if tokens > DECODE_MAX else tokens, weight.shape[1],
                        generator=g).to(weight.device, weight.dtype)
        ref = fns["dense"](x)
        ok = k in fns and torch.allclose(fns[k](x).float(), ref.float(), atol=atol * float(ref.abs().max()), rtol=rtol)
        out[r] = k if ok else "dense"
        if not ok:
            out["rejected"][k] = f"output differs from dense in regime {r}" if k in fns else "not available here"
    return out, fns


def model_timer(run: dict[str, Callable[[], object]], tokens: int,
                device: torch.device | None = None) -> dict[str, float]:
    """The default clock of :func:`verify_in_model`: whole-model forwards in interleaved rounds, medians."""
    return interleaved_timer(run, reps=9 if tokens <= DECODE_MAX else 3, warmup=1, median=True,
                             clock=one_thread_clock(device))


def verify_in_model(model: nn.Module, modules: dict[str, "SparseLinear"], dense_fns: dict[str, Callable],
                    regimes: dict[str, int], min_gain: float, timer: Callable = model_timer) -> dict:
    """Per regime, the whole model's forward with the kernels chosen per matrix against the same model with every
    matrix dense, timed side by side (dense's first quartile against the chosen kernels' third, as per matrix).
    Per-matrix timings did not always hold inside the model (on a loaded 2-core machine 512-token prefill at 50%
    and 2:4 measured 0.77-0.80x dense with kernels each faster alone): where the model is not faster by
    ``min_gain`` with them (decode, whose choices the bytes model made: not slower, medians against medians),
    that regime goes back to dense for every matrix. Returns, per regime, the times (us)
    and whether the chosen kernels were kept."""
    out = {}
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    device = next(model.parameters()).device
    if timer is model_timer:
        timer = functools.partial(model_timer, device=device)
    for regime, tokens in regimes.items():
        sparse_mods = {n: m for n, m in modules.items() if m.plan.get(regime, "dense") != "dense"}
        if not sparse_mods or not vocab:
            continue
        chosen = {n: m.kernels[regime] for n, m in sparse_mods.items()}
        ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)

        def forward(kernels):
            def go():
                for n, m in sparse_mods.items():
                    m.kernels[regime] = kernels[n]
                return model(input_ids=ids, use_cache=False)
            return _synced(go, device)

        times = timer({"dense": forward({n: dense_fns[n] for n in sparse_mods}), "chosen": forward(chosen)}, tokens)
        keep = choose(times, 1.0 if tokens <= DECODE_MAX else min_gain) == "chosen"
        for n, m in sparse_mods.items():
            m.kernels[regime] = chosen[n] if keep else dense_fns[n]
            if not keep:
                m.plan[regime] = "dense"
                m.plan.setdefault("reverted", []).append(regime)
        out[regime] = {"times_us": {k: round(v * 1e6, 1) for k, v in times.items()}, "kept": keep,
                       "matrices": len(sparse_mods)}
    return out


class _Planner:
    """What sparsify shares between matrices: the settings, the measured classes, and a saved plan if any."""

    def __init__(self, regimes, min_gain, timer, min_sparsity, share, saved, kernels, targets=None):
        self.regimes, self.min_gain, self.timer = regimes, min_gain, timer
        self.min_sparsity, self.share, self.saved, self.kernels = min_sparsity, share, saved, kernels
        self.targets = targets          # elsa.artifacts.plan_record.PlanTargets, or None (no pruning plan)
        self.measured: dict = {}
        self.plans: dict = {}

    def __call__(self, name: str, weight: torch.Tensor, bias, param: str) -> tuple[dict, dict[str, Callable]]:
        """One matrix's plan and kernels: left dense where a pruning plan does not plan it (``param``: its
        parameter's name, for the plan's reason) and as it is under ``min_sparsity`` (its planned ratio, else its
        measured zeros); from the saved plan; reused from the matrix of its class (shape, dtype, bias, sparsity to
        1%, planned N:M) measured first; or measured."""
        sparsity = float((weight == 0).float().mean())
        target = self.targets.target(name) if self.targets is not None else None
        nm = DETECT if self.targets is None else ((target.n, target.m) if target and target.is_nm else None)
        key = (tuple(weight.shape), weight.dtype, bias is not None, round(sparsity, 2), nm)
        unplanned = self.targets is not None and target is None
        if unplanned or (target.ratio if target is not None else sparsity) < self.min_sparsity:
            note = f"left dense: {self.targets.dense_reason(param)}" if unplanned else "left as it is"
            plan = {"sparsity": sparsity, **{r: "dense" for r in self.regimes}, "note": note}
            fns = {"dense": (lambda x, w=weight, b=bias: F.linear(x, w, b))}
        elif self.saved is not None:
            plan, fns = _reuse(self.saved.get(name, {}), weight, bias, self.regimes, "saved plan", nm)
        elif self.share and key in self.measured:
            plan, fns = _reuse(self.plans[self.measured[key]], weight, bias, self.regimes, self.measured[key], nm)
        else:
            plan, fns = plan_matrix(weight, bias, self.regimes, self.timer, self.min_gain, kernels=self.kernels, nm=nm)
            self.measured[key] = name
        self.plans[name] = plan
        return plan, fns


def sparsify(model: nn.Module, regimes: dict[str, int] = REGIMES, min_gain: float = MIN_GAIN,
             timer: Callable | None = None, min_sparsity: float = 0.25, progress: bool = False,
             share: bool = True, verify: bool | None = None, whole_model_timer: Callable = model_timer,
             saved: dict | None = None, kernels: set[str] | None = None, pruning_plan=None) -> dict:
    """Replace, in place, each pruned Linear of the decoder blocks by a SparseLinear running the kernel chosen per
    regime (decode: the bytes model checked by measurement, :func:`by_bytes`; prefill: measured fastest, dense
    unless a sparse kernel wins by ``min_gain``). Matrices under ``min_sparsity`` are left as they are. With
    ``share`` (default) matrices of one class (shape, dtype, bias, sparsity to 1%) share one measurement; each
    reused choice is still checked against dense on its own matrix. ``saved``: the ``matrices`` table of a saved
    plan (:func:`save_plan`): its choices are built and checked against dense, nothing is timed. ``kernels``:
    the candidates to consider (dense always). Returns the plan: per matrix, the kernels and times (or the matrix
    they were measured on), and a summary of what was chosen.

    ``pruning_plan``: the run's PruningPlan, or the record saved with the model (elsa.artifacts.compressed.read_plan):
    only its planned matrices become candidates (the others stay as they are, the plan's reason in their
    ``note``; ``min_sparsity`` compares the planned ratio), and the N:M kernel is offered where a matrix's target
    is N:M, not where its zeros happen to hold 2:4. Without one every matrix of the blocks is a candidate, its
    kernels offered by its zeros.

    With ``verify`` (default: when the real clock times the matrices and no plan is given) the choices are then
    checked in the whole model (:func:`verify_in_model`): a regime whose kernels do not make the model faster
    runs dense."""
    from elsa.artifacts.plan_record import PlanTargets

    planner = _Planner(regimes, min_gain, timer, min_sparsity, share, saved, kernels, PlanTargets.of(pruning_plan))
    replaced, dense_fns, dense_weights = {}, {}, {}
    items = list(block_linears(model).items())
    expert_modules = block_experts(model)     # found before any Linear is replaced (the blocks are found by them)
    with torch.no_grad():
        for i, (name, lin) in enumerate(items):
            if progress:
                print(f"\relsa: {'building' if saved is not None else 'measuring'} kernels {i + 1}/{len(items)}",
                      end="", flush=True)
            weight = matrix_view(lin)
            if weight is not lin.weight:       # Conv1D: the kernels take the [out, in] matrix, laid out as such
                weight = weight.contiguous()
            plan, fns = planner(name, weight, lin.bias, f"{name}.weight")
            if "note" not in plan:
                parent, _, child = name.rpartition(".")
                replaced[name] = SparseLinear(lin, plan, fns)
                dense_fns[name], dense_weights[name] = fns["dense"], lin.weight
                setattr(model.get_submodule(parent), child, replaced[name])
        for mod_name, (mod, params) in expert_modules.items():
            _sparsify_experts(mod_name, mod, params, planner, replaced, dense_fns)
        verified = None
        if replaced and (verify if verify is not None else (timer is None and saved is None)):
            if progress:
                print("\relsa: checking the chosen kernels in the whole model", end="", flush=True)
            verified = verify_in_model(model, replaced, dense_fns, regimes, min_gain, whole_model_timer)
            for name, mod in replaced.items():   # a regime sent back to dense needs the dense weight
                if isinstance(mod, SparseLinear) and mod.weight is None and "dense" in (mod.plan.get(r, "dense") for r in REGIMES):
                    mod.weight = dense_weights[name]
        originals = dict(items)
        for name, mod in replaced.items():       # dense in every regime: the original module, without a wrapper
            if isinstance(mod, SparseLinear) and all(mod.plan.get(r, "dense") == "dense" for r in REGIMES):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, originals[name])
    release_evictor()
    if progress:
        print(flush=True)
    counts: dict = {r: {} for r in regimes}
    for p in planner.plans.values():
        for r in regimes:
            counts[r][p[r]] = counts[r].get(p[r], 0) + 1
    return {"matrices": planner.plans, "chosen": counts, "min_gain": min_gain, "regimes": dict(regimes),
            "measured": len(planner.measured), "verified_in_model": verified,
            "source": "saved" if saved is not None else "measured", "pruning_plan": pruning_plan is not None}


def _sparsify_experts(mod_name: str, mod: nn.Module, params: list[str], planner: _Planner, replaced: dict,
                      dense_fns: dict) -> None:
    """A fused experts module: every expert's matrix planned, and the module's forward replaced by the routed
    loop over their kernels; left dense (recorded) without transformers' experts interface flags."""
    regimes = planner.regimes
    missing = [f for f in EXPERT_FLAGS if not hasattr(mod, f)]
    uses = {"gate_up_proj", "down_proj"} if getattr(mod, "has_gate", False) else {"up_proj", "down_proj"}
    if missing or not uses <= set(params):
        why = (f"no {', '.join(missing)} flag (transformers' experts interface)" if missing else
               f"its 3-D parameters {params} are not {sorted(uses)}")
        for attr in params:
            planner.plans[f"{mod_name}.{attr}"] = {**{r: "dense" for r in regimes}, "note": f"left dense: {why}"}
        return
    table = {}
    for attr in sorted(uses):
        table[attr] = []
        for e in range(getattr(mod, attr).shape[0]):
            name = f"{mod_name}.{attr}[{e}]"
            weight, bias = _expert_matrix(mod, attr, e)
            plan, fns = planner(name, weight, bias, f"{mod_name}.{attr}")
            table[attr].append(ExpertKernel(plan, fns, weight.shape[1]))
            if "note" not in plan:
                replaced[name], dense_fns[name] = table[attr][-1], fns["dense"]
    mod._elsa_kernels = table
    mod.forward = types.MethodType(sparse_experts_forward, mod)


# -- the plan saved with a model ---------------------------------------------------------------------------
PLAN_FILE = "elsa_sparse_plan-{dtype}.json"     # one per dtype: a dir's fp32 and bf16 plans live side by side
PLAN_VERSION = 4    # 2: decode chosen with VETO and BYTES_TIE; 3: BYTES_TIE 1.25 with TIE_GAIN; 4: the dense
                    # matrices' layouts (dense_layout) too (a plan chosen by another rule is measured again)


def plan_path(directory: Path | str, model: nn.Module) -> Path:
    return Path(directory) / PLAN_FILE.format(dtype=str(next(model.parameters()).dtype).removeprefix("torch."))


def plan_key(model: nn.Module) -> dict:
    """What a saved plan is valid for: these kernels' sources on this kind of CPU, the thread count, the
    model's dtype and device. A plan for another key is measured again."""
    from elsa.artifacts.kernels import C_SOURCE, cpu_key

    p = next(model.parameters())
    return {"plan_version": PLAN_VERSION, "kernels": cpu_key(C_SOURCE + _C_SOURCE), "threads": torch.get_num_threads(),
            "dtype": str(p.dtype).removeprefix("torch."), "device": p.device.type}


def save_plan(directory: Path | str, plan: dict, model: nn.Module) -> Path:
    """Write ``plan`` (what :func:`sparsify` returned for ``model``) as ``<directory>/elsa_sparse_plan-<dtype>.json``:
    per matrix the kernel of each regime, with the key it is valid for."""
    from elsa.run.tracking import write_json_atomic

    regimes = plan["regimes"]
    data = {**plan_key(model), "regimes": regimes, "chosen": plan["chosen"],
            "verified_in_model": plan.get("verified_in_model"),
            "matrices": {n: {r: p[r] for r in regimes if r in p} for n, p in plan["matrices"].items()},
            "dense_layout": plan.get("dense_layout", {})}
    path = plan_path(directory, model)
    write_json_atomic(path, data)
    return path


def load_plan(directory: Path | str, model: nn.Module) -> tuple[dict | None, str]:
    """The saved plan of ``directory`` if it is valid for ``model`` here, else None; and why (one line)."""
    f = plan_path(directory, model)
    if not f.is_file():
        return None, f"no saved plan ({f.name})"
    try:
        data = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"{f.name} is unreadable ({exc})"
    key = plan_key(model)
    diff = [f"{k}={data.get(k)!r} (here {v!r})" for k, v in key.items() if data.get(k) != v]
    if diff or not isinstance(data.get("matrices"), dict):
        return None, f"the saved plan is for another setting: {', '.join(diff) or 'no matrices table'}"
    return data, f"saved plan {f}"


def sparsify_with_plan(model: nn.Module, directory: Path | str | None, progress: bool = False,
                       remeasure: bool = False, dense_layout: dict | None = None, **kwargs) -> dict:
    """:func:`sparsify` from the plan saved in ``directory`` when it is valid here (nothing timed), else
    measured and saved there (when the directory is writable); then the matrices left dense (the head among
    them) get their decode layout (:func:`dense_layouts`: the saved plan's, ``dense_layout`` (the dense
    baseline's choices, so both run their dense matrices alike), else measured). The returned plan says which
    (``source``, ``plan_note``, ``dense_layout``)."""
    data, why = (None, "--remeasure") if remeasure or directory is None else load_plan(directory, model)
    if data is not None:
        plan = sparsify(model, regimes=data["regimes"], saved=data["matrices"], progress=progress, **kwargs)
        plan["dense_layout"] = dense_layouts(model, saved=dense_layout if dense_layout is not None
                                             else data.get("dense_layout", {}))
        plan["plan_note"] = why
        return plan
    plan = sparsify(model, progress=progress, **kwargs)
    plan["dense_layout"] = dense_layouts(model, saved=dense_layout)
    plan["plan_note"] = f"measured ({why})"
    if directory is not None:
        try:
            plan["plan_note"] += f"; saved to {save_plan(directory, plan, model)}"
        except OSError as exc:
            plan["plan_note"] += f"; not saved ({exc})"
    return plan
