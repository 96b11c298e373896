"""The series of one sampled optimizer step, assembled from the per-tensor sums of the two walks
(``stats.before_step``, ``stats.after_step``): global, per param group and per tensor, each a
device tensor, stacked once into the float64 vector the exporter thread copies to the host.

Nothing here reads a value on the host: every function adds device tensors to a ``SeriesVector``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from . import stats as S
from .contributor import Contribution

F64 = torch.float64
#: Characters a series name may not hold (see wire.NAME_RE), replaced by "_" in generated names.
BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.:/\-]")
#: The names the Adam family's moments take in the catalog; other state kinds are state_norm/<key>.
_STATE_SERIES = {"exp_avg": "exp_avg_norm", "exp_avg_sq": "exp_avg_sq_norm"}


class SeriesVector:
    """Names and 0-d/1-d device tensors, concatenated once into the float64 vector the exporter reads."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.parts: list[torch.Tensor] = []

    def add(self, name: str, value: torch.Tensor) -> None:
        self.names.append(name)
        self.parts.append(value.to(F64).reshape(1))

    def add_many(self, names: list[str], values: torch.Tensor) -> None:
        self.names.extend(names)
        self.parts.append(values.to(F64).reshape(-1))

    def add_contributed(self, contributed: list[Contribution], device: torch.device) -> None:
        """Another probe's values (``Contributor.collect``), moved to the step's device."""
        for name, value in contributed:
            if isinstance(name, list):
                self.add_many(name, value.to(device))
            else:
                self.add(name, value.to(device))

    def finish(self) -> tuple[tuple[str, ...], torch.Tensor]:
        device = self.parts[0].device if self.parts else torch.device("cpu")
        return tuple(self.names), torch.cat([p.to(device) for p in self.parts]) if self.parts else torch.zeros(0)


@dataclass
class PreStep:
    """What the pre-step hook of a sampled step leaves for its post-step hook. Per-tensor lists
    follow ``changing``: the parameters that have a gradient, so the step changes them."""

    grad_norm_known: bool  # the gradients as backward left them are known
    device: torch.device
    changing: list[torch.Tensor]
    group_of: dict[int, dict[str, Any]]  # id(param) -> its param group
    adam: bool  # an Adam or AdamW optimizer
    walk: S.Before | None  # the pre-step walk (None when nothing changes)
    group_index: list[int]  # the index of each changing parameter's param group
    backward: list[torch.Tensor | None]  # backward's ||g||^2 (before any clipping), where measured
    still_sq: torch.Tensor  # ||theta||^2 over the parameters without a gradient (0-d)
    vu: tuple[torch.Tensor, torch.Tensor] | None  # v-underestimation sums and counts, per tensor
    had_v: list[bool] | None  # per tensor: it had a v_{t-1} (entered vu)


@dataclass
class StepSums:
    """The per-tensor float64 device vectors of a sampled step, in ``PreStep.changing`` order."""

    pre: PreStep
    pre_sq: torch.Tensor  # ||g||^2 before any clipping (backward's; else the gradient stepped with)
    post_sq: torch.Tensor  # ||g||^2 of the gradient the optimizer stepped with
    before_sq: torch.Tensor  # ||theta_before||^2
    after_sq: torch.Tensor  # ||theta_after||^2
    upd_sq: torch.Tensor  # ||theta_before - theta_after||^2
    dots: torch.Tensor  # <theta_before - theta_after, g>
    adam: S.AdamSums | None


def after_walk(pre: PreStep, optimizer: torch.optim.Optimizer, scratch: S.Scratch) -> StepSums:
    """The post-step walk over the changing parameters, joined with what the pre-step walk left."""
    device, changing = pre.device, pre.changing
    if not changing:
        none = torch.zeros(0, dtype=F64, device=device)
        return StepSums(pre, none, none, none, none, none, none, None)
    adam_ok = pre.adam and all("exp_avg" in optimizer.state.get(p, {}) for p in changing)
    assert pre.walk is not None  # made whenever a parameter changes
    walk = S.after_step(changing, pre.walk, optimizer, pre.group_of, device, scratch, adam_ok)
    pre_sq = torch.stack([n.to(device) if n is not None else walk.post_sq[i] for i, n in enumerate(pre.backward)])
    return StepSums(pre, pre_sq, walk.post_sq, walk.before_sq, walk.after_sq, walk.upd_sq, walk.dots, walk.adam)


def add_global(out: SeriesVector, s: StepSums, vital_sq: torch.Tensor | None) -> None:
    """The model-wide series every optimizer gets. ``vital_sq``: the vitals' ||g||^2 of this step,
    the grad_norm reported when backward's norms are not known (clipping just appeared)."""
    still_sq = s.pre.still_sq
    update_norm = s.upd_sq.sum().sqrt()
    if s.pre.grad_norm_known:
        out.add("grad_norm", s.pre_sq.sum().sqrt())
    elif vital_sq is not None:  # clipping just appeared: the vitals measured before it
        out.add("grad_norm", vital_sq.sqrt())
    out.add("grad_norm_clipped", s.post_sq.sum().sqrt())
    out.add("grad_nonfinite_tensors", (~torch.isfinite(s.pre_sq)).sum())
    out.add("param_norm", (s.after_sq.sum() + still_sq).sqrt())
    out.add("update_norm", update_norm)
    out.add("update_ratio", update_norm / (s.before_sq.sum() + still_sq).sqrt())
    # d = theta_before - theta_after points along -g for a descent step
    out.add("update_cosine", s.dots.sum() / (update_norm * s.post_sq.sum().sqrt()))


