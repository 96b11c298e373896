"""How the probe walks the optimizer's memory: in cache-sized blocks, so each sampled step reads
every parameter, gradient and moment from main memory about once.

Eager PyTorch runs one kernel per operation, and each kernel streams its whole input through
memory: the dozen elementwise operations behind Adam's statistics would read a large tensor a
dozen times. Cutting every large tensor into chunks that stay in the last-level cache, and running
all the operations of one statistic chunk by chunk, leaves one read from memory per input; the
rest hits the cache. Small tensors (biases, norms) cost more in per-operation overhead than in
bytes, so they are packed together (``torch.cat``) and reduced per tensor with a segmented sum.

Per-tensor sums come out of :class:`Sums` in float64. Chunk partials are float32 dot products over
at most ``chunk`` coordinates (a float32 dot over 256K coordinates stays within a few 1e-7 of a
float64 sum; over 3M, 1e-5); packed partials are summed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import torch

F64 = torch.float64
F32 = torch.float32


@dataclass(frozen=True)
class Layout:
    chunk: int  # coordinates per block of a large tensor (and the most a pack holds)
    pack_below: int  # tensors with fewer coordinates are packed with their neighbours


def layout_for(device: torch.device) -> Layout:
    # CPU: 256K float32 coordinates = 1 MiB per buffer, a handful of buffers per block fits
    # in L2/L3; accelerators stream from HBM either way, so larger blocks mean fewer launches.
    return Layout(1 << 18, 1 << 14) if device.type == "cpu" else Layout(1 << 24, 1 << 14)


class Block:
    """A run of coordinates: one chunk ``[lo, hi)`` of one large tensor, or several small
    tensors packed end to end. ``members`` are indices into the tensor list it was planned on."""

    __slots__ = ("members", "lo", "hi", "lengths", "n", "device", "dtype", "_lens")

    def __init__(
        self, members: list[int], lo: int, hi: int, lengths: list[int] | None, device: torch.device, dtype: torch.dtype
    ):
        self.members, self.lo, self.hi, self.lengths = members, lo, hi, lengths
        self.n = hi - lo if lengths is None else sum(lengths)
        self.device = device
        # a pack is stored as float32 (or wider, for float64 tensors); a chunk keeps its own dtype
        self.dtype = dtype if lengths is None else torch.promote_types(dtype, F32)
        self._lens: dict = {}

    @property
    def packed(self) -> bool:
        return self.lengths is not None

    def _pack_lengths(self) -> list[int]:
        """The members' lengths of a pack (a chunk has none: asking is a bug)."""
        if self.lengths is None:
            raise TypeError("optiscope: a chunk of one tensor has no member lengths")
        return self.lengths

    def read(self, flats: list[torch.Tensor], scratch: Scratch, name: str) -> torch.Tensor:
        """This block's coordinates of ``flats`` (one flat tensor per planned tensor): a view of
        a chunk (in the tensor's dtype), or the packed members copied into work buffer ``name``."""
        if self.lengths is None:
            return flats[self.members[0]][self.lo : self.hi]
        out = scratch.get(name, self.n, self.device, self.dtype)
        torch.cat([flats[i] for i in self.members], out=out)
        return out

    def reduce(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Per-member sum of x*y (x*x without y), shape (len(members),)."""
        if self.lengths is None:
            return torch.dot(x, x if y is None else y).reshape(1)
        x = x.to(F64)
        prod = x * x if y is None else x * y.to(F64)
        return torch.segment_reduce(prod, "sum", lengths=self._lengths(prod.device))

    def count(self, mask: torch.Tensor) -> torch.Tensor:
        """Per-member number of ones in a 0/1 float block (at most 2^24 per chunk: exact)."""
        if self.lengths is None:
            return mask.sum().reshape(1)
        return torch.segment_reduce(mask.to(F64), "sum", lengths=self._lengths(mask.device))

    def spread(self, per_member: list):
        """Per-member scalars (Python numbers or 0-d tensors) as a factor for this block: the
        scalar itself for a chunk, one value per coordinate for a pack."""
        if self.lengths is None:
            return per_member[self.members[0]]
        return torch.repeat_interleave(self._member_values(per_member, F64), self._lengths(self.device))

    def width(self) -> int:
        """For a pack: the largest row width (64 to 4096) that divides every member's length, so
        that the pack is a (rows, width) matrix whose rows each belong to one member; else 0."""
        if self.lengths is None or len(self.lengths) < 2:
            return 0
        w = math.gcd(*self.lengths)
        while w > 4096 and w % 2 == 0:
            w //= 2
        return w if 64 <= w <= 4096 and self.n // w >= 2 else 0

    def row_owner(self, device) -> torch.Tensor:
        """Per row of the (rows, width) view: the position of its member in ``members``."""
        key = ("rows", device)
        got = self._lens.get(key)
        if got is None:
            w, lengths = self.width(), self._pack_lengths()
            got = self._lens[key] = torch.repeat_interleave(
                torch.arange(len(lengths), device=device), torch.tensor([n // w for n in lengths], device=device)
            )
        return got

    def per_row(self, per_member: list) -> torch.Tensor:
        """Per-member scalars (numbers or 0-d tensors) as one float32 value per row."""
        return self._member_values(per_member, F32)[self.row_owner(self.device)]

    def _member_values(self, per_member: list, dtype: torch.dtype) -> torch.Tensor:
        """This pack's members' scalars (Python numbers or 0-d tensors) as one vector."""
        vals = [per_member[i] for i in self.members]
        if all(isinstance(v, float) for v in vals):
            return torch.tensor(vals, dtype=dtype, device=self.device)
        return torch.stack([torch.as_tensor(v).to(self.device, dtype).reshape(()) for v in vals])

    def per_member(self, row_sums: torch.Tensor) -> torch.Tensor:
        """(terms, rows) row sums as (terms, members) sums."""
        out = torch.zeros(row_sums.shape[0], len(self.members), dtype=row_sums.dtype, device=row_sums.device)
        return out.index_add_(1, self.row_owner(row_sums.device), row_sums)

    def _lengths(self, device) -> torch.Tensor:
        got = self._lens.get(device)
        if got is None:  # kept: a plan serves every sampled step of a run (Scratch.plan)
            got = self._lens[device] = torch.tensor(self.lengths, device=device)
        return got


def plan(tensors: list[torch.Tensor], layout: Layout | None = None) -> list[Block]:
    """Blocks covering every coordinate of these tensors, in order. A pack holds tensors of one
    device and dtype only; ``layout`` overrides the device's default."""
    blocks: list[Block] = []
    pack: list[int] = []
    size = 0

    def close_pack():
        nonlocal size
        if pack:
            first = tensors[pack[0]]
            blocks.append(Block(list(pack), 0, 0, [tensors[i].numel() for i in pack], first.device, first.dtype))
            pack.clear()
            size = 0

    for i, t in enumerate(tensors):
        lay = layout or layout_for(t.device)
        n = t.numel()
        if n < lay.pack_below:
            if pack and (
                size + n > lay.chunk or tensors[pack[0]].device != t.device or tensors[pack[0]].dtype != t.dtype
            ):
                close_pack()
            pack.append(i)
            size += n
            continue
        for lo in range(0, n, lay.chunk):
            blocks.append(Block([i], lo, min(n, lo + lay.chunk), None, t.device, t.dtype))
    close_pack()
    return blocks


def sq_sum(t: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
    """sum(t^2) of one tensor as a float64 0-d tensor on its device, chunk by chunk (a float32
    norm of a 3M-coordinate tensor is off by about 1e-4; chunked dots by a few 1e-7)."""
    flat = t.detach().reshape(-1)
    if flat.dtype != F32:
        flat = flat.float()
    chunk = (layout or layout_for(t.device)).chunk
    if flat.numel() <= chunk:
        return torch.dot(flat, flat).to(F64)
    return torch.stack([torch.dot(c, c) for c in flat.split(chunk)]).to(F64).sum()


class Sums:
    """Per-tensor float64 totals of block partials, gathered with one index_add per statistic."""

    def __init__(self, n: int, device: torch.device):
        self.n, self.device = n, device
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._owners: dict[str, list[int]] = {}

    def add(self, key: str, block: Block, values: torch.Tensor) -> None:
        self._parts.setdefault(key, []).append(values)
        self._owners.setdefault(key, []).extend(block.members)

    def total(self, key: str) -> torch.Tensor:
        out = torch.zeros(self.n, dtype=F64, device=self.device)
        parts = self._parts.get(key)
        if parts:
            idx = torch.tensor(self._owners[key], device=self.device)
            if all(p.device == self.device for p in parts):
                values = torch.cat(parts).to(F64)  # one conversion, not one per part
            else:  # a model spread over several devices
                values = torch.cat([p.to(device=self.device, dtype=F64) for p in parts])
            out.index_add_(0, idx, values)
        return out


class Scratch:
    """Work buffers kept between sampled steps, one set per device.

    Buffers are block-sized (a few MiB on CPU), not tensor-sized. On CPU the snapshot of the
    parameters is kept too: a fresh one would cost a page fault per 4 KiB on every sampled step;
    on accelerators the caching allocator reuses the memory anyway and holding it would cost one
    parameter copy of device memory for the whole run.
    """

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._plans: dict[tuple, list[Block]] = {}

    def get(self, name: Hashable, n: int, device: torch.device, dtype: torch.dtype = F32) -> torch.Tensor:
        key = (name, device, dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self._bufs[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]

    def plan(self, tensors: list[torch.Tensor]) -> list[Block]:
        """``plan(tensors)``, kept for the next sampled step: it depends only on the tensors'
        sizes, dtypes and devices, which rarely change during a run."""
        key = tuple((t.numel(), t.dtype, t.device) for t in tensors)
        got = self._plans.get(key)
        if got is None:
            if len(self._plans) > 8:  # parameters keep changing (frozen and unfrozen): start over
                self._plans.clear()
            got = self._plans[key] = plan(tensors)
        return got

    def snapshot(self, key, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Storage for a pre-step copy (of a pack, or of a whole large tensor): kept between
        sampled steps on CPU, fresh from the caching allocator elsewhere."""
        if device.type != "cpu":
            return torch.empty(n, dtype=dtype, device=device)
        return self.get(("snap", key), n, device, dtype)

    def f32(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x as float32: itself, or a converted copy in a work buffer."""
        if x.dtype == F32:
            return x
        return self.get(name, x.numel(), x.device).copy_(x)
