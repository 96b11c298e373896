"""Per-tensor sums from which every optimizer statistic is assembled (global, per group, per tensor).

Everything here runs on the device and returns device tensors: no host sync. Sums of squares and
counts are kept per tensor so that the global and per-group values are exact aggregates of the
same numbers the per-tensor series show.

A sampled step makes two walks over memory, block by block (see ``blocks``), or one fused kernel
per large tensor (see ``fused``):
- before the step: the snapshot of the parameters (a plain copy) and, for Adam, v-underestimation
  from g and v_{t-1}, which only exist before the step;
- after it: ||theta_before - theta_after||^2, its dot with g, ||theta_before||^2 (from the
  snapshot), ||theta_after||^2, ||g||^2 (the gradient the optimizer stepped with: the step does not
  change it), and for Adam the normalised-update statistics and the moment norms.

Adam's normalised update, with the optimizer's own step count t and its own formula:
    u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)      (v = max_exp_avg_sq with amsgrad)
Scalars are folded so that u itself is never formed: with d = sqrt(v) + eps * sqrt(bc2) and
u' = m / d, u = u' * sqrt(bc2) / bc1, so sum(u^2) = sum(u'^2) * bc2 / bc1^2 and
|u| > c  <=>  |u'| > c * bc1 / sqrt(bc2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import fused
from .blocks import Block, Scratch, Sums, sq_sum
from .fused import Kernels
from .native import Native
from .native import addresses as native_addresses

#: |u| above this counts towards update bimodality (Adam's sign-like regime).
BIMODAL_THRESHOLD = 0.9
#: At most this many coordinates of one tensor enter its epsilon-headroom median (a strided sample).
HEADROOM_SAMPLE_PER_TENSOR = 1024
#: At most about this many coordinates in all enter the global and per-group medians.
HEADROOM_SAMPLE_TOTAL = 16384

F64 = torch.float64


def sq_norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-tensor squared L2 norms as one float64 vector on ``device``."""
    if not tensors:
        return torch.zeros(0, dtype=F64, device=device)
    return torch.stack([sq_sum(t).to(device) for t in tensors])


def grad_sq_total(params: dict[int, torch.Tensor], reduced: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """||g||^2 over the gradients of ``params`` (by id) as they are now, as one float64 device
    tensor (None when none has a gradient). ``reduced``: squared norms already taken (CPU float32
    gradients reduced in their hook), used for the parameters among ``params``; the rest take one
    ``_foreach_norm`` per device and dtype, a handful of kernels whatever the number of tensors.
    No sync."""
    groups: dict[tuple[torch.device, torch.dtype, bool], list[torch.Tensor]] = {}
    parts = []
    done = [sq for k, sq in reduced.items() if k in params]
    if done:
        parts.append(torch.stack(done).to(F64).sum())
    for k, p in params.items():
        g = p.grad
        if g is not None and k not in reduced:
            groups.setdefault((g.device, g.dtype, g.is_sparse), []).append(g)
    for (_, dtype, sparse), grads in groups.items():
        if sparse or not dtype.is_floating_point:
            parts.extend(sq_sum(g).to(F64) for g in grads)
        else:  # float32 accumulation for half-precision gradients, whose norm may not fit
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32 if dtype.itemsize < 4 else None)
            parts.append(torch.stack(norms).to(F64).square().sum())
    if not parts:
        return None
    device = parts[0].device
    return torch.stack([x.to(device) for x in parts]).sum()


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    # AdamW subclasses Adam; NAdam, RAdam and Adamax update differently and get the generic series.
    return isinstance(optimizer, torch.optim.Adam)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1)


