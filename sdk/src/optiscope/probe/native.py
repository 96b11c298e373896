"""Both walks of a sampled step over every float32 CPU tensor in one call each: a small C kernel
built with the system's C compiler, off the training thread, on first use.

Why not only ``torch.compile`` (``fused``): on CPU the compiled kernels are memory-bound and fast,
but each call goes through Dynamo's guards and wrappers (about 65 µs), and a model has tens to
hundreds of tensors, each with its own call, plus packs of small tensors, per-tensor views and
scatter-adds of partial sums. Here one call per walk takes arrays of pointers, cuts every tensor
into work items of ``ITEM`` coordinates, runs them on torch's own OpenMP pool, and writes one
float64 row of sums per tensor: the Python left per sampled step is building two pointer arrays.

The sums are those of the other paths (see ``stats``): float32 within rows of ``ROW`` coordinates
(within about 1e-7 of exact), float64 across rows, then across items in a fixed order, so the
result does not depend on the number of threads. NaN and Inf propagate as in torch
(``clamp_min`` keeps a NaN; a NaN |u| is not counted as large). The same library reads the
maximum |x| of float32 activations (see ``activations``).

Built with ``-march=native`` for the machine it runs on, in a fresh temporary folder per process
(never a cache shared between machines of different processors). Compiled with ``-fopenmp``, it
binds to the ``libgomp`` that torch has already loaded, so both share one thread pool. Without a
C compiler, or on any failure, ``ready`` stays False and the probe uses the other paths.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import torch

log = logging.getLogger("optiscope")

F32, F64 = torch.float32, torch.float64
#: Coordinates per work item (a few hundred KiB per input: stays in L2 while it is reduced).
ITEM = 1 << 15
#: Terms of the post-step walk, in ``stats._PLAIN + stats._ADAM`` order.
POST_TERMS = 9

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__SSE2__)
#include <immintrin.h>
#endif

#define ROW 1024
#define ITEM @ITEM@

typedef struct { int64_t t, lo, hi; } Item;

/* every tensor cut into items of at most ITEM coordinates, in tensor order */
static Item *items(int64_t nt, const int64_t *n, int64_t *count) {
    int64_t c = 0, k = 0;
    for (int64_t i = 0; i < nt; i++) c += (n[i] + ITEM - 1) / ITEM;
    Item *it = malloc(sizeof(Item) * (size_t)(c ? c : 1));
    if (!it) return NULL;
    for (int64_t i = 0; i < nt; i++)
        for (int64_t lo = 0; lo < n[i]; lo += ITEM) {
            it[k].t = i; it[k].lo = lo; it[k].hi = lo + ITEM < n[i] ? lo + ITEM : n[i]; k++;
        }
    *count = c;
    return it;
}

/* per-tensor totals of per-item partials, added in item order: independent of the thread count */
static void gather(int64_t nt, int terms, const Item *it, int64_t c, const double *part, double *out) {
    memset(out, 0, sizeof(double) * (size_t)(nt * terms));
    for (int64_t k = 0; k < c; k++)
        for (int j = 0; j < terms; j++) out[it[k].t * terms + j] += part[k * terms + j];
}

/* The snapshot is read back only after the optimizer has streamed through all of its state, so
   it bypasses the caches (non-temporal stores): no read for ownership, nothing useful evicted. */
static void copy_stream(float *dst, const float *src, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i < n && ((uintptr_t)(dst + i) & 63); i++) dst[i] = src[i];
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
    _mm_sfence();
#elif defined(__SSE2__)
    for (; i < n && ((uintptr_t)(dst + i) & 15); i++) dst[i] = src[i];
    for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    _mm_sfence();
#endif
    memcpy(dst + i, src + i, sizeof(float) * (size_t)(n - i));
}

/* Before the step: snap = theta, and where v (v_{t-1}) is given, sum g^2 / max(v, floor). */
int optiscope_pre(int64_t nt, const float *const *theta, float *const *snap, const float *const *g,
                  const float *const *v, const float *floor_, const int64_t *n, double *out, int threads) {
    int64_t c;
    Item *it = items(nt, n, &c);
    double *part = malloc(sizeof(double) * (size_t)(c ? c : 1));
    if (!it || !part) { free(it); free(part); return -1; }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t k = 0; k < c; k++) {
        const int64_t t = it[k].t, lo = it[k].lo, hi = it[k].hi;
        copy_stream(snap[t] + lo, theta[t] + lo, hi - lo);
        double acc = 0.0;
        if (v[t]) {
            const float *gp = g[t], *vp = v[t];
            const float f = floor_[t];
            for (int64_t r = lo; r < hi; r += ROW) {
                const int64_t e = r + ROW < hi ? r + ROW : hi;
                float a = 0.0f;
                #pragma omp simd reduction(+:a)
                for (int64_t j = r; j < e; j++) {
                    const float x = gp[j], w = vp[j] < f ? f : vp[j];  /* a NaN v stays NaN */
                    a += x * x / w;
                }
                acc += a;
            }
        }
        part[k] = acc;
    }
    gather(nt, 1, it, c, part, out);
    free(part); free(it);
    return 0;
}

/* den[0::stride][:count] of one item's coordinates, read while they are in cache */
static void sample(const float *den, int64_t lo, int64_t hi, int64_t stride, int64_t count, float *out) {
    for (int64_t k = (lo + stride - 1) / stride; k < count && k * stride < hi; k++) out[k] = den[k * stride];
}

/* After the step, with d = snap - theta: sum d^2, d.g, theta^2, snap^2, g^2; and where m is given
   (Adam), with u' = m / (sqrt(den) + eps_d): sum u'^2, count |u'| > thr, sum m^2, sum v^2, and two
   strided samples of den (the epsilon-headroom medians' inputs): s_count values at s_stride into
   s_out, and every q_stride-th into q_out. */
int optiscope_post(int64_t nt, const float *const *snap, const float *const *theta, const float *const *g,
                   const float *const *m, const float *const *den, const float *const *v,
                   const float *eps_d, const float *thr, const int64_t *n,
                   const int64_t *s_stride, const int64_t *s_count, float *const *s_out, int64_t q_stride,
                   float *const *q_out, double *out, int threads) {
    int64_t c;
    Item *it = items(nt, n, &c);
    double *part = malloc(sizeof(double) * (size_t)(c ? c : 1) * 9);
    if (!it || !part) { free(it); free(part); return -1; }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t k = 0; k < c; k++) {
        const int64_t t = it[k].t, lo = it[k].lo, hi = it[k].hi;
        const float *S = snap[t], *T = theta[t], *G = g[t], *M = m[t], *D = den[t], *V = v[t];
        double acc[9] = {0};
        for (int64_t r = lo; r < hi; r += ROW) {
            const int64_t e = r + ROW < hi ? r + ROW : hi;
            float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0, a8 = 0;
            if (M) {
                const float eps = eps_d[t], cut = thr[t];
                #pragma omp simd reduction(+:a0,a1,a2,a3,a4,a5,a6,a7,a8)
                for (int64_t j = r; j < e; j++) {
                    const float s = S[j], th = T[j], gg = G[j], d = s - th;
                    const float mm = M[j], vv = V[j], u = mm / (sqrtf(D[j]) + eps);
                    a0 += d * d; a1 += d * gg; a2 += th * th; a3 += s * s; a4 += gg * gg;
                    a5 += u * u; a6 += fabsf(u) > cut ? 1.0f : 0.0f; a7 += mm * mm; a8 += vv * vv;
                }
            } else {
                #pragma omp simd reduction(+:a0,a1,a2,a3,a4)
                for (int64_t j = r; j < e; j++) {
                    const float s = S[j], th = T[j], gg = G[j], d = s - th;
                    a0 += d * d; a1 += d * gg; a2 += th * th; a3 += s * s; a4 += gg * gg;
                }
            }
            acc[0] += a0; acc[1] += a1; acc[2] += a2; acc[3] += a3; acc[4] += a4;
            acc[5] += a5; acc[6] += a6; acc[7] += a7; acc[8] += a8;
        }
        if (M && s_out[t]) {
            sample(D, lo, hi, s_stride[t], s_count[t], s_out[t]);
            sample(D, lo, hi, q_stride, (n[t] + q_stride - 1) / q_stride, q_out[t]);
        }
        for (int j = 0; j < 9; j++) part[k * 9 + j] = acc[j];
    }
    gather(nt, 9, it, c, part, out);
    free(part); free(it);
    return 0;
}

/* max |x| of a float32 buffer, NaN if it holds one (an activation's headroom) */
float optiscope_absmax(const float *x, int64_t n, int threads) {
    float mx = 0.0f;
    int nan = 0;
    #pragma omp parallel for simd reduction(max:mx) reduction(|:nan) num_threads(threads) if(n > 16384)
    for (int64_t i = 0; i < n; i++) {
        const float a = fabsf(x[i]);
        mx = a > mx ? a : mx;
        nan |= x[i] != x[i];
    }
    return nan ? NAN : mx;
}
""".replace("@ITEM@", str(ITEM))

