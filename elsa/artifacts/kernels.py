"""Batch-1 (and small-batch) kernels that read the compressed checkpoint's own layouts (elsa.artifacts.compressed), issue 30.

- ``bitmask``: one bit per weight, ``numpy.packbits`` big bit order over the row-major matrix, and the non-zero
  values in row-major order (fp32 or bf16): what ``elsa.artifacts.compressed.encode(..., encoding="bitmask")`` stores, read as
  it is (the bytes are bit-reversed in registers: GFNI where present) plus one int64 offset per row (where each
  row's values start, so that threads can split the rows);
- ``nm`` (2:4 vectorised; any N:M with M <= 256 through a scalar loop): ``N`` values per group of ``M`` and their
  positions in ceil(log2 M) bits, little bit order: ``encode(..., encoding="nm")``'s values and indices;
- ``csr`` (not a checkpoint layout, built from the weight): each row's non-zeros in chunks of 16, a chunk holding
  a uint16 base column and 16 uint8 offsets from it, 5 bytes per fp32 non-zero (3 bf16); per chunk one AVX-512
  gather of the activations and one FMA. Where compute bounds (90%) it beats the mask expansion.
- ``span`` (bf16 values, not a checkpoint layout, built from the weight): each row's non-zeros by aligned
  256-column spans, in chunks of at most 32 within one span (a uint16 header, uint8 offsets, the values packed as
  CSR's: 3 bytes a non-zero); per chunk the span's bf16 activations picked by four two-source word permutes and one
  ``vdpbf16ps``: no gather and no expand, which bound ``csr`` and ``bitmask`` on Zen 4. Needs AVX-512 BF16 (else
  not a candidate; a scalar loop keeps it correct).

For each row, 64 columns at a time: 64 mask bits, then per 16 columns an AVX-512 expand-load of the next values
(``vexpandps`` / ``vpexpandw`` for bf16) into their column lanes and one FMA with the activations; 2:4 loads
16 values and their 2-bit positions per 32 columns and picks the activations with one two-source permute. A bf16
matrix times bf16 activations (a bf16 model) on a CPU with AVX-512 BF16 takes ``bm_row_dp``: per 64 columns two
register expands and two ``vdpbf16ps`` on the activations as they are (2.6 -> 0.56 ns per 32 columns on Zen 4). The
activations (fp32 or bf16) are widened to fp32 once per call, sums are fp32, the output is rounded to the
activations' dtype (bf16 round-to-nearest-even). Decode is memory bound: at 90% a row moves 0.125 + 0.1 x 4
(fp32) or + 0.1 x 2 (bf16) bytes per weight against 4 or 2 dense. Without AVX-512 (VBMI2/VL/BW) the same
layouts run through scalar loops; without a C compiler the kernels are absent and the reason is recorded.

The library is compiled once per source and CPU (``cc -O3 -march=native -fopenmp``) into ``$ELSA_CACHE/kernels``
and called through ctypes; ``threads`` share each matrix by its bytes (OpenMP); every loop prefetches its
streams a few KB ahead.
"""
from __future__ import annotations

import ctypes
import logging
import math
import warnings

import torch

from elsa import ckernels

log = logging.getLogger(__name__)

MAX_BATCH = 8
BITMASK_VALUE_PAD = 32          # zeros after the bitmask layout's values (its bf16 kernel loads 32 at a time)
SPAN = 256                      # the span layout's columns (SPAN in the C source; span_chunk picks from 8 x 32)
SPAN_MAX_COLS = 2048 * SPAN     # its uint16 chunk header: 11 bits of span, 5 of count

C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512VBMI2__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define ELSA512 1
#endif
#define AI static inline __attribute__((always_inline))
/* software prefetch, bytes ahead in each stream: decode streams every matrix once, and the hardware prefetcher
   alone left the kernels ~25% under the memory's rate */
#define PFB 4096
#define SPAN ELSA_SPAN_COLS      /* the span layout's columns per span (kernels.SPAN) */
#define PREF(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)

int elsa_simd(void) {
#ifdef ELSA512
    return 512;
#else
    return 0;
#endif
}

AI uint64_t ld64(const uint8_t* p) { uint64_t v; memcpy(&v, p, 8); return v; }
AI uint64_t ld_n(const uint8_t* p, int n) { uint64_t v = 0; memcpy(&v, p, n); return v; }
/* packbits writes element 0 of a byte in its top bit: reverse the bits of each byte, so bit j = element j */
AI uint64_t bitrev_bytes(uint64_t v) {
#if defined(__GFNI__) && defined(__SSE2__)
    __m128i x = _mm_cvtsi64_si128((long long)v);
    x = _mm_gf2p8affine_epi64_epi8(x, _mm_set1_epi64x((long long)0x8040201008040201ULL), 0);
    return (uint64_t)_mm_cvtsi128_si64(x);
#else
    v = ((v >> 1) & 0x5555555555555555ULL) | ((v & 0x5555555555555555ULL) << 1);
    v = ((v >> 2) & 0x3333333333333333ULL) | ((v & 0x3333333333333333ULL) << 2);
    return ((v >> 4) & 0x0F0F0F0F0F0F0F0FULL) | ((v & 0x0F0F0F0F0F0F0F0FULL) << 4);
#endif
}
AI float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
AI uint16_t f2bf(float f) {           /* round to nearest even (NaN kept a NaN) */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#ifdef ELSA512
AI __m512 expand_vals(const void* v, int64_t* p, __mmask16 k, int vbf) {
    __m512 w;
    if (vbf) {
        __m256i h = _mm256_maskz_expandloadu_epi16(k, (const uint16_t*)v + *p);
        w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
        w = _mm512_maskz_expandloadu_ps(k, (const float*)v + *p);
    }
    *p += __builtin_popcount((unsigned)k);
    return w;
}

/* out[b] = sum over the row's set bits of value * x[b, column]; B and vbf are constants at every call site.
   Four accumulators per token (two from 3 tokens, one from 5) so that FMA latency does not bound the loop.
   fp32 values: per 16 columns one expand-load. bf16 values: per 32 columns one 16-bit expand-load; the even
   columns' values are its 32-bit lanes shifted left 16, the odd ones' its lanes with the low half cleared, so
   they meet ``xd``, the activations of each 32 columns reordered once per call as 16 even then 16 odd. */
AI void bm_row(const uint8_t* m, const void* v, int64_t p, int64_t cols, const float* x, const float* xd, int B,
               int vbf, float* out) {
    const int NA = B <= 2 ? 4 : (B <= 4 ? 2 : 1);
    __m512 a[4][MAXB];
    for (int q = 0; q < 4; q++)
        for (int b = 0; b < B; b++) a[q][b] = _mm512_setzero_ps();
    int64_t c = 0;
    if (vbf) {
        const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
        for (; c + 32 <= cols; c += 32) {
            __mmask32 k = (__mmask32)bitrev_bytes(ld_n(m + c / 8, 4));
            PREF(m + c / 8 + PFB / 8);
            PREF((const char*)((const uint16_t*)v + p) + PFB);
            __m512i h = _mm512_maskz_expandloadu_epi16(k, (const uint16_t*)v + p);
            p += __builtin_popcount((unsigned)k);
            __m512 ev = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
            __m512 od = _mm512_castsi512_ps(_mm512_and_si512(h, hi));
            const int q = (int)((c / 32) & 1) * 2;       /* accumulators 0, 1 then 2, 3 (mod NA) */
            for (int b = 0; b < B; b++) {
                const float* xb = xd + b * cols + c;
                a[q % NA][b] = _mm512_fmadd_ps(ev, _mm512_loadu_ps(xb), a[q % NA][b]);
                a[(q + 1) % NA][b] = _mm512_fmadd_ps(od, _mm512_loadu_ps(xb + 16), a[(q + 1) % NA][b]);
            }
        }
    } else {
        for (; c + 64 <= cols; c += 64) {
            uint64_t bits = bitrev_bytes(ld64(m + c / 8));
            PREF(m + c / 8 + PFB / 8);
            PREF((const char*)((const float*)v + p) + PFB);
            PREF((const char*)((const float*)v + p) + PFB + 64);
            __m512 w[4];
            for (int q = 0; q < 4; q++) w[q] = expand_vals(v, &p, (__mmask16)(bits >> (16 * q)), 0);
            for (int b = 0; b < B; b++)
                for (int q = 0; q < 4; q++)
                    a[q % NA][b] = _mm512_fmadd_ps(w[q], _mm512_loadu_ps(x + b * cols + c + 16 * q), a[q % NA][b]);
        }
    }
    for (; c < cols; c += 16) {        /* cols is a multiple of 8: 16 or the last 8 columns */
        int n = cols - c >= 16 ? 16 : 8;
        __mmask16 k = (__mmask16)bitrev_bytes(ld_n(m + c / 8, n / 8)), lanes = n == 16 ? 0xffff : 0xff;
        __m512 w = expand_vals(v, &p, k, vbf);
        for (int b = 0; b < B; b++)
            a[0][b] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lanes, x + b * cols + c), a[0][b]);
    }
    for (int b = 0; b < B; b++) {
        __m512 s = a[0][b];
        for (int q = 1; q < NA; q++) s = _mm512_add_ps(s, a[q][b]);
        out[b] = _mm512_reduce_add_ps(s);
    }
}