def add_adam(out: SeriesVector, a: S.AdamSums, vu: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Adam's model-wide series: its moments, its normalised update, epsilon's headroom."""
    out.add("exp_avg_norm", a.m_sq.sum().sqrt())
    out.add("exp_avg_sq_norm", a.v_sq.sum().sqrt())
    out.add("update_rms", (a.u_sq.sum() / a.count.sum()).sqrt())
    out.add("update_bimodality", a.u_big.sum() / a.count.sum())
    out.add("eps_headroom", a.eps_headroom())
    out.add("bias_correction1", a.bc1[0])
    out.add("bias_correction2", a.bc2[0])
    if vu is not None:
        out.add("v_underestimation", (vu[0].sum() / vu[1].sum()).sqrt())


def add_state_norms(
    out: SeriesVector, optimizer: torch.optim.Optimizer, changing: list[torch.Tensor], device: torch.device
) -> None:
    """Any other optimizer: the L2 norm of each floating-point state tensor kind it keeps."""
    keys: dict[str, list[torch.Tensor]] = {}
    for p in changing:
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0 and k != "step":
                keys.setdefault(k, []).append(v)
    for k, tensors in sorted(keys.items()):
        name = _STATE_SERIES.get(k, f"state_norm/{BAD_NAME_CHARS.sub('_', k)}")
        out.add(name, S.sq_norms(tensors, device).sum().sqrt())


def add_per_group(out: SeriesVector, s: StepSums, groups: list[int]) -> None:
    """The series of each param group in ``groups`` (when more than one has gradients)."""
    pre, a = s.pre, s.adam
    idx = torch.tensor(pre.group_index, device=pre.device)
    n = max(groups) + 1

    def by_group(v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, dtype=F64, device=v.device).index_add_(0, idx, v)

    g_pre, g_post, g_upd, g_dot, g_before = (by_group(v) for v in (s.pre_sq, s.post_sq, s.upd_sq, s.dots, s.before_sq))
    if a is not None:
        g_m, g_v, g_u, g_big, g_cnt = (by_group(v) for v in (a.m_sq, a.v_sq, a.u_sq, a.u_big, a.count))
    if pre.vu is not None:
        g_vu, g_vc = by_group(pre.vu[0]), by_group(pre.vu[1])
    for gi in groups:
        sfx = f"/group/{gi}"
        if pre.grad_norm_known:
            out.add("grad_norm" + sfx, g_pre[gi].sqrt())
        out.add("update_ratio" + sfx, (g_upd[gi] / g_before[gi]).sqrt())
        out.add("update_cosine" + sfx, g_dot[gi] / (g_upd[gi] * g_post[gi]).sqrt())
        if a is not None:
            out.add("exp_avg_norm" + sfx, g_m[gi].sqrt())
            out.add("exp_avg_sq_norm" + sfx, g_v[gi].sqrt())
            out.add("update_rms" + sfx, (g_u[gi] / g_cnt[gi]).sqrt())
            out.add("update_bimodality" + sfx, g_big[gi] / g_cnt[gi])
            out.add("eps_headroom" + sfx, a.eps_headroom([i for i, g in enumerate(pre.group_index) if g == gi]))
        if (
            pre.vu is not None
            and pre.had_v is not None
            and any(h for h, g in zip(pre.had_v, pre.group_index) if g == gi)
        ):
            out.add("v_underestimation" + sfx, (g_vu[gi] / g_vc[gi]).sqrt())


def add_per_tensor(out: SeriesVector, s: StepSums, names: list[str]) -> None:
    """The series of each changing parameter tensor, named ``<stat>/param/<name>``."""
    pre, a = s.pre, s.adam
    if pre.grad_norm_known:
        out.add_many([f"grad_norm/param/{n}" for n in names], s.pre_sq.sqrt())
    out.add_many([f"param_norm/param/{n}" for n in names], s.after_sq.sqrt())
    out.add_many([f"update_ratio/param/{n}" for n in names], (s.upd_sq / s.before_sq).sqrt())
    if a is not None:
        out.add_many([f"update_rms/param/{n}" for n in names], (a.u_sq / a.count).sqrt())
        out.add_many([f"eps_headroom/param/{n}" for n in names], a.headroom)
    if pre.vu is not None and pre.had_v is not None:
        keep = [i for i, h in enumerate(pre.had_v) if h]
        vu = (pre.vu[0] / pre.vu[1]).sqrt()
        out.add_many([f"v_underestimation/param/{names[i]}" for i in keep], vu[keep])
