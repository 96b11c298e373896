"""Per-tensor sums from which every optimizer statistic is assembled (global, per group, per tensor).

Everything here runs on the device and returns device tensors: no host sync. Sums of squares and
counts are kept per tensor so that the global and per-group values are exact aggregates of the
same numbers the per-tensor series show.

Adam's normalised update, with the optimizer's own step count t and its own formula:
    u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)      (v = max_exp_avg_sq with amsgrad)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: |u| above this counts towards update bimodality (Adam's sign-like regime).
BIMODAL_THRESHOLD = 0.9
#: At most this many coordinates of one tensor enter its epsilon-headroom median (a strided sample).
HEADROOM_SAMPLE_PER_TENSOR = 4096
#: At most about this many coordinates in all enter the global and per-group medians.
HEADROOM_SAMPLE_TOTAL = 65536

F64 = torch.float64
#: float32 sums of 0/1 values are exact below 2^24 terms.
_EXACT_F32_COUNT = 1 << 24


class Scratch:
    """One reusable float32 work buffer per device, as large as the largest tensor seen.

    Fresh large temporaries cost page faults on every sampled step; one buffer kept between
    sampled steps costs the size of the largest parameter tensor and nothing else.
    """

    def __init__(self):
        self._buf: dict[torch.device, torch.Tensor] = {}

    def get(self, n: int, device: torch.device) -> torch.Tensor:
        buf = self._buf.get(device)
        if buf is None or buf.numel() < n:
            buf = self._buf[device] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n]


def _count_ones(x: torch.Tensor) -> torch.Tensor:
    return sum(x[i:i + _EXACT_F32_COUNT].sum().to(F64) for i in range(0, x.numel(), _EXACT_F32_COUNT))


def sq_norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-tensor squared L2 norms as one float64 vector (one fused pass per device/dtype group)."""
    if not tensors:
        return torch.zeros(0, dtype=F64, device=device)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack([n.to(device=device, dtype=F64) for n in norms]).square()


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    # AdamW subclasses Adam; NAdam, RAdam and Adamax update differently and get the generic series.
    return isinstance(optimizer, torch.optim.Adam)


def _bias_corrections(step, beta1: float, beta2: float):
    """1 - beta^t for a step count that is a Python number or a (CPU or device) 0-d tensor."""
    if isinstance(step, torch.Tensor):
        step = step.to(F64)
    return 1 - beta1 ** step, 1 - beta2 ** step


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _strided(t: torch.Tensor, cap: int) -> torch.Tensor:
    flat = _flat(t)
    return flat[:: max(1, math.ceil(flat.numel() / cap))]


@dataclass
class AdamSums:
    """Per tensor (same order as the tensors given), float64 device vectors."""

    m_sq: torch.Tensor        # ||m||^2
    v_sq: torch.Tensor        # ||v||^2
    u_sq: torch.Tensor        # sum u^2
    u_big: torch.Tensor       # count |u| > BIMODAL_THRESHOLD
    count: torch.Tensor       # numel
    headroom: torch.Tensor    # log10(median(sqrt(v_hat)) / eps) of a strided sample
    samples: list[torch.Tensor]  # per tensor: sqrt(v_hat)/eps at a uniform global stride
    bc1: torch.Tensor         # 1 - beta1^t
    bc2: torch.Tensor         # 1 - beta2^t


