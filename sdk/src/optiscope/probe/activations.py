"""Activation headroom: how close a module's output comes to the largest value of its dtype.

Forward hooks on the watched modules record max |output| during the forward passes of a sampled
optimizer step (a running max over micro-batches under gradient accumulation), as device tensors.
Headroom in bits is log2(finfo(dtype).max / max|output|): 0 means the output reached the ceiling,
-inf that it overflowed to inf, NaN that it held NaN. Forward passes without autograd
(evaluation) and steps that are not sampled cost one Python call per module and nothing else,
except for outputs of a narrow-range dtype (float16, the float8 types: a ceiling below 1e10),
where overflow is a live risk: with ``vitals`` those are measured on every step, and the step's
tightest headroom among them is the every-step ``act_headroom_bits`` that an overflow forecast
needs (a sampled step's value covers every module).
A float32 CPU output is read by the native kernel when it is built (one pass while the output is
still in cache, about twice as fast as ``aminmax``); any other by ``torch.aminmax``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable

import torch

from .contributor import Contribution, ContributorBase, HostValue
from .native import Native

log = logging.getLogger("optiscope")
_BAD = re.compile(r"[^A-Za-z0-9_.:/\-]")
#: Floating dtypes whose largest value is below 1e10, where activations do overflow in practice.
NARROW = frozenset(
    d
    for d in (
        torch.float16,
        *(getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")),
    )
    if d is not None
)


def default_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every leaf module (no children): matmuls, convolutions, norms, and parameter-free modules
    such as an attention-score or activation buffer, where low-precision overflow happens."""
    return [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]


class ActivationProbe(ContributorBase):
    def __init__(
        self,
        model: torch.nn.Module,
        is_sampling: Callable[[], bool],
        modules: Iterable[str] | None = None,
        native: Native | None = None,
        vitals: bool = True,
    ):
        named = dict(model.named_modules())
        if modules is None:
            chosen = default_modules(model)
        else:
            missing = [n for n in modules if n not in named]
            if missing:
                raise ValueError(f"optiscope: no such modules in the model: {missing[:5]}")
            chosen = [(n, named[n]) for n in modules]
        self.is_sampling = is_sampling
        self.native = native
        self.vitals = vitals
        self._broken = False
        # narrow-range outputs seen on a step that is not sampled: (dtype, max |output| on the device)
        self._vital: list[tuple[torch.dtype, torch.Tensor]] = []
        # per output seen on the sampled step: (module name, dtype, (min, max) device tensors, or
        # max |t| as a number from the native kernel); everything else waits for collect(), so
        # that a hook costs one reduction and no other operator
        self._seen: list[tuple[str, torch.dtype, tuple | float]] = []
        self._handles = [m.register_forward_hook(self._hook(_BAD.sub("_", n))) for n, m in chosen]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(module, args, output):
            if not torch.is_grad_enabled() or self._broken:
                return
            sampling = self.is_sampling()
            if not sampling and not self.vitals:
                return
            try:  # inside the user's forward(): never let it raise there
                self._measure(name, output, sampling)
            except Exception:
                self._broken = True
                log.warning(
                    "optiscope: activation headroom disabled after an error in its forward hook; training continues",
                    exc_info=True,
                )

        return hook

    def _measure(self, name: str, output, sampling: bool) -> None:
        """One forward pass's outputs: every floating output on a sampled step, the narrow-range
        ones on other steps (vitals)."""
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if not sampling:
                if isinstance(t, torch.Tensor) and t.dtype in NARROW and t.numel():
                    # max |t| in one reduction, in the output's own dtype (inf stays inf, NaN NaN)
                    self._vital.append((t.dtype, torch.linalg.vector_norm(t.detach(), ord=math.inf)))
                continue
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                # usable first: an accelerator's outputs never start a build that cannot serve
                # them; and never while torch.compile traces the hook (no real buffer to read)
                if (
                    self.native is not None
                    and Native.usable([t])
                    and not torch.compiler.is_compiling()
                    and self.native.ready()
                ):  # a CPU buffer: a host number, no sync
                    self._seen.append((name, t.dtype, Native.absmax(t)))
                    continue
                # max |t| as min and max in one fused reduction: no tensor-sized temporary
                # as with t.abs() (about 3x faster on CPU), and both propagate NaN
                self._seen.append((name, t.dtype, torch.aminmax(t.detach())))

    def host_values(self) -> dict[str, HostValue]:
        """Every step that is not sampled: the tightest headroom among narrow-range outputs, as a
        0-d device tensor (read on the exporter thread). The ceilings enter as Python numbers,
        never as a tensor built from a list: that would be a host-to-device copy, a sync."""
        vital, self._vital = self._vital, []
        if not vital:
            return {}
        device = vital[0][1].device
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for dtype, m in vital:
            by_dtype.setdefault(dtype, []).append(m.to(device))
        bits = []
        for dtype, maxima in by_dtype.items():
            # stacked in their own dtype, then one conversion: a kernel per output would cost more
            # than the reductions themselves
            absmax = torch.stack(maxima).max().to(torch.float64)  # max propagates NaN
            bits.append(math.log2(torch.finfo(dtype).max) - torch.log2(absmax))
        return {"act_headroom_bits": bits[0] if len(bits) == 1 else torch.stack(bits).min()}

    def collect(self) -> list[Contribution]:
        """The sampled step's values (then forgets them): per module (a list of names with a
        vector) and the tightest overall, assembled with a handful of operators whatever the
        number of modules."""
        seen, self._seen = self._seen, []
        if not seen:
            return []
        device = next((mm[1].device for _, _, mm in seen if isinstance(mm, tuple)), torch.device("cpu"))
        # float64: a float64 output's largest value may not fit a float32
        absmax = torch.tensor(
            [math.nan if isinstance(mm, tuple) else mm for _, _, mm in seen], dtype=torch.float64, device=device
        )
        minmax = [(i, mm) for i, (_, _, mm) in enumerate(seen) if isinstance(mm, tuple)]
        pairs = [i for i, _ in minmax]
        if pairs:
            lo = torch.stack([mm[0].to(device, torch.float64) for _, mm in minmax])
            hi = torch.stack([mm[1].to(device, torch.float64) for _, mm in minmax])
            absmax[pairs] = torch.maximum(hi, -lo)  # maximum propagates NaN
        names: list[str] = []
        first: dict[str, int] = {}
        dtypes: list[torch.dtype] = []
        for name, dtype, _ in seen:  # a module called several times: its outputs' largest value
            if name not in first:
                first[name] = len(names)
                names.append(name)
                dtypes.append(dtype)
        if len(names) < len(seen):
            idx = torch.tensor([first[n] for n, _, _ in seen], device=device)
            absmax = torch.stack([absmax[idx == i].amax() for i in range(len(names))])
        ceiling = torch.tensor([torch.finfo(d).max for d in dtypes], dtype=torch.float64, device=device)
        bits = torch.log2(ceiling / absmax)
        # min propagates NaN: a NaN activation anywhere is no headroom at all
        return [
            ([f"act_absmax/module/{n}" for n in names], absmax),
            ([f"act_headroom_bits/module/{n}" for n in names], bits),
            ("act_headroom_bits", bits.min()),
        ]
