"""Activation headroom: how close a module's output comes to the largest value of its dtype.

Forward hooks on the watched modules record max |output| during the forward passes of a sampled
optimizer step (a running max over micro-batches under gradient accumulation), as device tensors.
Headroom in bits is log2(finfo(dtype).max / max|output|): 0 means the output reached the ceiling,
-inf that it overflowed to inf, NaN that it held NaN. Forward passes without autograd
(evaluation) and steps that are not sampled cost one Python call per module and nothing else.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

_BAD = re.compile(r"[^A-Za-z0-9_.:/\-]")


def default_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every leaf module (no children): matmuls, convolutions, norms, and parameter-free modules
    such as an attention-score or activation buffer, where low-precision overflow happens."""
    return [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]


class ActivationProbe:
    def __init__(self, model: torch.nn.Module, is_sampling: Callable[[], bool],
                 modules: Iterable[str] | None = None):
        named = dict(model.named_modules())
        if modules is None:
            chosen = default_modules(model)
        else:
            missing = [n for n in modules if n not in named]
            if missing:
                raise ValueError(f"optiscope: no such modules in the model: {missing[:5]}")
            chosen = [(n, named[n]) for n in modules]
        self.is_sampling = is_sampling
        self._max: dict[str, torch.Tensor] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self._handles = [m.register_forward_hook(self._hook(_BAD.sub("_", n))) for n, m in chosen]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(module, args, output):
            if not torch.is_grad_enabled() or not self.is_sampling():
                return
            tensors = [t for t in (output if isinstance(output, (tuple, list)) else (output,))
                       if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
            if not tensors:
                return
            with torch.no_grad():  # amax propagates NaN, so a NaN output stays visible
                m = torch.stack([t.detach().abs().amax().float() for t in tensors]).amax()
            prev = self._max.get(name)
            self._max[name] = m if prev is None else torch.maximum(prev, m)
            self._dtype[name] = tensors[0].dtype
        return hook

    def collect(self) -> list[tuple[str, torch.Tensor]]:
        """The sampled step's values (then forgets them): per module and the tightest overall."""
        out: list[tuple[str, torch.Tensor]] = []
        bits = []
        for name, m in self._max.items():
            ceiling = torch.finfo(self._dtype[name]).max
            b = torch.log2(ceiling / m.double())
            out.append((f"act_absmax/module/{name}", m))
            out.append((f"act_headroom_bits/module/{name}", b))
            bits.append(b)
        if bits:
            # min propagates NaN: a NaN activation anywhere is no headroom at all
            out.append(("act_headroom_bits", torch.stack([b.to(bits[0].device) for b in bits]).min()))
        self._max.clear()
        return out