#ifdef __AVX512BF16__
#define ELSADP 1
/* bf16 values and bf16 activations (a bf16 model's decode): per 64 columns one 64-bit mask, two register-form
   16-bit expands of the next values into their column lanes, and per token two bf16 dot products (vdpbf16ps:
   each fp32 lane adds the products of two adjacent columns) with the activations as they are, not widened.
   Zen 4 measured (a scratch benchmark, 4096x4096 at 90%, one thread): 0.56 ns per 32 columns against 2.6 for
   the widening loop above (its 16-bit expand-load, two shifts and two fp32 FMAs) and ~1.2 for ``csr``'s gathers.
   The values array is padded by 32 so that a 64-byte load at a row's last value stays inside it. The products
   are exact in fp32 and summed in fp32 like dense bf16's; vdpbf16ps flushes subnormal inputs to zero. */
AI void bm_row_dp(const uint8_t* m, const uint16_t* v, int64_t p, int64_t cols, const uint16_t* x, int B,
                  float* out) {
    __m512 a[2][MAXB];
    for (int b = 0; b < B; b++) a[0][b] = a[1][b] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 64 <= cols; c += 64) {
        const uint64_t k = bitrev_bytes(ld64(m + c / 8));
        PREF(m + c / 8 + PFB / 8);
        PREF((const char*)(v + p) + PFB);
        const int n0 = __builtin_popcount((uint32_t)k);
        const __m512bh h0 = (__m512bh)_mm512_maskz_expand_epi16((__mmask32)k, _mm512_loadu_si512(v + p));
        const __m512bh h1 = (__m512bh)_mm512_maskz_expand_epi16((__mmask32)(k >> 32), _mm512_loadu_si512(v + p + n0));
        p += __builtin_popcountll(k);
        for (int b = 0; b < B; b++) {
            const uint16_t* xb = x + b * cols + c;
            a[0][b] = _mm512_dpbf16_ps(a[0][b], h0, (__m512bh)_mm512_loadu_si512(xb));
            a[1][b] = _mm512_dpbf16_ps(a[1][b], h1, (__m512bh)_mm512_loadu_si512(xb + 32));
        }
    }
    for (; c + 32 <= cols; c += 32) {
        const uint32_t k = (uint32_t)bitrev_bytes(ld_n(m + c / 8, 4));
        const __m512bh h = (__m512bh)_mm512_maskz_expand_epi16((__mmask32)k, _mm512_loadu_si512(v + p));
        p += __builtin_popcount(k);
        for (int b = 0; b < B; b++)
            a[0][b] = _mm512_dpbf16_ps(a[0][b], h, (__m512bh)_mm512_loadu_si512(x + b * cols + c));
    }
    for (int b = 0; b < B; b++) out[b] = _mm512_reduce_add_ps(_mm512_add_ps(a[0][b], a[1][b]));
    for (; c < cols; c += 8) {         /* the last 8, 16 or 24 columns */
        const unsigned byte = m[c / 8];
        for (int j = 0; j < 8; j++) {
            if (!(byte & (0x80u >> j))) continue;
            const float w = bf2f(v[p++]);
            for (int b = 0; b < B; b++) out[b] += w * bf2f(x[b * cols + c + j]);
        }
    }
}

/* "span" (bf16 values, bf16 activations): each row's non-zeros by aligned spans of SPAN = 256 columns, in chunks
   of at most 32 within one span: a uint16 header (span << 5 | count - 1), the chunk's values and uint8 offsets in
   the span packed with the row's others (no padding: 3 bytes a non-zero, 2 a chunk). Per chunk: its values and
   offsets loaded under a count mask, the span's 256 activations (8 registers of 32 bf16, from a copy padded to
   whole spans) picked by four two-source word permutes (offset bits 0-5) and three blends (bits 6 and 7), one
   vdpbf16ps. No gather and no expand: on Zen 4 a 16-lane gather costs ~6 ns and a 32-lane word expand ~4-5
   cycles, a word permute ~1 cycle (scratch benchmarks, 2026-12-06: a 4096x4096 bf16 matrix at 90%, one thread:
   0.27 ms against 0.58 for bm_row_dp and 0.65 for csr's gathers). Masked-off lanes hold value 0. */