# Tried in order: the first set that builds wins. -fno-math-errno lets sqrtf vectorise; no
# -ffast-math, which would break NaN and Inf.
_FLAGS = (["-O3", "-march=native", "-fopenmp", "-fno-math-errno"], ["-O3", "-fopenmp", "-fno-math-errno"])

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_PF = ctypes.POINTER(ctypes.c_float)
_PI = ctypes.POINTER(ctypes.c_int64)


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.lib = None  # the loaded kernel, once built
        self.started = False
        self.failed = False
        self.thread: threading.Thread | None = None


_S = _State()


def _shared_openmp() -> bool:
    """Whether torch runs on GNU OpenMP, already loaded: the kernel then binds to that same runtime
    (one thread pool). Another runtime (Intel's, say) would give the process two pools spinning
    against each other, so the native walks stay out."""
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


def _build() -> None:
    try:
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if not sys.platform.startswith("linux"):
            raise RuntimeError("built on Linux only")
        if not cc:
            raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
        if not _shared_openmp():
            raise RuntimeError("torch does not run on GNU OpenMP here")
        with tempfile.TemporaryDirectory(prefix="optiscope-native-") as d:
            src, lib = os.path.join(d, "walk.c"), os.path.join(d, "walk.so")
            with open(src, "w") as f:
                f.write(_SOURCE)
            for flags in _FLAGS:
                r = subprocess.run(
                    [cc, *flags, "-fPIC", "-shared", src, "-o", lib], capture_output=True, text=True, timeout=300
                )
                if r.returncode == 0:
                    break
            else:
                last = (r.stderr or r.stdout).strip().splitlines()
                raise RuntimeError(f"the compiler failed: {last[-1][:200] if last else r.returncode}")
            handle = ctypes.CDLL(lib)  # mapped: the file can go with its folder
        handle.optiscope_pre.argtypes = [ctypes.c_int64, _PP, _PP, _PP, _PP, _PF, _PI, _P, ctypes.c_int]
        handle.optiscope_post.argtypes = [
            ctypes.c_int64,
            _PP,
            _PP,
            _PP,
            _PP,
            _PP,
            _PP,
            _PF,
            _PF,
            _PI,
            _PI,
            _PI,
            _PP,
            ctypes.c_int64,
            _PP,
            _P,
            ctypes.c_int,
        ]
        handle.optiscope_pre.restype = handle.optiscope_post.restype = ctypes.c_int
        handle.optiscope_absmax.argtypes = [_P, ctypes.c_int64, ctypes.c_int]
        handle.optiscope_absmax.restype = ctypes.c_float
        _S.lib = handle
    except Exception as e:  # no compiler, no OpenMP, a sandbox without subprocesses: other paths serve
        _S.failed = True
        log.info(
            "optiscope: native statistics kernel unavailable (%s: %s); using compiled or eager kernels",
            type(e).__name__,
            str(e)[:200],
        )


