"""One fused kernel per large tensor (and per pack of small tensors) and walk, compiled with ``torch.compile``
off the training thread.

Eager PyTorch runs one kernel per operation: Adam's statistics take about twenty of them, each a
full pass over the tensor, however well the blocks keep the data in cache. A compiled kernel reads
each input once and computes every sum on the way (float32 within rows of ``ROW`` coordinates,
float64 across rows), which is what brings a sampled step near the cost of one plain copy of the
same bytes: before the step the snapshot is a plain copy and ``pre_v`` reads g and v_{t-1}; after
it one ``post_*`` kernel reads the snapshot, theta, g, m and v.

Compiling takes seconds (tens on a cold cache), so it never happens on the training thread:
``Kernels.ready`` starts the compilation of a kernel signature (kernel, device, dtypes) in a
daemon thread and answers False until it is done; until then, and for good if compiling fails (no
C++ compiler, an unsupported device), the probe uses its eager blocks, which compute the same
numbers. Compiled code is then called through ``torch._dynamo.run``, which runs code compiled
before and never compiles: a call whose guards miss runs eagerly instead of stalling a step.
Sizes are symbolic (``dynamic=True``), so one compilation serves every tensor of a signature;
scalars travel as 0-d tensors so that a changing bias correction does not recompile.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .blocks import Block, Sums

log = logging.getLogger("optiscope")

F64 = torch.float64
#: Tensors with at least this many coordinates go through a compiled kernel once one is ready.
MIN_NUMEL = 1 << 14
#: At interpreter exit, wait at most this long for compilations still running: a compiler thread
#: torn down in the middle of its work can abort the process.
EXIT_WAIT_S = 60.0

_threads: list[threading.Thread] = []
#: This compile's options only (never the process-wide config the user's own compiles read):
#: fuse the independent reductions over the same coordinates into one loop, so each input is
#: read once.
_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"aggressive_fusion": True}


@atexit.register
def _join_compilations() -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    for th in list(_threads):
        th.join(max(0.0, deadline - time.monotonic()))


class NotCompiled(RuntimeError):
    """A kernel reached its eager body: compiled code did not match the call (or a tracer such as
    cProfile keeps the compiler out). Eagerly, the kernel would allocate tensor-sized temporaries
    and run far slower than the blocks, so it stops before doing any work."""


def _compiled_only() -> None:
    # traced as True (and removed) when compiling; False when the body runs eagerly
    if not torch.compiler.is_compiling():
        raise NotCompiled


def _up(x: torch.Tensor) -> torch.Tensor:
    # compute in float32 (float64 stays float64): bfloat16 products would round at 4e-3
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


#: Coordinates per row of a kernel's partial sums (see ``_reduce``).
ROW = 1024


def _reduce(terms, tensors, *scalars) -> torch.Tensor:
    """The sums of ``terms(*tensors, *scalars)`` (a list of elementwise expressions), in float64.

    The tensor is viewed as rows of ``ROW`` coordinates plus a short tail: each row is summed in
    float32 in registers, and the row sums in float64. The compiler then emits one loop over rows
    computing every term (each input read once); a float64 accumulator per coordinate instead
    halves the vector width, and reductions over the whole length come out as one loop each.
    A float32 sum of 1024 terms is within about 1e-7 of the exact sum; counts stay exact.
    Terms are reduced one by one, never stacked first: a stack of more than a few is not fused.
    """
    n = tensors[0].shape[0]
    # The tail keeps 2 to ROW + 1 coordinates, never 0 or 1: the compiler specialises on those
    # sizes, and compiled code would miss every tensor whose length is a multiple of ROW (or one more).
    k = (n - 2) // ROW * ROW
    rows = terms(*[_up(x[:k]).view(-1, ROW) for x in tensors], *scalars)
    tail = terms(*[_up(x[k:]) for x in tensors], *scalars)
    return torch.stack([r.sum(1).sum(dtype=F64) + t.sum(dtype=F64) for r, t in zip(rows, tail)])


def _vu_terms(g, v, floor):
    return [g * g / torch.clamp_min(v, floor)]


def _plain_terms(snap, t, g):
    d = snap - t
    return [d * d, d * g, t * t, snap * snap, g * g]


def _adam_terms(snap, t, g, m, den, v, eps_d, thr):
    u = m / (torch.sqrt(den) + eps_d)
    return _plain_terms(snap, t, g) + [u * u, (u.abs() > thr).float(), m * m, v * v]


def pre_v(g, v, floor):
    """Before the step: sum g^2 / max(v, floor) (v-underestimation before bias correction)."""
    _compiled_only()
    return _reduce(_vu_terms, (g, v), floor)


def post_plain(snap, theta, g):
    """After the step, with d = theta_before - theta_after: ||d||^2, <d, g>, ||theta_after||^2,
    ||theta_before||^2, ||g||^2 (g is the gradient the optimizer stepped with)."""
    _compiled_only()
    return _reduce(_plain_terms, (snap, theta, g))


def post_adam(snap, theta, g, m, den, v, eps_d, thr):
    """``post_plain`` and, with u' = m / (sqrt(den) + eps_d): sum u'^2, count |u'| > thr, ||m||^2, ||v||^2."""
    _compiled_only()
    return _reduce(_adam_terms, (snap, theta, g, m, den, v), eps_d, thr)


