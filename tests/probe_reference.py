"""An independent float64 recomputation of every optimizer statistic, from the gradients as backward
left them, the parameters before and after ``optimizer.step()`` and ``torch.optim`` state.

It shares no code with the probe: the formulas are written out again from their definitions in the
README's catalog.
"""

from __future__ import annotations

import math

import torch

D = torch.float64


def _sq(t) -> float:
    return float(t.detach().to(D).pow(2).sum())


class Reference:
    """Use as: ``ref = Reference(opt, names)``; ``ref.before()`` after clipping and just before
    ``opt.step()``, with ``pre_clip`` (per-param gradient copies taken right after backward); then
    ``ref.after()`` returns {series name: value}."""

    def __init__(self, opt: torch.optim.Optimizer, names: dict[int, str] | None = None):
        self.opt = opt
        self.names = names or {}

    def before(self, pre_clip: dict[int, torch.Tensor]):
        opt = self.opt
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.changing = [p for p in self.params if p.grad is not None]
        self.group = {id(p): (gi, g) for gi, g in enumerate(opt.param_groups) for p in g["params"]}
        self.g_pre = {id(p): pre_clip[id(p)].to(D) for p in self.changing}
        self.g_post = {id(p): p.grad.detach().to(D).clone() for p in self.changing}
        self.theta0 = {id(p): p.detach().to(D).clone() for p in self.params}
        # v-underestimation: g^2 / max(v_hat_{t-1}, eps^2) with the state as it is before the step
        self.vu = {}
        for p in self.changing:
            st = opt.state.get(p, {})
            if isinstance(opt, torch.optim.Adam) and "exp_avg_sq" in st:
                _, g = self.group[id(p)]
                t = float(st["step"])
                vhat = st["exp_avg_sq"].to(D) / (1 - g["betas"][1] ** t)
                q = self.g_post[id(p)].pow(2) / vhat.clamp_min(g["eps"] ** 2)
                self.vu[id(p)] = (float(q.sum()), q.numel())

    def after(self) -> dict[str, float]:
        opt, ch = self.opt, self.changing
        out: dict[str, float] = {"lr": float(opt.param_groups[0]["lr"])}
        for gi, g in enumerate(opt.param_groups[1:], 1):
            out[f"lr/group/{gi}"] = float(g["lr"])
        if not ch:
            return out
        theta1 = {id(p): p.detach().to(D) for p in self.params}
        upd = {id(p): theta1[id(p)] - self.theta0[id(p)] for p in ch}
        still = sum(_sq(self.theta0[id(p)]) for p in self.params if p.grad is None)

        def agg(ps):
            r = {}
            r["grad_sq"] = sum(_sq(self.g_pre[id(p)]) for p in ps)
            r["post_sq"] = sum(_sq(self.g_post[id(p)]) for p in ps)
            r["upd_sq"] = sum(_sq(upd[id(p)]) for p in ps)
            r["before_sq"] = sum(_sq(self.theta0[id(p)]) for p in ps)
            r["after_sq"] = sum(_sq(theta1[id(p)]) for p in ps)
            r["dot"] = sum(float((upd[id(p)] * -self.g_post[id(p)]).sum()) for p in ps)
            return r

        a = agg(ch)
        out["grad_norm"] = math.sqrt(a["grad_sq"])
        out["grad_norm_clipped"] = math.sqrt(a["post_sq"])
        out["grad_nonfinite_tensors"] = float(sum(not torch.isfinite(self.g_pre[id(p)]).all() for p in ch))
        out["param_norm"] = math.sqrt(a["after_sq"] + still)
        out["update_norm"] = math.sqrt(a["upd_sq"])
        out["update_ratio"] = math.sqrt(a["upd_sq"]) / math.sqrt(a["before_sq"] + still)
        out["update_cosine"] = a["dot"] / math.sqrt(a["upd_sq"] * a["post_sq"])
        adam = isinstance(opt, torch.optim.Adam)
        u, sqrt_vhat = {}, {}
        if adam:
            for p in ch:
                st, (_, g) = opt.state[p], self.group[id(p)]
                t = float(st["step"])
                b1, b2 = g["betas"]
                v = st["max_exp_avg_sq"] if g.get("amsgrad") else st["exp_avg_sq"]
                sqrt_vhat[id(p)] = (v.to(D) / (1 - b2**t)).sqrt()
                u[id(p)] = (st["exp_avg"].to(D) / (1 - b1**t)) / (sqrt_vhat[id(p)] + g["eps"])
            self._adam(out, "", ch, u, sqrt_vhat)
        else:
            kinds: dict[str, list] = {}
            for p in ch:
                for k, v in opt.state[p].items():
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0 and k != "step":
                        kinds.setdefault(k, []).append(v)
            for k, vs in kinds.items():
                name = {"exp_avg": "exp_avg_norm", "exp_avg_sq": "exp_avg_sq_norm"}.get(k, f"state_norm/{k}")
                out[name] = math.sqrt(sum(_sq(v) for v in vs))
        if any(id(p) in self.vu for p in ch):
            s, n = map(sum, zip(*(self.vu[id(p)] for p in ch if id(p) in self.vu)))
            out["v_underestimation"] = math.sqrt(s / n)
        groups = sorted({self.group[id(p)][0] for p in ch})
        if len(groups) > 1:
            for gi in groups:
                ps = [p for p in ch if self.group[id(p)][0] == gi]
                r, sfx = agg(ps), f"/group/{gi}"
                out["grad_norm" + sfx] = math.sqrt(r["grad_sq"])
                out["update_ratio" + sfx] = math.sqrt(r["upd_sq"] / r["before_sq"])
                out["update_cosine" + sfx] = r["dot"] / math.sqrt(r["upd_sq"] * r["post_sq"])
                if adam:
                    self._adam(out, sfx, ps, u, sqrt_vhat)
                if any(id(p) in self.vu for p in ps):
                    s, n = map(sum, zip(*(self.vu[id(p)] for p in ps if id(p) in self.vu)))
                    out["v_underestimation" + sfx] = math.sqrt(s / n)
        for p in ch:
            name = self.names.get(id(p)) or "{}.{}".format(*self._index(p))
            out[f"grad_norm/param/{name}"] = math.sqrt(_sq(self.g_pre[id(p)]))
            out[f"param_norm/param/{name}"] = math.sqrt(_sq(theta1[id(p)]))
            out[f"update_ratio/param/{name}"] = math.sqrt(_sq(upd[id(p)]) / _sq(self.theta0[id(p)]))
            if adam:
                out[f"update_rms/param/{name}"] = math.sqrt(float(u[id(p)].pow(2).mean()))
                out[f"eps_headroom/param/{name}"] = _log10(
                    float(_strided(sqrt_vhat[id(p)], 1024).median()) / self.group[id(p)][1]["eps"]
                )
            if id(p) in self.vu:
                out[f"v_underestimation/param/{name}"] = math.sqrt(self.vu[id(p)][0] / self.vu[id(p)][1])
        return out

    def _index(self, p):
        for gi, g in enumerate(self.opt.param_groups):
            for pi, q in enumerate(g["params"]):
                if q is p:
                    return gi, pi

    def _adam(self, out, sfx, ps, u, sqrt_vhat):
        st0 = self.opt.state[ps[0]]
        n = sum(u[id(p)].numel() for p in ps)
        out["exp_avg_norm" + sfx] = math.sqrt(sum(_sq(self.opt.state[p]["exp_avg"]) for p in ps))
        out["exp_avg_sq_norm" + sfx] = math.sqrt(sum(_sq(self.opt.state[p]["exp_avg_sq"]) for p in ps))
        out["update_rms" + sfx] = math.sqrt(sum(float(u[id(p)].pow(2).sum()) for p in ps) / n)
        out["update_bimodality" + sfx] = sum(int((u[id(p)].abs() > 0.9).sum()) for p in ps) / n
        # the documented estimator: one uniform stride over all coordinates of the optimizer
        stride = max(1, math.ceil(sum(p.numel() for p in self.changing) / 16384))
        sample = torch.cat([sqrt_vhat[id(p)].reshape(-1)[::stride] / self.group[id(p)][1]["eps"] for p in ps])
        out["eps_headroom" + sfx] = _log10(float(sample.median()))
        if not sfx:
            _, g = self.group[id(ps[0])]
            t = float(st0["step"])
            out["bias_correction1"] = 1 - g["betas"][0] ** t
            out["bias_correction2"] = 1 - g["betas"][1] ** t


def _log10(x: float) -> float:
    return -math.inf if x == 0 else math.log10(x)  # an all-zero second moment has no headroom at all


def _strided(t, cap):
    """The documented per-tensor sample: every coordinate up to ``cap``, else ``cap`` of them at
    stride floor(n / cap) from the first."""
    flat = t.reshape(-1)
    n = flat.numel()
    return flat if n <= cap else flat[:: n // cap][:cap]