class Native:
    """The native walks as one probe uses them. ``enabled=False``: never build (other paths only)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def ready(self) -> bool:
        """True once the kernel is loaded; else start building it (once per process, in the
        background) and answer False."""
        if _S.lib is not None:
            return self.enabled
        if not self.enabled or _S.failed:
            return False
        with _S.lock:
            if not _S.started:
                _S.started = True
                _S.thread = threading.Thread(target=_build, name="optiscope-native-build", daemon=True)
                _S.thread.start()
        return False

    def building(self) -> bool:
        """True while the build runs: the probe then waits for it (eager blocks meanwhile) rather
        than start a second compiler (torch.compile) for the same work."""
        return self.enabled and _S.started and _S.lib is None and not _S.failed

    @staticmethod
    def wait(timeout: float | None = None) -> bool:
        """Wait for the build (benchmarks and tests); True if the kernel is loaded."""
        th = _S.thread
        if th is not None:
            th.join(timeout)
        return _S.lib is not None

    @staticmethod
    def usable(tensors: list[torch.Tensor | None]) -> bool:
        """Whether the native walks can read these tensors (None stands for an absent one):
        contiguous float32 on the CPU, strided."""
        for t in tensors:  # (is_cpu: no device object built per tensor, a third of the time)
            if t is not None and not (t.is_cpu and t.dtype is F32 and t.layout is torch.strided and t.is_contiguous()):
                return False
        return True

    @staticmethod
    def pre(thetas, snaps_ptr: list[int], grads, vs, floors: list[float], lengths: list[int]) -> torch.Tensor:
        """sum g^2 / max(v, floor) per tensor (0 where v is None), float64; copies each theta to
        the float32 storage at ``snaps_ptr``. Runs while the GIL is released."""
        nt = len(thetas)
        out = torch.empty(nt, dtype=F64)
        rc = _S.lib.optiscope_pre(
            nt,
            _ptrs(thetas),
            (_P * nt)(*snaps_ptr),
            _ptrs(grads),
            _ptrs(vs),
            _floats(floors),
            _lengths(lengths),
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if rc:
            raise MemoryError("optiscope: native pre-step walk could not allocate its work list")
        return out

    @staticmethod
    def post(
        snaps_ptr: list[int],
        thetas,
        grads,
        ms,
        dens,
        vs,
        eps_d: list[float],
        thr: list[float],
        lengths: list[int],
        sample_cap: int,
        q_stride: int,
    ):
        """(POST_TERMS, tensors) float64 sums, rows in ``fused.PLAIN + fused.ADAM`` order (the
        Adam rows are 0 where m is None), and for Adam two samples of each den, gathered while
        the walk has it in cache: ``den[::max(1, n // sample_cap)][:sample_cap]`` per tensor
        (a list of float32 views) and ``den[::q_stride]`` of every tensor, concatenated, with
        their lengths. Runs while the GIL is released."""
        nt = len(thetas)
        out = torch.empty(nt, POST_TERMS, dtype=F64)
        adam = ms[0] is not None
        s_count = [min(n, sample_cap) for n in lengths] if adam else [0] * nt
        s_stride = [1 if n <= sample_cap else n // sample_cap for n in lengths]
        q_count = [-(-n // q_stride) for n in lengths] if adam else [0] * nt
        s_buf, q_buf = torch.empty(sum(s_count), dtype=F32), torch.empty(sum(q_count), dtype=F32)
        rc = _S.lib.optiscope_post(
            nt,
            (_P * nt)(*snaps_ptr),
            _ptrs(thetas),
            _ptrs(grads),
            _ptrs(ms),
            _ptrs(dens),
            _ptrs(vs),
            _floats(eps_d),
            _floats(thr),
            _lengths(lengths),
            _lengths(s_stride),
            _lengths(s_count),
            _addresses(s_buf, s_count),
            q_stride,
            _addresses(q_buf, q_count),
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if rc:
            raise MemoryError("optiscope: native post-step walk could not allocate its work list")
        return out.t(), list(s_buf.split(s_count)), q_buf, q_count

    @staticmethod
    def absmax(t: torch.Tensor) -> float:
        """max |t| of a contiguous float32 CPU tensor, NaN if it holds a NaN (the caller checks
        ``usable``). A host value from host memory: no device, no sync."""
        return _S.lib.optiscope_absmax(t.data_ptr(), t.numel(), torch.get_num_threads())


def addresses(buf: torch.Tensor, counts: list[int]) -> list[int]:
    """The address of each tensor's part of the float32 ``buf``: parts of these lengths, in order."""
    out, at = [], buf.data_ptr()
    for c in counts:
        out.append(at)
        at += 4 * c
    return out


def _addresses(buf: torch.Tensor, counts: list[int]) -> ctypes.Array:
    return (_P * len(counts))(*addresses(buf, counts))


def _ptrs(tensors) -> ctypes.Array:
    return (_P * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def _floats(values: list[float]) -> ctypes.Array:
    return (ctypes.c_float * len(values))(*values)


def _lengths(values: list[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)