def post_adam_v(snap, theta, g, m, v, eps_d, thr):
    """``post_adam`` when the denominator is v itself (no amsgrad): v is read once."""
    _compiled_only()
    return _reduce(
        lambda s, t, g_, m_, v_, e, c: _adam_terms(s, t, g_, m_, v_, v_, e, c), (snap, theta, g, m, v), eps_d, thr
    )


# -- packs of small tensors, as rows ------------------------------------------------------------
# A pack (see ``blocks``) whose member lengths share a divisor W is a (rows, W) matrix in which every
# row belongs to one member: the same terms, summed per row, then per member by the caller. The
# per-member scalars come one per row, in float32 like the data (a float64 vector would promote
# the whole computation to float64).


def _row_sums(terms) -> torch.Tensor:
    return torch.stack([t.sum(1).to(F64) for t in terms])


def pre_v_rows(g, v, floor):
    _compiled_only()
    return _row_sums(_vu_terms(_up(g), _up(v), floor[:, None]))


def post_plain_rows(snap, theta, g):
    _compiled_only()
    return _row_sums(_plain_terms(_up(snap), _up(theta), _up(g)))


def post_adam_rows(snap, theta, g, m, den, v, eps_d, thr):
    _compiled_only()
    return _row_sums(_adam_terms(*(_up(x) for x in (snap, theta, g, m, den, v)), eps_d[:, None], thr[:, None]))


def post_adam_v_rows(snap, theta, g, m, v, eps_d, thr):
    _compiled_only()
    return _row_sums(_adam_terms(*(_up(x) for x in (snap, theta, g, m, v, v)), eps_d[:, None], thr[:, None]))


KERNELS: dict[str, Callable[..., Any]] = {
    "pre_v": pre_v,
    "post_plain": post_plain,
    "post_adam": post_adam,
    "post_adam_v": post_adam_v,
    "pre_v_rows": pre_v_rows,
    "post_plain_rows": post_plain_rows,
    "post_adam_rows": post_adam_rows,
    "post_adam_v_rows": post_adam_v_rows,
}
# trailing scalar arguments: 0-d float64, or one float32 per row for the *_rows kernels
_SCALARS = {
    "pre_v": 1,
    "post_plain": 0,
    "post_adam": 2,
    "post_adam_v": 2,
    "pre_v_rows": 1,
    "post_plain_rows": 0,
    "post_adam_rows": 2,
    "post_adam_v_rows": 2,
}


