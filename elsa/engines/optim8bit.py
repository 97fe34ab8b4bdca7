"""8-bit AdamW for the CPU: torchao's AdamW8bit state format, stepped with a handful of native tensor ops.

torchao's ``AdamW8bit`` keeps Adam's two moments as uint8 codes into a 256-entry dynamic quantization map
(signed for m, unsigned for v) with one absmax scale per block of 256 values, and steps each parameter through
``torch.compile``; on a CPU its step runs as dozens of eager ops (the map look-up alone is an eight-level binary
search written as tensor ops), 15-50x a fused fp32 AdamW step. This optimizer keeps the same maps, blocks and
arithmetic (fp32 math, moments re-quantised to the nearest code after every step, tensors under 4096 values or
not a multiple of the block in fp32) and finds the nearest code with one ``torch.bucketize`` over the map's
midpoints. elsa uses it for ``method.optimizer=adamw8bit`` on CPU devices; CUDA keeps torchao's.
"""
from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor

from elsa import ckernels
BLOCK = 256
MIN_NUMEL = 4096

# one pass per block of 256: dequantise m and v through their maps, the AdamW update in fp32, re-quantise each
# to the nearest code with the block's new absmax. Both loops are written for the compiler to vectorise (omp simd:
# gathers from the maps, an order-free max): the nearest code is a 65536-entry table on the float's top 16 bits
# (how many midpoints lie below its bucket) plus one compare, as no bucket holds more than one midpoint of either
# map (_bucket_table checks it); the same codes as torch.bucketize, bit for bit
_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
void adamw8(int64_t n, float *w, const float *g, uint8_t *mc, float *ms, uint8_t *vc, float *vs,
            const float *qs, const float *qs_mid, const int32_t *qs_lut, const float *qu, const float *qu_mid,
            const int32_t *qu_lut, float lr, float b1, float b2, float eps, float wd, float bc1, float bc2_sqrt,
            int threads) {
    int64_t blocks = n / 256;
    const float decay = wd != 0.f ? 1.f - lr * wd : 1.f;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        float m[256], v[256], am = 0.f, av = 0.f;
        const float sm = ms[b], sv = vs[b];
        const int64_t o = b * 256;
        #pragma omp simd reduction(max:am,av)
        for (int i = 0; i < 256; i++) {
            float gi = g[o + i];
            float mi = qs[mc[o + i]] * sm, vi = qu[vc[o + i]] * sv;
            mi = mi + (1.f - b1) * (gi - mi);
            vi = vi + (1.f - b2) * (gi * gi - vi);
            float wi = w[o + i] * decay;
            w[o + i] = wi - lr * (mi / bc1) / (sqrtf(vi) / bc2_sqrt + eps);
            m[i] = mi; v[i] = vi;
            float a = fabsf(mi), c = fabsf(vi);
            am = am > a ? am : a; av = av > c ? av : c;
        }
        ms[b] = am; vs[b] = av;
        const float im = 1.f / fmaxf(am, 1e-12f), iv = 1.f / fmaxf(av, 1e-12f);
        #pragma omp simd
        for (int i = 0; i < 256; i++) {
            float x = m[i] * im, y = v[i] * iv;
            uint32_t bx, by;
            memcpy(&bx, &x, 4); memcpy(&by, &y, 4);
            int cx = qs_lut[bx >> 16], cy = qu_lut[by >> 16];
            cx += qs_mid[cx] < x; cy += qu_mid[cy] < y;
            mc[o + i] = (uint8_t)cx; vc[o + i] = (uint8_t)cy;
        }
    }
}
"""


def _kernel():
    P, F = ctypes.c_void_p, ctypes.c_float
    sig = [ctypes.c_int64, P, P, P, P, P, P, P, P, P, P, P, P, F, F, F, F, F, F, F, ctypes.c_int]
    return ckernels.load("adamw8", _C_SOURCE, {"adamw8": sig})


def _maps():
    from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

    out = {}
    for signed, values in ((True, get_qmap_signed()), (False, get_qmap_unsigned())):
        q = torch.tensor(values, dtype=torch.float32)
        mid = torch.cat([(q[1:] + q[:-1]) / 2, torch.tensor([math.inf])])   # 255 midpoints, +inf: 256 for the kernel
        out[signed] = (q, mid, _bucket_table(mid[:-1]))
    return out


def _bucket_table(mid: Tensor) -> Tensor:
    """For each top-16-bit prefix of a float32, how many midpoints lie below every float with that prefix (the
    bucket's lowest value: the prefix with zeros below for a positive float, with ones for a negative one)."""
    prefix = torch.arange(65536, dtype=torch.int64) << 16
    negative = prefix >= 1 << 31
    low = _as_float(torch.where(negative, prefix | 0xFFFF, prefix))
    high = _as_float(torch.where(negative, prefix, prefix | 0xFFFF))
    finite = ~(torch.isnan(low) | torch.isnan(high))
    below = torch.bucketize(torch.nan_to_num(low, nan=math.inf), mid).clamp_max(255)
    if int((torch.bucketize(high[finite], mid) - below[finite]).max()) > 1:   # the kernel's single compare
        raise AssertionError("a quantization map with two midpoints in one top-16-bit bucket")
    return below.to(torch.int32)


def _as_float(bits: Tensor) -> Tensor:
    """float32 values of unsigned 32-bit patterns held in int64."""
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


class Quantized:
    """One moment tensor as uint8 codes and a per-block absmax scale."""

    def __init__(self, like: Tensor, signed: bool, maps):
        self.shape = like.shape
        self.signed, (self.qmap, self.mid, self.lut) = signed, maps[signed]
        self.codes = torch.full((like.numel(),), int(torch.bucketize(torch.tensor(0.0), self.mid[:-1])),
                                dtype=torch.uint8, device=like.device)
        self.scale = torch.zeros(like.numel() // BLOCK, dtype=torch.float32, device=like.device)

    def get(self) -> Tensor:
        return (self.qmap[self.codes.long()].view(-1, BLOCK) * self.scale[:, None]).view(-1)

    def dequantize(self) -> Tensor:
        """The moment in fp32, shaped as its parameter (what torchao's state tensors give)."""
        return self.get().view(self.shape)

    def set(self, value: Tensor) -> None:
        blocks = value.view(-1, BLOCK)
        self.scale = blocks.abs().amax(1)
        normed = blocks / self.scale.clamp_min(1e-12)[:, None]
        self.codes = torch.bucketize(normed.view(-1), self.mid[:-1]).to(torch.uint8)

    def state(self) -> dict:
        return {"codes": self.codes, "scale": self.scale}


class AdamW8bitCPU(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._qmaps = _maps()
        self.lib, self.kernel_missing = _kernel()   # None: the torch path (same arithmetic, several passes)

    def _moment(self, p: Tensor, signed: bool):
        if p.numel() >= MIN_NUMEL and p.numel() % BLOCK == 0:
            return Quantized(p, signed, self._qmaps)
        return torch.zeros_like(p, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"], st["exp_avg_sq"] = self._moment(p, True), self._moment(p, False)
                st["step"] += 1
                step, m = float(st["step"]), st["exp_avg"]
                if self.lib is not None and isinstance(m, Quantized) and p.data.is_contiguous() and \
                        p.dtype == torch.float32 and p.device.type == "cpu":
                    self._kernel_update(p, st, step, float(lr), b1, b2, eps, wd)
                else:
                    self._update(p, st, step, float(lr), b1, b2, eps, wd)
        return loss

    def _kernel_update(self, p, st, step, lr, b1, b2, eps, wd):
        g = p.grad.float().contiguous()
        m, v = st["exp_avg"], st["exp_avg_sq"]
        ptr = lambda t: t.data_ptr()  # noqa: E731
        self.lib.adamw8(p.numel(), ptr(p.data), ptr(g), ptr(m.codes), ptr(m.scale), ptr(v.codes), ptr(v.scale),
                        ptr(m.qmap), ptr(m.mid), ptr(m.lut), ptr(v.qmap), ptr(v.mid), ptr(v.lut), lr, b1, b2, eps, wd, 1 - b1 ** step,
                        math.sqrt(1 - b2 ** step), torch.get_num_threads())

    @staticmethod
    def _update(p, st, step, lr, b1, b2, eps, wd):
        w = p.data.view(-1)
        g = p.grad.reshape(-1).float()
        m_q, v_q = st["exp_avg"], st["exp_avg_sq"]
        if not isinstance(m_q, Quantized):   # a small tensor: fp32 moments, shaped as the parameter
            m_q, v_q = m_q.view(-1), v_q.view(-1)
        m = m_q.get() if isinstance(m_q, Quantized) else m_q
        v = v_q.get() if isinstance(v_q, Quantized) else v_q
        m.lerp_(g, 1 - b1)
        v.lerp_(g.square(), 1 - b2)
        if wd:
            w.mul_(1 - lr * wd)
        denom = v.sqrt().div_(math.sqrt(1 - b2 ** step)).add_(eps)
        w.addcdiv_(m, denom, value=-lr / (1 - b1 ** step))
        for q, value in ((m_q, m), (v_q, v)):
            if isinstance(q, Quantized):
                q.set(value)

    def state_dict(self):
        out = super().state_dict()
        out["state"] = {i: dict(st) for i, st in out["state"].items()}   # the packed entries are the live dicts
        for st in out["state"].values():
            for k in ("exp_avg", "exp_avg_sq"):
                if isinstance(st.get(k), Quantized):
                    st[k] = {"signed": st[k].signed, "shape": list(st[k].shape), **st[k].state()}
        return out

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                saved = st.get(k)
                if isinstance(saved, dict):
                    q = Quantized.__new__(Quantized)
                    q.signed, (q.qmap, q.mid, q.lut) = saved["signed"], self._qmaps[saved["signed"]]
                    # torch's loader casts floating-point-parameter state to the parameter's dtype: codes back
                    q.codes = saved["codes"].to(torch.uint8).contiguous()
                    q.scale = saved["scale"].float().contiguous()
                    q.shape = torch.Size(saved["shape"])
                    st[k] = q