AI void span_chunk(const uint16_t* hdr, const uint8_t* off, const uint16_t* v, int64_t q, int64_t* p,
                   const uint16_t* x, int64_t xs, int B, __m512* a) {
    const __m512i b6 = _mm512_set1_epi16(64), b7 = _mm512_set1_epi16(128);
    const unsigned h = hdr[q];
    const int n = (int)(h & 31u) + 1;
    const __mmask32 km = n == 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1u);
    PREF((const char*)(v + *p) + PFB);
    PREF(off + *p + PFB / 2);
    const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(km, v + *p);
    const __m512i ix = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(km, off + *p));
    *p += n;
    const __mmask32 k6 = _mm512_test_epi16_mask(ix, b6), k7 = _mm512_test_epi16_mask(ix, b7);
    for (int b = 0; b < B; b++) {
        const uint16_t* sx = x + b * xs + (int64_t)(h >> 5) * SPAN;
        const __m512i x0 = _mm512_permutex2var_epi16(_mm512_loadu_si512(sx), ix, _mm512_loadu_si512(sx + 32));
        const __m512i x1 = _mm512_permutex2var_epi16(_mm512_loadu_si512(sx + 64), ix, _mm512_loadu_si512(sx + 96));
        const __m512i x2 = _mm512_permutex2var_epi16(_mm512_loadu_si512(sx + 128), ix, _mm512_loadu_si512(sx + 160));
        const __m512i x3 = _mm512_permutex2var_epi16(_mm512_loadu_si512(sx + 192), ix, _mm512_loadu_si512(sx + 224));
        const __m512i xx = _mm512_mask_mov_epi16(_mm512_mask_mov_epi16(x0, k6, x1), k7,
                                                 _mm512_mask_mov_epi16(x2, k6, x3));
        a[b] = _mm512_dpbf16_ps(a[b], w, (__m512bh)xx);
    }
}
/* two accumulators a token, chunks taken in pairs (constant indices: the accumulators stay in registers) */
AI void span_row_dp(const uint16_t* hdr, const uint8_t* off, const uint16_t* v, int64_t q0, int64_t q1, int64_t* pp,
                    const uint16_t* x, int64_t xs, int B, float* out) {
    int64_t p = *pp;
    __m512 a0[MAXB], a1[MAXB];
    for (int b = 0; b < B; b++) a0[b] = a1[b] = _mm512_setzero_ps();
    int64_t q = q0;
    for (; q + 1 < q1; q += 2) {
        span_chunk(hdr, off, v, q, &p, x, xs, B, a0);
        span_chunk(hdr, off, v, q + 1, &p, x, xs, B, a1);
    }
    if (q < q1) span_chunk(hdr, off, v, q, &p, x, xs, B, a0);
    *pp = p;
    for (int b = 0; b < B; b++) out[b] = _mm512_reduce_add_ps(_mm512_add_ps(a0[b], a1[b]));
}
#endif

/* 2:4: per 32 columns, 16 values and 16 two-bit positions; value k sits at column 4 * (k / 2) + position */
AI void nm24_row(const uint8_t* idx, const void* v, int64_t p, int64_t cols, const float* x, int B, int vbf,
                 float* out, int64_t* done) {
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    const __m512i three = _mm512_set1_epi32(3);
    const int NA = B <= 2 ? 4 : (B <= 4 ? 2 : 1);
    __m512 a[4][MAXB];
    for (int q = 0; q < 4; q++)
        for (int b = 0; b < B; b++) a[q][b] = _mm512_setzero_ps();
    int64_t c = 0;
    for (int it = 0; c + 32 <= cols; c += 32, p += 16, it++) {
        uint32_t bits;
        memcpy(&bits, idx + c / 8, 4);
        PREF(idx + c / 8 + PFB / 8);
        PREF(vbf ? (const char*)((const uint16_t*)v + p) + PFB : (const char*)((const float*)v + p) + PFB);
        __m512i pos = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)bits), shifts),
                                                        three), base);
        __m512 w = vbf ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                             _mm256_loadu_si256((const __m256i*)((const uint16_t*)v + p))), 16))
                       : _mm512_loadu_ps((const float*)v + p);
        for (int b = 0; b < B; b++) {
            const float* xb = x + b * cols + c;
            __m512 xs = _mm512_permutex2var_ps(_mm512_loadu_ps(xb), pos, _mm512_loadu_ps(xb + 16));
            a[it % NA][b] = _mm512_fmadd_ps(w, xs, a[it % NA][b]);
        }
    }
    for (int b = 0; b < B; b++) {
        __m512 s = a[0][b];
        for (int q = 1; q < NA; q++) s = _mm512_add_ps(s, a[q][b]);
        out[b] = _mm512_reduce_add_ps(s);
    }
    *done = c;
}
#endif

/* the scalar forms: any CPU, and the columns the vector loops leave */
static void bm_row_scalar(const uint8_t* m, const void* v, int64_t p, int64_t cols, const float* x, int B,
                          int vbf, float* out) {
    for (int b = 0; b < B; b++) out[b] = 0.f;
    for (int64_t c = 0; c < cols; c += 8) {
        unsigned byte = m[c / 8];
        for (int j = 0; j < 8 && byte; j++) {
            if (!(byte & (0x80u >> j))) continue;
            float w = vbf ? bf2f(((const uint16_t*)v)[p]) : ((const float*)v)[p];
            p++;
            for (int b = 0; b < B; b++) out[b] += w * x[b * cols + c + j];
        }
    }
}

static void nm_row_scalar(const uint8_t* idx, const void* v, int64_t k0, int64_t c0, int64_t cols, int n, int m,
                          int bits, const float* x, int B, int vbf, float* out) {
    /* values k0.. of this row from column c0 on; value k's position: bits [k * bits, (k + 1) * bits) */
    int64_t k = k0;
    for (int64_t g = c0 / m; g < cols / m; g++) {
        for (int j = 0; j < n; j++, k++) {
            int64_t bp = k * bits;
            unsigned pos = (unsigned)((ld_n(idx + bp / 8, 2) >> (bp % 8)) & ((1u << bits) - 1));
            float w = vbf ? bf2f(((const uint16_t*)v)[k]) : ((const float*)v)[k];
            for (int b = 0; b < B; b++) out[b] += w * x[b * cols + g * m + pos];
        }
    }
}

/* chunked CSR ("csr"): each row's non-zeros in chunks of 16 slots, a chunk holding a uint16 base column and 16
   uint8 offsets from it (a chunk closes at 16 values or at a column >= base + 256; its free slots: value 0,
   offset 0), so 4 + 1 (fp32) or 2 + 1 (bf16) bytes and 1/8 of a base per non-zero. Per chunk: 16 offsets
   widened, x gathered at base + offset with one AVX-512 gather, one FMA; the offset and value streams are
   prefetched PF non-zeros ahead (decode is memory bound: the hardware prefetcher alone left it ~25% slower). */
#define PF 2048        /* non-zeros: 2048 offset bytes and 4096 (bf16) or 8192 (fp32) value bytes ahead */
#ifdef ELSA512
AI __m512 c8_vals(const void* v, int64_t k, int vbf) {
    return vbf ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                     _mm256_loadu_si256((const __m256i*)((const uint16_t*)v + k))), 16))
               : _mm512_loadu_ps((const float*)v + k);
}
/* far: the activations take most of L1 (over 8192 columns: 32 KB of fp32 of its 48 KB here), so the streams are
   prefetched into L2 only (a scratch benchmark, 4096x11008 at 90%, one thread, caches flushed: 5.8 -> 5.35 ns a
   chunk; no change at 4096 columns) */