def headroom_sample(t: torch.Tensor, cap: int = HEADROOM_SAMPLE_PER_TENSOR) -> torch.Tensor:
    """A tensor's coordinates for its epsilon-headroom median: all of them below ``cap``, else
    exactly ``cap`` at a uniform stride from the first (a view: nothing is copied). Equal lengths
    let one batched median serve every large tensor. Each sampled coordinate of a large tensor is a
    cache miss, which is what the sample size costs."""
    flat = _flat(t)
    n = flat.numel()
    return flat if n <= cap else flat[:: n // cap][:cap]


def medians(samples: list[torch.Tensor], device) -> torch.Tensor:
    """torch.median of each sample (the lower middle value; NaN if the sample holds one) as one
    float64 vector, with one median per distinct sample length instead of one per tensor."""
    out = torch.empty(len(samples), dtype=F64, device=device)
    by_len: dict[tuple, list[int]] = {}
    for i, x in enumerate(samples):
        by_len.setdefault((x.numel(), x.device, x.dtype), []).append(i)
    for (n, _, _), idx in by_len.items():
        if n == 0:
            out[idx] = math.nan
            continue
        # median along a dimension is the lower middle value and NaN for a row holding one,
        # like torch.median of each row alone
        mid = torch.stack([samples[i] for i in idx]).median(dim=1).values
        out[torch.tensor(idx, device=device)] = mid.to(device, F64)
    return out


@dataclass
class Before:
    """What the pre-step walk leaves for the post-step walk, per tensor unless said otherwise."""

    blocks: list[Block]
    snapshots: list[torch.Tensor]  # per block: its coordinates of theta before the step
    whole: dict[int, torch.Tensor]  # per large tensor: all of its snapshot
    vu_sum: torch.Tensor | None  # sum g^2 / max(v_hat_{t-1}, eps^2) (0 without v_{t-1})
    vu_count: torch.Tensor | None  # coordinates that entered vu_sum
    had_v: list[bool]
    native: list[int] | None = None  # the native walk's snapshot: one address per tensor (else None)
    kernels: Kernels | None = None  # the compiled kernels the post-step walk may use (blocks path)


def before_step(
    params: list[torch.Tensor],
    optimizer,
    group_of: dict[int, dict],
    device: torch.device,
    scratch: Scratch,
    adam: bool,
    kernels: Kernels | None = None,
    native: Native | None = None,
) -> Before:
    had_v = [adam and "exp_avg_sq" in optimizer.state.get(p, {}) for p in params]
    v_prev, floors, bc2s = _vu_inputs(params, had_v, optimizer, group_of)
    lengths = [p.numel() for p in params]
    grads = _grads(params)
    if native is not None and _native_fits(native, params, grads, v_prev, floors):
        if native.ready():
            snaps = native_addresses(scratch.snapshot(("native",), sum(lengths), device, params[0].dtype), lengths)
            vu = native.pre(params, snaps, grads, v_prev, floors, lengths)
            return _before(Before([], [], {}, None, None, had_v, snaps), vu, bc2s, lengths, device)
        if native.building():
            kernels = None  # eager blocks until it is built, rather than a second compiler meanwhile
    out, vu = _before_blocks(params, grads, v_prev, floors, had_v, device, scratch, kernels)
    return _before(out, vu, bc2s, lengths, device)


def _vu_inputs(
    params: list[torch.Tensor], had_v: list[bool], optimizer, group_of: dict[int, dict]
) -> tuple[list, list, list]:
    """Per tensor: v_{t-1} (None without it), the floor eps^2 * bc2 and bc2 (1.0 and 0.0 without it)."""
    # v-underestimation: g^2 / max(v / bc2, eps^2) = bc2 * g^2 / max(v, eps^2 * bc2), v = v_{t-1}.
    v_prev, floors, bc2s = [], [], []
    memo: dict[tuple, tuple] = {}
    for p, h in zip(params, had_v):
        if h:
            st = optimizer.state[p]
            floor, bc2 = _once_per_step(memo, p, st, group_of[id(p)], _vu_scalars)
            v_prev.append(st["exp_avg_sq"])
            floors.append(floor)
            bc2s.append(bc2)
        else:
            v_prev.append(None)
            floors.append(1.0)
            bc2s.append(0.0)
    return v_prev, floors, bc2s


def _before_blocks(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    v_prev: list,
    floors: list,
    had_v: list[bool],
    device: torch.device,
    scratch: Scratch,
    kernels: Kernels | None,
) -> tuple[Before, torch.Tensor]:
    """The snapshot and the per-tensor v-underestimation sums (not yet bias-corrected), through
    fused kernels where they serve and eager blocks elsewhere."""
    sums = Sums(len(params), device)
    thetas = [_flat(p) for p in params]
    grads = [_flat(g) for g in grads]
    # A tensor without v_{t-1} (its first step) stands in with its own gradient and is masked out,
    # so that a pack of mixed tensors still takes one pass.
    vs = [g if v is None else _flat(v) for g, v in zip(grads, v_prev)]
    blocks = scratch.plan(thetas)
    snapshots: list[torch.Tensor] = []
    whole: dict[int, torch.Tensor] = {}  # snapshot of each large tensor; its chunks' are views of it

    def eager(b: Block, snap: torch.Tensor) -> None:
        snap.copy_(b.read(thetas, scratch, "t"))
        if any(had_v[i] for i in b.members):
            g = scratch.f32(b.read(grads, scratch, "g"), "c")
            w = torch.clamp_min(b.read(vs, scratch, "v"), b.spread(floors), out=scratch.get("w", b.n, b.device))
            sums.add("vu", b, b.reduce(torch.div(g, w, out=w), g))  # sum g * g / max(v, floor)

    for k, i, unit in units(blocks):
        if i is None:  # a pack of small tensors
            snap = scratch.snapshot(("pack", k), unit[0].n, unit[0].device, unit[0].dtype)
            if not fused.before_pack(kernels, unit[0], snap, thetas, grads, vs, floors, had_v, sums, scratch):
                eager(unit[0], snap)
            snapshots.append(snap)
            continue
        whole[i] = scratch.snapshot(("tensor", i), thetas[i].numel(), unit[0].device, thetas[i].dtype)
        views = [whole[i][b.lo : b.hi] for b in unit]
        snapshots.extend(views)
        if not fused.before_tensor(
            kernels, thetas[i], whole[i], grads[i], vs[i] if had_v[i] else None, floors[i], unit[0], sums
        ):
            for b, snap in zip(unit, views):
                eager(b, snap)
    return Before(blocks, snapshots, whole, None, None, had_v, None, kernels), sums.total("vu")


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of the walked parameters: those that have one (the probe walks no other)."""
    out = []
    for p in params:
        if p.grad is None:
            raise ValueError("optiscope: a walked parameter has no gradient")
        out.append(p.grad)
    return out


def _native_fits(native: Native, params, grads, v_prev, floors) -> bool:
    """The native walks take float32 CPU tensors and step counts read as numbers."""
    return (
        all(isinstance(f, float) for f in floors)
        and native.usable(params)
        and native.usable(grads)
        and native.usable(v_prev)
    )


def _before(out: Before, vu: torch.Tensor, bc2s: list, lengths: list[int], device) -> Before:
    """The per-tensor v-underestimation sums, bias-corrected, and their counts (0 without v_{t-1})."""
    if any(out.had_v):
        mask = torch.tensor(out.had_v, device=device)
        zero = torch.zeros((), dtype=F64, device=device)
        out.vu_sum = torch.where(mask, vu * _vector(bc2s, device), zero)
        out.vu_count = torch.where(mask, torch.tensor(lengths, dtype=F64, device=device), zero)
    return out


def units(blocks: list[Block]):
    """(block index, tensor index, blocks): each pack alone (tensor index None), and the chunks of
    each large tensor together (a fused kernel takes the whole tensor at once)."""
    k = 0
    while k < len(blocks):
        b = blocks[k]
        if b.packed:
            yield k, None, [b]
            k += 1
            continue
        j = k
        while j < len(blocks) and not blocks[j].packed and blocks[j].members[0] == b.members[0]:
            j += 1
        yield k, b.members[0], blocks[k:j]
        k = j


@dataclass
class AdamSums:
    """Per tensor (same order as the tensors given), float64 device vectors."""

    m_sq: torch.Tensor  # ||m||^2
    v_sq: torch.Tensor  # ||v||^2
    u_sq: torch.Tensor  # sum u^2
    u_big: torch.Tensor  # count |u| > BIMODAL_THRESHOLD
    count: torch.Tensor  # numel
    headroom: torch.Tensor  # log10(median(sqrt(v_hat)) / eps) of headroom_sample
    bc1: torch.Tensor  # 1 - beta1^t
    bc2: torch.Tensor  # 1 - beta2^t
    q_parts: list[torch.Tensor]  # per tensor: (sqrt(v_hat)/eps)^2 at one uniform stride over all tensors

    def eps_headroom(self, members: list[int] | None = None) -> torch.Tensor:
        """log10(median(sqrt(v_hat)) / eps) over the global sample of these tensors (all by
        default). sqrt is monotonic, so the median of the squares is the square of the median."""
        q = torch.cat(self.q_parts if members is None else [self.q_parts[i] for i in members])
        return 0.5 * torch.log10(q.median())


@dataclass
class After:
    upd_sq: torch.Tensor  # ||theta_before - theta_after||^2
    dots: torch.Tensor  # <theta_before - theta_after, g>
    after_sq: torch.Tensor  # ||theta_after||^2
    before_sq: torch.Tensor  # ||theta_before||^2
    post_sq: torch.Tensor  # ||g||^2 of the gradient the optimizer stepped with
    adam: AdamSums | None


def after_step(
    params: list[torch.Tensor],
    pre: Before,
    optimizer,
    group_of: dict[int, dict],
    device: torch.device,
    scratch: Scratch,
    adam: bool,
) -> After:
    lengths = [p.numel() for p in params]
    stride = max(1, math.ceil(sum(lengths) / HEADROOM_SAMPLE_TOTAL))  # one uniform stride over all tensors
    a = _adam_inputs(params, optimizer, group_of, stride, samples=pre.native is None) if adam else None
    if pre.native is not None:
        if a is not None and not all(Native.usable(a[k]) for k in ("m", "den", "v")):
            # state the native walk cannot read (never seen with torch.optim, whose state is laid
            # out like the parameter): the generic series only, rather than a wrong read
            a = None
        nones, ones = [None] * len(params), [1.0] * len(params)
        ms, dens, vs = (nones, nones, nones) if a is None else (a["m"], a["den"], a["v"])
        r, per, q, q_lengths = Native.post(
            pre.native,
            params,
            _grads(params),
            ms,
            dens,
            vs,
            ones if a is None else a["eps_d"],
            ones if a is None else a["thr"],
            lengths,
            HEADROOM_SAMPLE_PER_TENSOR,
            stride,
        )
        totals = dict(zip(fused.PLAIN + fused.ADAM, r))
    else:
        totals = _after_blocks(params, pre, a, device, scratch)
        if a is not None:
            per, q, q_lengths = a["per"], torch.cat(a["q"]), [x.numel() for x in a["q"]]
    out = After(totals["upd"], totals["dot"], totals["after"], totals["before"], totals["post"], None)
    if a is not None:  # Adam, and its state readable by the walk that ran
        bc1, bc2, eps_d = (_vector(a[k], device) for k in ("bc1", "bc2", "eps_d"))
        q = q.to(device, F64) * torch.repeat_interleave(
            eps_d.square().reciprocal(), torch.tensor(q_lengths, device=device)
        )
        out.adam = AdamSums(
            m_sq=totals["m"],
            v_sq=totals["v"],
            u_sq=totals["u"] * bc2 / bc1.square(),
            u_big=totals["big"],
            count=torch.tensor(lengths, dtype=F64, device=device),
            # medians of the raw v samples (an element each, so exact in any dtype); sqrt and
            # the bias correction are monotonic and come after
            headroom=torch.log10(medians(per, device).sqrt() / eps_d),
            bc1=bc1,
            bc2=bc2,
            q_parts=list(q.split(q_lengths)),
        )
    return out


def _after_blocks(params, pre: Before, a: dict | None, device, scratch: Scratch) -> dict[str, torch.Tensor]:
    """The post-step sums, per tensor, through fused kernels where they serve and eager blocks elsewhere."""
    sums, kernels = Sums(len(params), device), pre.kernels
    thetas = [_flat(p) for p in params]
    grads = [_flat(p.grad) for p in params]
    if a is not None:
        a = {**a, **{k: [_flat(x) for x in a[k]] for k in ("m", "v", "den")}}
    for k, i, unit in units(pre.blocks):
        if i is not None and fused.after_tensor(kernels, i, pre.whole[i], thetas[i], grads[i], a, unit[0], sums):
            continue  # the kernel did this tensor in one pass
        if i is None and fused.after_pack(kernels, unit[0], pre.snapshots[k], thetas, grads, a, sums, scratch):
            continue  # the pack, as rows, in one kernel
        for b, snap in zip(unit, pre.snapshots[k : k + len(unit)]):
            t = b.read(thetas, scratch, "t")
            d = torch.sub(snap, t, out=scratch.get("w", b.n, b.device))
            sums.add("upd", b, b.reduce(d))
            g = scratch.f32(b.read(grads, scratch, "g"), "g32")
            sums.add("dot", b, b.reduce(d, g))
            sums.add("post", b, b.reduce(g))
            sums.add("after", b, b.reduce(scratch.f32(t, "c")))
            sums.add("before", b, b.reduce(scratch.f32(snap, "c")))
            if a is not None:
                _adam_block(b, a, sums, scratch)
    return {k: sums.total(k) for k in fused.PLAIN + (fused.ADAM if a is not None else ())}


def _scalar_step(step):
    """The optimizer's step count as a Python number where reading it costs no device sync (a
    number or a CPU tensor, as torch.optim keeps it by default), else a float64 tensor on its
    device (capturable and fused Adam keep it on the accelerator): the probe never syncs."""
    if isinstance(step, torch.Tensor):
        return float(step) if step.device.type == "cpu" else step.to(F64)
    return float(step)


def _bias_corrections(group: dict, t):
    """1 - beta1^t and 1 - beta2^t for a step count from ``_scalar_step`` (number or tensor)."""
    beta1, beta2 = (float(b) for b in group["betas"])
    return 1 - beta1**t, 1 - beta2**t


def _vector(values: list, device) -> torch.Tensor:
    """Per-tensor scalars (Python numbers or 0-d tensors) as one float64 vector on ``device``."""
    if all(isinstance(v, float) for v in values):
        return torch.tensor(values, dtype=F64, device=device)
    return torch.stack([torch.as_tensor(v, dtype=F64).to(device) for v in values])


def _once_per_step(memo: dict, p, st: dict, group: dict, make):
    """``make(group, t, device)`` for a parameter's step count t: scalars that depend on its group
    and step count only, shared by most parameters, so worked out once per (group, step, device)."""
    t = _scalar_step(st["step"])
    key = (id(group), t if isinstance(t, float) else id(st["step"]), p.device)
    got = memo.get(key)
    if got is None:
        got = memo[key] = make(group, t, p.device)
    return got


def _vu_scalars(group: dict, t, device) -> tuple:
    """v-underestimation's floor eps^2 * bc2 and bc2."""
    bc2 = _bias_corrections(group, t)[1]
    return float(group["eps"]) ** 2 * bc2, bc2