def adam_sums(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, group_of: dict[int, dict],
              device: torch.device, total_numel: int, scratch: Scratch) -> AdamSums:
    """Moment norms and normalised-update statistics after the step.

    Scalars are folded so that each tensor costs six elementwise passes and three reductions:
    with d = sqrt(v) + eps * sqrt(bc2) and u' = m / d, u = u' * sqrt(bc2) / bc1, so
    sum(u^2) = sum(u'^2) * bc2 / bc1^2 and |u| > c  <=>  |u'| > c * bc1 / sqrt(bc2).
    """
    out: dict[str, list] = {k: [] for k in ("m_sq", "v_sq", "u_sq", "u_big", "headroom", "bc1", "bc2")}
    counts, samples = [], []
    stride = max(1, math.ceil(total_numel / HEADROOM_SAMPLE_TOTAL))
    for p in params:
        st = optimizer.state[p]
        group = group_of[id(p)]
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        m, v = _flat(st["exp_avg"]).float(), _flat(st["exp_avg_sq"]).float()
        den_src = _flat(st["max_exp_avg_sq"]).float() if group.get("amsgrad") else v
        bc1, bc2 = _bias_corrections(st["step"], float(beta1), float(beta2))
        bc1 = torch.as_tensor(bc1, dtype=F64, device=device)
        bc2 = torch.as_tensor(bc2, dtype=F64, device=device)
        sqrt_bc2 = bc2.sqrt()
        # sqrt(v_hat) / eps on strided samples (tiny): the per-tensor and the global median
        per_tensor = _strided(den_src, HEADROOM_SAMPLE_PER_TENSOR).to(device=device, dtype=F64).sqrt() / (sqrt_bc2 * eps)
        samples.append(den_src[::stride].to(device=device, dtype=F64).sqrt() / (sqrt_bc2 * eps))
        work = torch.sqrt(den_src, out=scratch.get(den_src.numel(), den_src.device))
        work.add_((eps * sqrt_bc2).to(work.device, torch.float32))
        torch.div(m, work, out=work)
        out["u_sq"].append(torch.dot(work, work).to(device, F64) * bc2 / bc1.square())
        torch.gt(work.abs_(), (BIMODAL_THRESHOLD * bc1 / sqrt_bc2).to(work.device, torch.float32), out=work)
        out["u_big"].append(_count_ones(work).to(device))
        out["m_sq"].append(torch.dot(m, m))
        out["v_sq"].append(torch.dot(v, v))
        counts.append(float(m.numel()))
        out["headroom"].append(torch.log10(per_tensor.median()))
        out["bc1"].append(bc1)
        out["bc2"].append(bc2)
    stacked = {k: (torch.stack([x.to(device=device, dtype=F64) for x in v]) if v else torch.zeros(0, dtype=F64, device=device))
               for k, v in out.items()}
    return AdamSums(samples=samples, count=torch.tensor(counts, dtype=F64, device=device), **stacked)


def v_underestimation_sums(params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                           group_of: dict[int, dict], device: torch.device,
                           scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """Before the step: per tensor sum of g^2 / max(v_hat_{t-1}, eps^2) and the number of coordinates.

    A tensor with no second moment yet (its first step) contributes nothing (count 0).
    """
    sums, counts = [], []
    for p in params:
        st = optimizer.state.get(p, {})
        if "exp_avg_sq" not in st or p.grad is None:
            sums.append(torch.zeros((), dtype=F64, device=device))
            counts.append(0.0)
            continue
        group = group_of[id(p)]
        _, beta2 = group["betas"]
        _, bc2 = _bias_corrections(st["step"], 0.0, float(beta2))
        bc2 = torch.as_tensor(bc2, dtype=F64, device=device)
        # g^2 / max(v / bc2, eps^2) = bc2 * (g * rsqrt(max(v, eps^2 * bc2)))^2
        v = _flat(st["exp_avg_sq"]).float()
        floor = (group["eps"] ** 2 * bc2).to(device=v.device, dtype=torch.float32)
        vhat = torch.clamp_min(v, floor, out=scratch.get(v.numel(), v.device))
        vhat.rsqrt_().mul_(_flat(p.grad).float())
        sums.append(torch.dot(vhat, vhat).to(device=device, dtype=F64) * bc2)
        counts.append(float(vhat.numel()))
    if not sums:
        return torch.zeros(0, dtype=F64, device=device), torch.zeros(0, dtype=F64, device=device)
    return torch.stack(sums), torch.tensor(counts, dtype=F64, device=device)