AI void c8_prefetch(const uint8_t* off, const void* v, int64_t k, int vbf, int far) {
    const char* pv = vbf ? (const char*)((const uint16_t*)v + k + PF) : (const char*)((const float*)v + k + PF);
    if (far) {
        _mm_prefetch((const char*)(off + k + PF), _MM_HINT_T1);
        _mm_prefetch(pv, _MM_HINT_T1);
    } else {
        _mm_prefetch((const char*)(off + k + PF), _MM_HINT_T0);
        _mm_prefetch(pv, _MM_HINT_T0);
    }
}
/* chunks q0..q1 of one row: out[b] = its values times x[b] at their columns; B and vbf constants per call site.
   One loop, one accumulator per token: a row's chunk count is data, and the unrolled loop with its tail
   mispredicted about twice a row where rows are short (the default model's 576 columns: ~4 chunks a row); one
   accumulator is enough, the FMA's latency being under a gather's throughput */
AI void c8_row(const uint16_t* base, const uint8_t* off, const void* v, int64_t q0, int64_t q1, const float* x,
               int64_t cols, int B, int vbf, int far, float* out) {
    __m512 a[MAXB];
    for (int b = 0; b < B; b++) a[b] = _mm512_setzero_ps();
    for (int64_t q = q0; q < q1; q++) {
        const int64_t k = q * 16;
        c8_prefetch(off, v, k, vbf, far);
        __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(off + k)));
        __m512 w = c8_vals(v, k, vbf);
        const float* xb = x + base[q];
        for (int b = 0; b < B; b++)
            a[b] = _mm512_fmadd_ps(w, _mm512_i32gather_ps(i, xb + b * cols, 4), a[b]);
    }
    for (int b = 0; b < B; b++) out[b] = _mm512_reduce_add_ps(a[b]);
}
#endif

static void c8_row_scalar(const uint16_t* base, const uint8_t* off, const void* v, int64_t q0, int64_t q1,
                          const float* x, int64_t cols, int B, int vbf, float* out) {
    for (int b = 0; b < B; b++) out[b] = 0.f;
    for (int64_t k = q0 * 16; k < q1 * 16; k++) {
        float w = vbf ? bf2f(((const uint16_t*)v)[k]) : ((const float*)v)[k];
        for (int b = 0; b < B; b++) out[b] += w * x[b * cols + base[k / 16] + off[k]];
    }
}

int elsa_span_simd(void) {
#ifdef ELSADP
    return 1;
#else
    return 0;
#endif
}

static void span_row_scalar(const uint16_t* hdr, const uint8_t* off, const uint16_t* v, int64_t q0, int64_t q1,
                            int64_t* pp, const float* x, int64_t cols, int B, float* out) {
    int64_t p = *pp;
    for (int b = 0; b < B; b++) out[b] = 0.f;
    for (int64_t q = q0; q < q1; q++) {
        const int64_t base = (int64_t)(hdr[q] >> 5) * SPAN;
        for (int n = (int)(hdr[q] & 31u) + 1; n > 0; n--, p++) {
            const float w = bf2f(v[p]);
            for (int b = 0; b < B; b++) out[b] += w * x[b * cols + base + off[p]];
        }
    }
    *pp = p;
}

/* the span layout from CSR (crow [rows + 1], col): pass 1 (hdr == NULL) writes each row's first chunk into
   rowchunk [rows + 1]; pass 2 the chunk headers and each non-zero's offset in its span (the values stay CSR's) */
void span_build(int64_t rows, const int64_t* crow, const int64_t* col, int64_t* rowchunk, uint16_t* hdr,
                uint8_t* off) {
    int64_t q = 0;
    rowchunk[0] = 0;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = crow[r]; j < crow[r + 1]; q++) {
            const int64_t sp = col[j] / SPAN;
            int n = 0;
            for (; n < 32 && j < crow[r + 1] && col[j] / SPAN == sp; n++, j++)
                if (hdr) off[j] = (uint8_t)(col[j] - sp * SPAN);
            if (hdr) hdr[q] = (uint16_t)((sp << 5) | (n - 1));
        }
        rowchunk[r + 1] = q;
    }
}

/* the chunked layout from CSR (crow [rows + 1], col, values of vsize bytes): pass 1 (out == NULL) writes each
   row's first chunk into rowchunk [rows + 1]; pass 2 fills base, off and out (zeroed by the caller) */
void c8_build(int64_t rows, const int64_t* crow, const int64_t* col, const void* val, int vsize,
              int64_t* rowchunk, uint16_t* base, uint8_t* off, void* out) {
    int64_t q = 0;
    rowchunk[0] = 0;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = crow[r]; j < crow[r + 1]; q++) {
            const int64_t b = col[j];
            for (int i = 0; i < 16 && j < crow[r + 1] && col[j] - b < 256; i++, j++) {
                if (!out) continue;
                off[q * 16 + i] = (uint8_t)(col[j] - b);
                memcpy((char*)out + (q * 16 + i) * vsize, (const char*)val + j * vsize, vsize);
            }
            if (out) base[q] = (uint16_t)b;
        }
        rowchunk[r + 1] = q;
    }
}

/* x [batch, cols] fp32 or bf16 -> fp32 (a copy only for bf16) */
static const float* widen(const void* x, int xbf, int64_t count, float** tmp) {
    if (!xbf) return (const float*)x;
    *tmp = (float*)malloc(count * sizeof(float));
    for (int64_t i = 0; i < count; i++) (*tmp)[i] = bf2f(((const uint16_t*)x)[i]);
    return *tmp;
}

AI void store(void* y, int ybf, int64_t rows, int64_t r, int B, const float* acc) {
    for (int b = 0; b < B; b++) {
        if (ybf) ((uint16_t*)y)[b * rows + r] = f2bf(acc[b]);
        else ((float*)y)[b * rows + r] = acc[b];
    }
}

#ifdef ELSA512
#define BM_CASE(BB, VB) case BB * 2 + VB: bm_row(mr, val, rowoff[r], cols, xf, xd, BB, VB, acc); break;
#define DP_CASE(BB) case BB: bm_row_dp(mr, (const uint16_t*)val, rowoff[r], cols, (const uint16_t*)x, BB, acc); break;
#define DP_CASES DP_CASE(1) DP_CASE(2) DP_CASE(3) DP_CASE(4) DP_CASE(5) DP_CASE(6) DP_CASE(7) DP_CASE(8)
#define C8_CASE(BB, VB) case BB * 2 + VB: \
    if (far) c8_row(base, off, val, rowchunk[r], rowchunk[r + 1], xf, cols, BB, VB, 1, acc); \
    else c8_row(base, off, val, rowchunk[r], rowchunk[r + 1], xf, cols, BB, VB, 0, acc); break;
#define NM_CASE(BB, VB) case BB * 2 + VB: nm24_row(ir, val, r * (cols / 2), cols, xf, BB, VB, acc, &done); break;
#define CASES(M) M(1, 0) M(1, 1) M(2, 0) M(2, 1) M(3, 0) M(3, 1) M(4, 0) M(4, 1) \
                 M(5, 0) M(5, 1) M(6, 0) M(6, 1) M(7, 0) M(7, 1) M(8, 0) M(8, 1)
#endif