class _Registry:
    """Compiled code is the process's (Dynamo caches it per function), so what is ready is shared
    by every probe: a second probe, or a second run in the same process, never compiles again."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ready: set[tuple] = set()
        self.pending: set[tuple] = set()
        self.failed = False
        self.run: dict = {}
        self.compiled: dict = {}


_REG = _Registry()


class Kernels:
    """The compiled kernels as one probe uses them. ``enabled=False``: never compile (eager blocks only)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and hasattr(torch, "compile") and not torch._dynamo.config.disable
        self._misses: dict[tuple, int] = {}

    def ready(self, name: str, tensors: list[torch.Tensor]) -> bool:
        """True when ``name`` is compiled for these tensors' device and dtypes; else start
        compiling it (once per process, in the background) and answer False."""
        if not self.enabled or _REG.failed:
            return False
        sig = (name, tensors[0].device, tuple(t.dtype for t in tensors))
        if sig in _REG.ready:
            return True
        with _REG.lock:
            if sig not in _REG.pending:
                _REG.pending.add(sig)
                th = threading.Thread(target=_compile, args=(sig,), name="optiscope-compile", daemon=True)
                _threads.append(th)
                th.start()
        return False

    @staticmethod
    def wait(timeout: float | None = None) -> bool:
        """Wait for the compilations started so far (benchmarks and tests); True if all are ready."""
        for th in list(_threads):
            th.join(timeout)
        return not _REG.failed and _REG.pending <= _REG.ready

    def call(self, name: str, *args) -> torch.Tensor | None:
        """The kernel's result, or None when compiled code did not serve the call (then the
        caller uses the eager blocks); a signature that misses repeatedly is given up."""
        try:
            with torch.no_grad():  # as compiled: grad mode is part of what the compiled code guards on
                return _REG.run[name](*args)
        except NotCompiled:
            sig = (name, args[0].device, tuple(a.dtype for a in args[: len(args) - _SCALARS[name]]))
            self._misses[sig] = self._misses.get(sig, 0) + 1
            if self._misses[sig] >= 3:
                _REG.ready.discard(sig)  # stays pending: never compiled again
                log.info("optiscope: compiled statistics kernel %s keeps missing; using eager blocks", name)
            return None


def _compile(sig: tuple) -> None:
    name, device, dtypes = sig
    try:
        fn = KERNELS[name]
        with _REG.lock:
            if name not in _REG.compiled:
                _REG.compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True, options=_OPTIONS)
                _REG.run[name] = torch._dynamo.run(fn)
            compiled = _REG.compiled[name]
        # sizes no real call specialises on (0 and 1 are special to the compiler)
        if name.endswith("_rows"):
            rows, width = 5, 67
            tensors = [torch.ones(rows, width, dtype=dt, device=device) for dt in dtypes]
            scalars = [torch.full((rows,), 0.5, device=device) for _ in range(_SCALARS[name])]
        else:
            n = MIN_NUMEL + ROW // 2 + 3
            tensors = [torch.ones(n, dtype=dt, device=device) for dt in dtypes]
            scalars = [torch.tensor(0.5, dtype=F64, device=device) for _ in range(_SCALARS[name])]
        with torch.no_grad():
            compiled(*tensors, *scalars)
        _REG.ready.add(sig)
    except Exception as e:  # no compiler, unsupported device or dtype: the eager blocks stay
        _REG.failed = True
        log.info(
            "optiscope: fused statistics kernels unavailable (%s: %s); using eager blocks",
            type(e).__name__,
            str(e).splitlines()[0][:200] if str(e) else "",
        )


# -- one walk's unit through a kernel: what stats' walks call -------------------------------------


def _whole(b: Block, n: int) -> Block:
    """A block covering all of one tensor (member ``b.members[0]``), for a fused kernel's sums."""
    return Block(b.members, 0, n, None, b.device, b.dtype)