def _adam_scalars(group: dict, t, device) -> tuple:
    """(amsgrad, eps_d, thr, bc1, bc2, the fused kernels' (eps_d, thr) as 0-d tensors)."""
    bc1, bc2 = _bias_corrections(group, t)
    sqrt_bc2 = math.sqrt(bc2) if isinstance(bc2, float) else bc2.sqrt()
    eps_d, thr = float(group["eps"]) * sqrt_bc2, BIMODAL_THRESHOLD * bc1 / sqrt_bc2
    scal = tuple(torch.as_tensor(x, dtype=F64).to(device) for x in (eps_d, thr))
    return bool(group.get("amsgrad")), eps_d, thr, bc1, bc2, scal


def _adam_inputs(params, optimizer, group_of, stride: int, samples: bool = True) -> dict[str, list]:
    """Adam's state and per-tensor scalars; with ``samples``, the views of den that the
    epsilon-headroom medians read (the native walk gathers those itself)."""
    a: dict[str, list] = {k: [] for k in ("m", "v", "den", "ams", "eps_d", "thr", "bc1", "bc2", "per", "q", "scal")}
    memo: dict[tuple, tuple] = {}
    for p in params:
        st = optimizer.state[p]
        got = _once_per_step(memo, p, st, group_of[id(p)], _adam_scalars)
        ams = got[0]
        den = st["max_exp_avg_sq"] if ams else st["exp_avg_sq"]
        for k, x in zip(("ams", "eps_d", "thr", "bc1", "bc2", "scal"), got):
            a[k].append(x)
        a["m"].append(st["exp_avg"])  # as they are: the walks flatten them if they need to
        a["v"].append(st["exp_avg_sq"])
        a["den"].append(den)
        if samples:
            flat = _flat(den)
            a["per"].append(headroom_sample(flat))  # views: nothing is copied yet
            a["q"].append(flat[::stride])
    return a


def _adam_block(b: Block, a: dict, sums: Sums, scratch: Scratch) -> None:
    dev = b.device
    m = b.read(a["m"], scratch, "m")
    v = b.read(a["v"], scratch, "v")
    den = b.read(a["den"], scratch, "den") if any(a["ams"][i] for i in b.members) else v
    w = torch.sqrt(den, out=scratch.get("w", b.n, dev))
    w.add_(b.spread(a["eps_d"]))
    torch.div(m, w, out=w)
    sums.add("u", b, b.reduce(w))
    # a float 0/1 mask: comparisons into bool and count_nonzero are several times slower on CPU
    # (float32 sums of at most 2^24 ones are exact)
    mask = torch.gt(w.abs_(), b.spread(a["thr"]), out=scratch.get("mask", b.n, dev))
    sums.add("big", b, b.count(mask))
    sums.add("m", b, b.reduce(scratch.f32(m, "c")))
    sums.add("v", b, b.reduce(scratch.f32(v, "c")))