/* where thread t of nt starts when rows are shared by cost(r) = r * per_row + prefix[r] * per_item (the bytes
   before row r): magnitude pruning leaves rows unequal (the default model at 90%: a thread's half of a k or q
   projection's non-zeros up to 1.44x the other's), so equal numbers of rows left one thread waiting */
static int64_t split_at(const int64_t* prefix, int64_t rows, int64_t per_row, int64_t per_item, int t, int nt) {
    if (t <= 0) return 0;
    if (t >= nt) return rows;
    const int64_t want = (rows * per_row + prefix[rows] * per_item) / nt * t;
    int64_t lo = 0, hi = rows;                        /* the first row whose cost reaches want */
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (mid * per_row + prefix[mid] * per_item < want) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* y [batch, rows] = x [batch, cols] times the bitmask matrix (rowoff[r]: where row r's values start) */
int bm_mv(int64_t rows, int64_t cols, int64_t batch, const uint8_t* mask, const int64_t* rowoff, const void* val,
          int vbf, const void* x, int xbf, void* y, int ybf, int nthreads) {
    if (batch < 1 || batch > MAXB || cols % 8) return -1;
#ifdef ELSADP
    const int dp = vbf && xbf;          /* a bf16 model: the activations stay bf16 (bm_row_dp) */
#else
    const int dp = 0;
#endif
    float* tmp = NULL;
    const float* xf = dp ? NULL : widen(x, xbf, batch * cols, &tmp);
    const int B = (int)batch;
    float* xd = vbf && !dp ? (float*)malloc(batch * cols * sizeof(float)) : NULL;
    for (int64_t b = 0; xd && b < batch; b++)     /* each 32 columns: the even ones, then the odd ones */
        for (int64_t i = b * cols; i + 32 <= (b + 1) * cols; i += 32)
            for (int j = 0; j < 16; j++) { xd[i + j] = xf[i + 2 * j]; xd[i + 16 + j] = xf[i + 2 * j + 1]; }
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t r1 = split_at(rowoff, rows, cols / 8, vbf ? 2 : 4, t + 1, nt);
    for (int64_t r = split_at(rowoff, rows, cols / 8, vbf ? 2 : 4, t, nt); r < r1; r++) {
        float acc[MAXB];
        const uint8_t* mr = mask + r * (cols / 8);
#ifdef ELSADP
        if (dp) { switch (B) { DP_CASES } } else
#endif
#ifdef ELSA512
        switch (B * 2 + vbf) { CASES(BM_CASE) }
#else
        bm_row_scalar(mr, val, rowoff[r], cols, xf, B, vbf, acc);
#endif
        store(y, ybf, rows, r, B, acc);
    }
    }
    free(tmp);
    free(xd);
    return 0;
}

/* y [batch, rows] = x [batch, cols] times the chunked CSR matrix: stored row j holds chunks rowchunk[j] ..
   rowchunk[j + 1] and is output row perm[j] (the rows are stored by chunk count, so that the row loop's count
   repeats from one row to the next and the branch predictor follows it) */
int csr_mv(int64_t rows, int64_t cols, int64_t batch, const int64_t* rowchunk, const uint16_t* base,
           const uint8_t* off, const void* val, const int32_t* perm, int vbf, const void* x, int xbf, void* y,
           int ybf, int nthreads) {
    if (batch < 1 || batch > MAXB || cols > 65536) return -1;
    float* tmp = NULL;
    const float* xf = widen(x, xbf, batch * cols, &tmp);
    const int B = (int)batch, far = cols > 8192;
    (void)far;
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t r1 = split_at(rowchunk, rows, 0, 1, t + 1, nt);
    for (int64_t r = split_at(rowchunk, rows, 0, 1, t, nt); r < r1; r++) {
        float acc[MAXB];
#ifdef ELSA512
        switch (B * 2 + vbf) { CASES(C8_CASE) }
#else
        c8_row_scalar(base, off, val, rowchunk[r], rowchunk[r + 1], xf, cols, B, vbf, acc);
#endif
        store(y, ybf, rows, perm[r], B, acc);
    }
    }
    free(tmp);
    return 0;
}

#ifdef ELSADP
#define SP_CASE(BB) case BB: span_row_dp(hdr, off, val, rowchunk[r], rowchunk[r + 1], &p, xp, xs, BB, acc); break;
#define SP_CASES SP_CASE(1) SP_CASE(2) SP_CASE(3) SP_CASE(4) SP_CASE(5) SP_CASE(6) SP_CASE(7) SP_CASE(8)
#endif

/* y [batch, rows] = x [batch, cols] times the span matrix: row r's chunks rowchunk[r] .. rowchunk[r + 1], its
   values and offsets after the row before's (crow, where each row starts, is read once a thread); bf16
   activations go to span_row_dp as a copy padded to whole spans, fp32 ones (and a CPU without AVX-512 BF16) to
   the scalar loop */
int span_mv(int64_t rows, int64_t cols, int64_t batch, const int64_t* rowchunk, const uint16_t* hdr,
            const int64_t* crow, const uint8_t* off, const uint16_t* val, const void* x, int xbf, void* y, int ybf,
            int nthreads) {
    if (batch < 1 || batch > MAXB || cols > 2048 * SPAN) return -1;
#ifdef ELSADP
    const int dp = xbf;
#else
    const int dp = 0;
#endif
    const int B = (int)batch;
    const int64_t xs = (cols + SPAN - 1) / SPAN * SPAN;
    float* tmp = NULL;
    uint16_t* xp = NULL;
    const float* xf = NULL;
    if (dp) {
        xp = (uint16_t*)calloc(batch * xs + 32, sizeof(uint16_t));
        for (int64_t b = 0; b < batch; b++) memcpy(xp + b * xs, (const uint16_t*)x + b * cols, cols * sizeof(uint16_t));
    } else {
        xf = widen(x, xbf, batch * cols, &tmp);
    }
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t r1 = split_at(rowchunk, rows, 0, 1, t + 1, nt);
    const int64_t r0 = split_at(rowchunk, rows, 0, 1, t, nt);
    int64_t p = crow[r0];
    for (int64_t r = r0; r < r1; r++) {
        float acc[MAXB];
#ifdef ELSADP
        if (dp) { switch (B) { SP_CASES } } else
#endif
        span_row_scalar(hdr, off, val, rowchunk[r], rowchunk[r + 1], &p, xf, cols, B, acc);
        store(y, ybf, rows, r, B, acc);
    }
    }
    free(tmp);
    free(xp);
    return 0;
}

/* y [batch, rows] = x [batch, cols] times the N:M matrix (n values + their positions per m columns) */
int nm_mv(int64_t rows, int64_t cols, int64_t batch, int n, int m, int bits, const uint8_t* idx, const void* val,
          int vbf, const void* x, int xbf, void* y, int ybf, int nthreads) {
    if (batch < 1 || batch > MAXB || cols % m) return -1;
    float* tmp = NULL;
    const float* xf = widen(x, xbf, batch * cols, &tmp);
    const int B = (int)batch;
    const int vec = n == 2 && m == 4 && bits == 2 && cols % 8 == 0;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
        float acc[MAXB];
        int64_t done = 0, k0 = r * (cols / m) * n;
        for (int b = 0; b < B; b++) acc[b] = 0.f;
#ifdef ELSA512
        if (vec) {
            const uint8_t* ir = idx + r * (cols / 8);
            switch (B * 2 + vbf) { CASES(NM_CASE) }
        }
#else
        (void)vec;
#endif
        if (done < cols)
            nm_row_scalar(idx, val, k0 + done / m * n, done, cols, n, m, bits, xf, B, vbf, acc);
        store(y, ybf, rows, r, B, acc);
    }
    free(tmp);
    return 0;
}