def before_tensor(kernels, theta, snap, g, v, floor, b: Block, sums: Sums) -> bool:
    """The snapshot as one plain copy and, with v_{t-1}, its v-underestimation sum in one kernel."""
    if kernels is None or theta.numel() < MIN_NUMEL:
        return False
    if v is None:  # nothing to reduce before the step: the copy is all there is
        snap.copy_(theta)
        return True
    if not kernels.ready("pre_v", [g, v]):
        return False
    r = kernels.call("pre_v", g, v, torch.tensor(floor, dtype=F64).to(theta.device))
    if r is None:
        return False
    # The copy stays an eager memcpy: compiled into the kernel it read theta twice.
    snap.copy_(theta)
    sums.add("vu", _whole(b, theta.numel()), r)
    return True


def after_tensor(kernels, i, snap, theta, g, a: dict | None, b: Block, sums: Sums) -> bool:
    if kernels is None or theta.numel() < MIN_NUMEL:
        return False
    if a is None:
        name, args, scalars = "post_plain", [snap, theta, g], []
    else:
        name, args = (
            ("post_adam", [snap, theta, g, a["m"][i], a["den"][i], a["v"][i]])
            if a["ams"][i]
            else ("post_adam_v", [snap, theta, g, a["m"][i], a["v"][i]])
        )
        scalars = list(a["scal"][i])
    if not kernels.ready(name, args):
        return False
    r = kernels.call(name, *args, *scalars)
    if r is None:
        return False
    _add_post(sums, _whole(b, theta.numel()), r.reshape(-1, 1), a is not None)
    return True


def before_pack(kernels, b: Block, snap, thetas, grads, vs, floors, had_v, sums: Sums, scratch) -> bool:
    """A pack's snapshot (one cat) and, where its members have v_{t-1}, v-underestimation as rows."""
    w = b.width() if kernels is not None else 0
    if not w:
        return False
    if any(had_v[i] for i in b.members):
        args = [b.read(grads, scratch, "g").view(-1, w), b.read(vs, scratch, "v").view(-1, w)]
        if not kernels.ready("pre_v_rows", args):
            return False
        r = kernels.call("pre_v_rows", *args, b.per_row(floors))
        if r is None:
            return False
        sums.add("vu", b, b.per_member(r)[0])
    torch.cat([thetas[i] for i in b.members], out=snap)
    return True


def after_pack(kernels, b: Block, snap, thetas, grads, a: dict | None, sums: Sums, scratch) -> bool:
    w = b.width() if kernels is not None else 0
    if not w:
        return False
    args = [snap, b.read(thetas, scratch, "t"), b.read(grads, scratch, "g")]
    if a is None:
        name, scalars = "post_plain_rows", []
    else:
        args += [b.read(a["m"], scratch, "m")]
        if any(a["ams"][i] for i in b.members):
            name, args = "post_adam_rows", args + [b.read(a["den"], scratch, "den"), b.read(a["v"], scratch, "v")]
        else:
            name, args = "post_adam_v_rows", args + [b.read(a["v"], scratch, "v")]
        scalars = [b.per_row(a["eps_d"]), b.per_row(a["thr"])]
    args = [x.view(-1, w) for x in args]
    if not kernels.ready(name, args):
        return False
    r = kernels.call(name, *args, *scalars)
    if r is None:
        return False
    _add_post(sums, b, b.per_member(r), a is not None)
    return True


PLAIN = ("upd", "dot", "after", "before", "post")  # the order of the post_* results
ADAM = ("u", "big", "m", "v")


def _add_post(sums: Sums, b: Block, per_term: torch.Tensor, adam: bool) -> None:
    """A post_* kernel's results, one row per term (in PLAIN, then ADAM order) and one column per
    member of ``b``, into ``sums``."""
    for j, key in enumerate(PLAIN + ADAM if adam else PLAIN):
        sums.add(key, b, per_term[j])