/* one entry for the three layouts, its fixed arguments in d (built once per matrix, so that a call converts five
   arguments, not thirteen): d = {layout (0 bitmask, 1 csr, 2 nm, 3 span), rows, cols, threads, vbf, pointers p0.. p4,
   n, m, bits}; nthreads > 0 replaces d's thread count; y has x's dtype */
int elsa_mv(const int64_t* d, int64_t batch, const void* x, int xbf, void* y, int nthreads) {
    const int nt = nthreads > 0 ? nthreads : (int)d[3], vbf = (int)d[4];
    switch (d[0]) {
    case 0: return bm_mv(d[1], d[2], batch, (const uint8_t*)d[5], (const int64_t*)d[6], (const void*)d[7], vbf,
                         x, xbf, y, xbf, nt);
    case 1: return csr_mv(d[1], d[2], batch, (const int64_t*)d[5], (const uint16_t*)d[6], (const uint8_t*)d[7],
                          (const void*)d[8], (const int32_t*)d[9], vbf, x, xbf, y, xbf, nt);
    case 2: return nm_mv(d[1], d[2], batch, (int)d[10], (int)d[11], (int)d[12], (const uint8_t*)d[5],
                         (const void*)d[6], vbf, x, xbf, y, xbf, nt);
    case 3: return span_mv(d[1], d[2], batch, (const int64_t*)d[5], (const uint16_t*)d[6], (const int64_t*)d[7],
                           (const uint8_t*)d[8], (const uint16_t*)d[9], x, xbf, y, xbf, nt);
    }
    return -1;
}
""".replace("MAXB", str(MAX_BATCH)).replace("ELSA_SPAN_COLS", str(SPAN))

_LIB: dict = {}


def cpu_key(source: str = C_SOURCE) -> str:
    """A key for one kernel source on one kind of CPU: a library, or a plan measured with it, is valid for it."""
    return ckernels.key(source)


def compile_library(source: str, stem: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """``source`` compiled once per source and CPU into ``$ELSA_CACHE/kernels/<stem>-<key>.so`` and loaded
    (elsa.ckernels.compile_library); OSError (with the compiler's message) when there is no compiler or it
    fails. ``flags``: added to the compiler's (tests: ``-mno-avx512f`` builds the scalar loops)."""
    return ctypes.CDLL(str(ckernels.compile_library(stem, source, flags)))


def typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The library's functions with their C argument types."""
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bm_mv.argtypes = [I, I, I, P, P, P, C, P, C, P, C, C]
    lib.nm_mv.argtypes = [I, I, I, C, C, C, P, P, C, P, C, P, C, C]
    lib.csr_mv.argtypes = [I, I, I, P, P, P, P, P, C, P, C, P, C, C]
    lib.elsa_mv.argtypes = [P, I, P, C, P, C]
    lib.c8_build.argtypes = [I, P, P, P, C, P, P, P, P]
    lib.c8_build.restype = None
    lib.span_mv.argtypes = [I, I, I, P, P, P, P, P, P, C, P, C, C]
    lib.span_build.argtypes = [I, P, P, P, P, P]
    lib.span_build.restype = None
    lib.bm_mv.restype = lib.nm_mv.restype = lib.csr_mv.restype = lib.elsa_mv.restype = lib.elsa_simd.restype = C
    lib.span_mv.restype = lib.elsa_span_simd.restype = C
    return lib


def library():
    """The compressed-layout kernels (ctypes), or None with the reason in ``_LIB['reason']`` (logged once)."""
    if "lib" in _LIB:
        return _LIB["lib"]
    lib, reason = None, None
    try:
        lib = typed(compile_library(C_SOURCE, "compressed"))
    except OSError as exc:
        lib, reason = None, str(exc)
        log.warning("elsa: the compressed-layout kernels are not available (%s); torch's kernels compete alone", exc)
    _LIB["lib"], _LIB["reason"] = lib, reason
    return lib


def unavailable() -> str | None:
    """Why the compressed-layout kernels cannot run here (None when they can)."""
    return None if library() is not None else f"not compiled: {_LIB.get('reason')}"


def simd() -> str:
    """Which path the library runs: ``avx512`` or ``scalar`` (no AVX-512 VBMI2/VL/BW on this CPU)."""
    lib = library()
    return "none" if lib is None else ("avx512" if lib.elsa_simd() == 512 else "scalar")


_DTYPES = (torch.float32, torch.bfloat16)


def layout_support(weight: torch.Tensor, layout: str, nm: tuple[int, int] = (2, 4)) -> str | None:
    """Why ``layout`` cannot hold this weight for these kernels (None when it can)."""
    from elsa.artifacts.compressed import nm_holds

    if weight.dim() != 2 or weight.device.type != "cpu":
        return "a 2-D CPU matrix is needed"
    if weight.dtype not in _DTYPES:
        return f"the kernels take fp32 or bf16 values, not {str(weight.dtype).removeprefix('torch.')}"
    if layout == "bitmask" and weight.shape[1] % 8:
        return f"{weight.shape[1]} columns: a row's bits must start on a byte (a multiple of 8)"
    if layout == "csr" and weight.shape[1] > 65536:
        return f"{weight.shape[1]} columns: uint16 positions take at most 65536"
    if layout == "span":
        if weight.dtype != torch.bfloat16:
            return "span takes bf16 values (a bf16 model's decode: its activations are picked as 16-bit words)"
        if weight.shape[1] > SPAN_MAX_COLS:
            return f"{weight.shape[1]} columns: span headers take at most {SPAN_MAX_COLS}"
        lib = library()
        if lib is not None and not lib.elsa_span_simd():
            return "no AVX-512 BF16 on this CPU (the span layout's scalar loop is not a candidate)"
    if layout == "nm" and not nm_holds(weight, *nm):
        return f"the weight is not {nm[0]}:{nm[1]} along its input dim"
    return None


class CompressedKernel:
    """One matrix in a compressed layout (``bitmask`` or ``nm``) as :func:`elsa.artifacts.compressed.encode` stores it, run by
    the C kernels at batch <= MAX_BATCH. ``value_dtype``: the values' dtype (default: the weight's); ``bias``:
    added by :meth:`forward_nd` (the decode path of elsa.artifacts.linear.SparseLinear)."""

    def __init__(self, weight: torch.Tensor, layout: str, threads: int = 1, nm: tuple[int, int] = (2, 4),
                 value_dtype: torch.dtype | None = None, bias: torch.Tensor | None = None):
        from elsa.artifacts.compressed import encode

        w = weight.detach().to(value_dtype or weight.dtype).contiguous()
        w = w.masked_fill(w == 0, 0.0)           # -0.0 is a zero here (encode would record its sign aside)
        self.rows, self.cols = w.shape
        self.layout, self.threads, self.value_dtype = layout, threads, w.dtype
        self.bias = None if bias is None else bias.detach()
        self.nnz = int((w != 0).sum())
        if layout == "csr":                          # not the checkpoint's layout: chunked CSR, see the C source
            self._build_chunked(w)
        elif layout == "span":                       # nor this one: chunks within 256-column spans, see the C source
            self._build_span(w)
        else:
            stored, meta = encode("w", w, nm if layout == "nm" else None, encoding=layout)
            self.values = stored["w::values"].contiguous()
            pad = torch.zeros(8, dtype=torch.uint8)       # the scalar loops may read a few bytes past a row
            if layout == "bitmask":                       # bm_row_dp loads 64 bytes at a row's last value
                self.values = torch.cat([self.values, self.values.new_zeros(BITMASK_VALUE_PAD)])
                self.mask = torch.cat([stored["w::bitmask"], pad])
                counts = (w != 0).sum(1)
                self.rowoff = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).contiguous()
            else:
                self.n, self.m, self.bits = meta["n"], meta["m"], meta["index_bits"]
                self.indices = torch.cat([stored["w::indices"], pad])
        self._desc = self._describe()
        self._run, self._dptr = library().elsa_mv, self._desc.data_ptr()

    @staticmethod
    def _csr(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``w``'s CSR as (row starts, columns) in int64 and its values, what c8_build and span_build read."""
        with warnings.catch_warnings():              # "sparse CSR support is in beta": only its indices are used
            warnings.simplefilter("ignore", UserWarning)
            csr = w.to_sparse_csr()
        return (csr.crow_indices().to(torch.int64).contiguous(), csr.col_indices().to(torch.int64).contiguous(),
                csr.values().contiguous())

    def _chunks(self, w: torch.Tensor, rowptr: torch.Tensor, out: bool) -> None:
        """c8_build's pass 1 (``out`` False: each row's first chunk into ``rowptr``) or pass 2 (the arrays)."""
        crow, col, vals = self._csr(w)
        ptrs = (self.base.data_ptr(), self.offsets.data_ptr(), self.values.data_ptr()) if out else (None,) * 3
        library().c8_build(self.rows, crow.data_ptr(), col.data_ptr(), vals.data_ptr(), vals.element_size(),
                           rowptr.data_ptr(), *ptrs)

    def _build_chunked(self, w: torch.Tensor) -> None:
        """The chunked CSR of ``w`` (16 values per chunk, a uint16 base column, uint8 offsets), built in C, its
        rows stored by chunk count (``perm[j]``: the output row of stored row ``j``)."""
        self.rowptr = torch.empty(self.rows + 1, dtype=torch.int64)
        self._chunks(w, self.rowptr, False)
        order = torch.argsort(self.rowptr.diff(), stable=True)
        self.perm = order.to(torch.int32).contiguous()
        w = w[order].contiguous()
        self._chunks(w, self.rowptr, False)
        chunks = int(self.rowptr[-1])
        self.base = torch.zeros(chunks + 1, dtype=torch.int16)          # uint16 columns, read as such in C
        self.offsets = torch.zeros(chunks * 16 + 64, dtype=torch.uint8)
        self.values = torch.zeros(chunks * 16 + 32, dtype=w.dtype)
        self._chunks(w, self.rowptr, True)

    def _build_span(self, w: torch.Tensor) -> None:
        """The span layout of ``w`` (bf16): CSR's values and row starts, each non-zero's uint8 offset in its
        256-column span, a uint16 header per chunk (span << 5 | count - 1), built in C (span_build)."""
        if w.dtype != torch.bfloat16:
            raise ValueError(f"the span layout takes bf16 values, not {str(w.dtype).removeprefix('torch.')}")
        self.crow, col, values = self._csr(w)
        self.values = torch.cat([values, w.new_zeros(64)])
        self.rowptr = torch.empty(self.rows + 1, dtype=torch.int64)
        lib = library()
        lib.span_build(self.rows, self.crow.data_ptr(), col.data_ptr(), self.rowptr.data_ptr(), None, None)
        self.headers = torch.zeros(int(self.rowptr[-1]) + 1, dtype=torch.int16)   # uint16, read as such in C
        self.offsets = torch.zeros(self.nnz + 64, dtype=torch.uint8)
        lib.span_build(self.rows, self.crow.data_ptr(), col.data_ptr(), self.rowptr.data_ptr(),
                       self.headers.data_ptr(), self.offsets.data_ptr())

    def row_chunks(self) -> torch.Tensor:
        """csr: each row's number of chunks, in the matrix's row order."""
        counts = torch.empty(self.rows, dtype=torch.int64)
        counts[self.perm.long()] = self.rowptr.diff()
        return counts

    def nbytes(self) -> int:
        """What one product reads of the matrix (the bytes of its layout, the padding aside)."""
        if self.layout == "bitmask":
            return math.ceil(self.rows * self.cols / 8) + self.nnz * self.values.element_size() + \
                self.rowoff.numel() * 8
        if self.layout == "csr":
            chunks = int(self.rowptr[-1])
            return chunks * (16 * (self.values.element_size() + 1) + 2) + self.rowptr.numel() * 8 + self.rows * 4
        if self.layout == "span":
            return self.nnz * 3 + int(self.rowptr[-1]) * 2 + (self.rows + 1) * 8
        return self.values.numel() * self.values.element_size() + math.ceil(self.values.numel() * self.bits / 8)

    def _describe(self) -> torch.Tensor:
        """elsa_mv's fixed arguments (layout, shape, threads, value dtype, the arrays' addresses, n, m, bits)."""
        vbf = int(self.value_dtype == torch.bfloat16)
        if self.layout == "bitmask":
            code, ptrs, nm = 0, (self.mask, self.rowoff, self.values), (0, 0, 0)
        elif self.layout == "csr":
            code, ptrs, nm = 1, (self.rowptr, self.base, self.offsets, self.values, self.perm), (0, 0, 0)
        elif self.layout == "span":
            code, ptrs, nm = 3, (self.rowptr, self.headers, self.crow, self.offsets, self.values), (0, 0, 0)
        else:
            code, ptrs, nm = 2, (self.indices, self.values), (self.n, self.m, self.bits)
        addr = [t.data_ptr() for t in ptrs] + [0] * (5 - len(ptrs))
        return torch.tensor([code, self.rows, self.cols, self.threads, vbf, *addr, *nm], dtype=torch.int64)

    def __call__(self, x2d: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        if x2d.dtype not in _DTYPES:
            raise TypeError(f"the compressed kernels take fp32 or bf16 activations, not {x2d.dtype}")
        b = x2d.shape[0]
        if not 1 <= b <= MAX_BATCH:
            raise ValueError(f"the compressed kernels take 1 to {MAX_BATCH} tokens, not {b}")
        x2d = x2d.contiguous()
        y = torch.empty(b, self.rows, dtype=x2d.dtype)
        if self._run(self._dptr, b, x2d.data_ptr(), x2d.dtype == torch.bfloat16, y.data_ptr(), threads or 0):
            raise ValueError(f"the {self.layout} kernel refused a {self.rows}x{self.cols} matrix at batch {b}")
        return y

    def __deepcopy__(self, memo: dict) -> "CompressedKernel":
        """A built kernel is never changed, and its ``_desc`` holds the addresses of its own arrays: a copied
        model shares it (as it shares the functions that call it), a copy with stale addresses would not be."""
        return self

    def forward_op(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_nd` as one torch op (``torch.ops.elsa.compressed_mv``): what a ``torch.compile``d model
        calls, so its graph holds the kernel instead of breaking at it (elsa.artifacts.generate's ``compile``)."""
        y = torch.ops.elsa.compressed_mv(x, self._desc, self.rows)
        return y if self.bias is None else y + self.bias

    def forward_nd(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., cols]`` (1..MAX_BATCH tokens) -> ``[..., rows]`` plus the bias: the decode path of a sparse
        Linear, the shape kept and nothing built but the output (each Python step costs ~0.1-1 us a call, 210
        calls a token on the default model)."""
        y = _nd(self._run, self._dptr, self.rows, self.cols, x, self.layout)
        return y if self.bias is None else y.add_(self.bias)


def _nd(run, desc_ptr: int, rows: int, cols: int, x: torch.Tensor, what: str) -> torch.Tensor:
    """``x [..., cols]`` times the matrix described at ``desc_ptr`` (``run``: elsa_mv) -> ``[..., rows]``, no
    bias, the shape kept: the checks and the call that the eager decode path (:meth:`CompressedKernel.forward_nd`)
    and the torch op's Python implementation (:func:`_compressed_mv_python`) share. Activations of another dtype
    or width are refused before they are read."""
    shape, dtype = x.shape, x.dtype
    if dtype not in _DTYPES:
        raise TypeError(f"the compressed kernels take fp32 or bf16 activations, not {dtype}")
    if shape[-1] != cols:
        raise ValueError(f"activations of {shape[-1]} features for a {rows}x{cols} matrix")
    x = x.contiguous()
    y = torch.empty(*shape[:-1], rows, dtype=dtype)      # (a torch.Size argument costs 1 us more)
    if run(desc_ptr, x.numel() // cols, x.data_ptr(), dtype is torch.bfloat16, y.data_ptr(), 0):
        raise ValueError(f"the {what} kernel refused a {rows}x{cols} matrix at {x.numel() // cols} tokens")
    return y


# ``torch.ops.elsa.compressed_mv(x, desc, rows)``: the kernels as one torch op, what a torch.compile'd model
# calls (its graph holds the kernel instead of breaking at it). Its CPU implementation is the C++ below, built at
# first use against the installed torch (elsa.ckernels.compile_torch_op) and bound to the C library's elsa_mv: a
# call costs ~6 us where a Python implementation behind the dispatcher costs ~20-30 (210 calls a token on the
# default model; docs/results.md). Without a C++ compiler or torch's headers the same checks and call run in
# Python (:func:`_compressed_mv_python`), and ``op_backend()`` says which.
_OPS = torch.library.Library("elsa", "DEF")
_OPS.define("compressed_mv(Tensor x, Tensor desc, int rows) -> Tensor")

OP_SOURCE = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cstdint>
#include <vector>

/* elsa_mv of the C library (its address is bound once, after both are loaded) */
typedef int (*elsa_mv_fn)(const int64_t*, int64_t, const void*, int, void*, int);
static elsa_mv_fn elsa_mv_ptr = nullptr;
extern "C" void elsa_op_bind(void* fn) { elsa_mv_ptr = (elsa_mv_fn)fn; }

/* x [..., cols] times the matrix desc describes (CompressedKernel._describe) -> [..., rows] in x's dtype */
static at::Tensor compressed_mv(const at::Tensor& x, const at::Tensor& desc, int64_t rows) {
    TORCH_CHECK(elsa_mv_ptr != nullptr, "elsa::compressed_mv: the compressed-layout kernels are not loaded");
    TORCH_CHECK_VALUE(desc.scalar_type() == at::kLong && desc.is_contiguous() && desc.numel() == 13,
                      "elsa::compressed_mv: desc is not a compressed kernel's description");
    TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                     "the compressed kernels take fp32 or bf16 activations, not ", x.scalar_type());
    const int64_t* d = desc.const_data_ptr<int64_t>();
    const int64_t cols = d[2];
    TORCH_CHECK_VALUE(d[1] == rows, "elsa::compressed_mv: rows ", rows, " for a ", d[1], "x", cols, " matrix");
    TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == cols, "activations of ", x.dim() ? x.size(-1) : 0,
                      " features for a ", rows, "x", cols, " matrix");
    const at::Tensor xc = x.contiguous();
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = rows;
    at::Tensor y = at::empty(shape, x.options());
    const int64_t tokens = xc.numel() / cols;
    TORCH_CHECK_VALUE(elsa_mv_ptr(d, tokens, xc.const_data_ptr(), x.scalar_type() == at::kBFloat16, y.data_ptr(), 0) == 0,
                      "the compressed kernel refused a ", rows, "x", cols, " matrix at ", tokens, " tokens");
    return y;
}

TORCH_LIBRARY_IMPL(elsa, CPU, m) { m.impl("compressed_mv", &compressed_mv); }
"""


def _compressed_mv_python(x: torch.Tensor, desc: torch.Tensor, rows: int) -> torch.Tensor:
    """The op's implementation where the C++ one cannot be built: the same checks and call, in Python."""
    if int(desc[1]) != rows:
        raise ValueError(f"elsa::compressed_mv: rows {rows} for a {int(desc[1])}x{int(desc[2])} matrix")
    return _nd(library().elsa_mv, desc.data_ptr(), rows, int(desc[2]), x, "compressed")


@torch.library.register_fake("elsa::compressed_mv")
def _compressed_mv_shape(x: torch.Tensor, desc: torch.Tensor, rows: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], rows)


def op_backend() -> str:
    """Registers ``elsa::compressed_mv``'s CPU implementation once (the C kernels must be available) and says
    which it is: ``c++``, or ``python (<why the C++ one is not>)``."""
    if "op" in _LIB:
        return _LIB["op"]
    lib = library()
    if lib is None:
        raise RuntimeError(f"elsa::compressed_mv needs the compressed-layout kernels: {unavailable()}")
    try:
        path = ckernels.compile_torch_op("compressed_op", OP_SOURCE)
        torch.ops.load_library(str(path))
        ctypes.CDLL(str(path)).elsa_op_bind(ctypes.cast(lib.elsa_mv, ctypes.c_void_p))
        _LIB["op"] = "c++"
    except (OSError, RuntimeError) as exc:
        log.warning("elsa: the C++ op for compiled models is not available (%s); its Python implementation runs", exc)
        _OPS.impl("compressed_mv", _compressed_mv_python, "CPU")
        _LIB["op"] = f"python ({str(exc)[:200]})"
    return _LIB["op"]
