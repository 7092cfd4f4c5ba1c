"""SyncFreeLBFGS (utils/apps/track/lbfgs.py): its compact-form direction against the two-loop recursion it replaced,
and the number of tensor ops per step (fixed, independent of the history length)."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from utils.apps.track.lbfgs import SyncFreeLBFGS


class TwoLoopLBFGS:
    """Reference: the two-loop recursion SyncFreeLBFGS used before (utils/apps/track/fit.py until 2026-12-07h), with
    the same first step, curvature test, gamma and step cap; a pair without positive curvature is kept with rho 0."""

    def __init__(self, var: Tensor, history: int, max_step: float) -> None:
        self.var, self.history, self.max_step = var, history, max_step
        self.s: list[Tensor] = []
        self.y: list[Tensor] = []
        self.rho: list[Tensor] = []
        self.gamma = torch.ones((), device=var.device, dtype=var.dtype)
        self.prev: tuple[Tensor, Tensor] | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.var.grad = None

    @torch.no_grad()
    def step(self) -> None:
        x, g = self.var.detach().flatten().clone(), self.var.grad.detach().flatten().clone()
        if self.prev is not None:
            s, y = x - self.prev[0], g - self.prev[1]
            sy, yy = (s * y).sum(), (y * y).sum()
            ok = sy > 1e-10 * yy.clamp_min(1e-30).sqrt() * s.norm()
            self.s.append(s)
            self.y.append(y)
            self.rho.append(torch.where(ok, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy)))
            self.gamma = torch.where(ok, sy / yy.clamp_min(1e-30), self.gamma)
            if len(self.s) > self.history:
                self.s.pop(0), self.y.pop(0), self.rho.pop(0)
            q, alphas = g.clone(), []
            for s_i, y_i, r_i in zip(reversed(self.s), reversed(self.y), reversed(self.rho)):
                a_i = r_i * (s_i * q).sum()
                q -= a_i * y_i
                alphas.append(a_i)
            d = q * self.gamma
            for s_i, y_i, r_i, a_i in zip(self.s, self.y, self.rho, reversed(alphas)):
                d += s_i * (a_i - r_i * (y_i * d).sum())
            d = -d
        elif self.max_step > 0:
            d = -g * (self.max_step / g.abs().max().clamp_min(1e-30))
        else:
            d = -g * (1.0 / g.abs().sum().clamp_min(1.0))
        if self.max_step > 0:
            d = d * (self.max_step / d.abs().max().clamp_min(self.max_step))
        self.prev = (x, g)
        self.var.add_(d.view_as(self.var))


def test_sync_free_lbfgs_on_a_quadratic():
    """SyncFreeLBFGS (fit.optimizer lbfgs): on an ill-conditioned quadratic it converges in a few dozen steps where
    Adam is far off; fit.lbfgs_max_step caps every step's largest coordinate change."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(0, 2, 30, dtype=torch.float64)) @ q.T  # condition number 100
    b = torch.randn(30, generator=gen, dtype=torch.float64)
    x_star = torch.linalg.solve(a, b)

    def run(make, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = torch.zeros(30, dtype=torch.float64, requires_grad=True)
        opt, path = make(x), [x.detach().clone()]
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            (0.5 * x @ a @ x - b @ x).backward()
            opt.step()
            path.append(x.detach().clone())
        return x.detach(), path

    err = lambda x: float((x - x_star).norm() / x_star.norm())  # noqa: E731
    x_lbfgs, _ = run(lambda x: SyncFreeLBFGS(x, 10, 0.0), 40)
    x_adam, _ = run(lambda x: torch.optim.Adam([x], lr=0.1), 40)
    assert err(x_lbfgs) < 2e-3 and err(x_adam) > 20 * err(x_lbfgs), (err(x_lbfgs), err(x_adam))
    _, path = run(lambda x: SyncFreeLBFGS(x, 10, 0.01), 10)
    moves = [float((p1 - p0).abs().max()) for p0, p1 in zip(path, path[1:])]
    assert max(moves) <= 0.01 + 1e-12 and moves[0] == pytest.approx(0.01), moves


def random_quadratic(n: int, seed: int, indefinite: bool = False) -> tuple[Tensor, Tensor]:
    """(n, n) symmetric matrix A (condition number 100; with ``indefinite`` a few negative eigenvalues, so some
    steps have s.y <= 0) and (n,) b of f(x) = x.A.x / 2 - b.x."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, 2, n, dtype=torch.float64)
    if indefinite:
        eig[: n // 4] *= -1
    return q @ torch.diag(eig) @ q.T, torch.randn(n, generator=gen, dtype=torch.float64)


def directions(make, a: Tensor, b: Tensor, xs: list[Tensor]) -> list[Tensor]:
    """The steps an optimiser takes when fed the iterates ``xs`` in turn (so both optimisers see the same history
    whatever their rounding): (len(xs),) list of (n,) steps."""
    x = xs[0].clone().requires_grad_(True)
    opt, out = make(x), []
    for xi in xs:
        with torch.no_grad():
            x.copy_(xi)
        opt.zero_grad()
        (0.5 * x @ a @ x - b @ x).backward()
        opt.step()
        out.append(x.detach() - xi)
    return out


@pytest.mark.parametrize("history,max_step,indefinite", [(3, 0.0, False), (5, 0.0, True), (4, 0.05, True),
                                                          (10, 0.0, False)])
def test_compact_direction_matches_two_loop(history: int, max_step: float, indefinite: bool):
    """Over more steps than the history holds (the ring buffer wraps), on random quadratics, the compact form's step
    equals the two-loop recursion's to 1e-5 relative, including steps after a pair with non-positive curvature
    (indefinite quadratic: masked in the compact form, rho 0 in the two-loop recursion) and with the step cap."""
    n, steps = 20, 3 * history + 4
    a, b = random_quadratic(n, history, indefinite)
    # the iterates: the reference's own path, so each pair is one a real run produces
    x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    ref, xs = TwoLoopLBFGS(x, history, max_step), []
    for _ in range(steps):
        xs.append(x.detach().clone())
        ref.zero_grad()
        (0.5 * x @ a @ x - b @ x).backward()
        ref.step()
    want = directions(lambda v: TwoLoopLBFGS(v, history, max_step), a, b, xs)
    got = directions(lambda v: SyncFreeLBFGS(v, history, max_step), a, b, xs)
    for k, (w, g) in enumerate(zip(want, got)):
        assert float((g - w).norm() / w.norm()) < 1e-5, (k, float((g - w).norm() / w.norm()))
    # the runs did exercise what they test: wrapped history and (indefinite) a masked pair
    s = torch.stack(xs).diff(dim=0)
    y = s @ a
    curv = (s * y).sum(1)
    assert steps - 1 > history and (bool((curv <= 0).any()) == indefinite), curv


def test_masked_pair_is_skipped_exactly():
    """A pair without positive curvature changes nothing: after a step along a negative-curvature direction the
    compact form's step is the one computed without that pair (a step that leaves and returns to the same point
    would be a zero pair; here the quadratic's sign makes s.y < 0), and gamma keeps the last good pair's value."""
    n = 12
    a, b = random_quadratic(n, 7, indefinite=True)
    evals, evecs = torch.linalg.eigh(a)
    x0 = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    xs = [x0, x0 + 0.1 * evecs[:, -1], x0 + 0.1 * evecs[:, -1] + 0.1 * evecs[:, 0], x0 + 0.2 * evecs[:, 1]]
    assert float(evals[0]) < 0 < float(evals[-1])
    want = directions(lambda v: TwoLoopLBFGS(v, 5, 0.0), a, b, xs)
    got = directions(lambda v: SyncFreeLBFGS(v, 5, 0.0), a, b, xs)
    for w, g in zip(want, got):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12)
    x = xs[0].clone().requires_grad_(True)
    opt = SyncFreeLBFGS(x, 5, 0.0)
    for xi in xs[:3]:
        with torch.no_grad():
            x.copy_(xi)
        opt.zero_grad()
        (0.5 * x @ a @ x - b @ x).backward()
        opt.step()
    curv = (opt.pairs[0] * opt.pairs[1]).sum(1)  # the second pair (along evecs[:, 0]) has s.y < 0: masked
    assert float(curv[0]) > 0 > float(curv[1]) and curv[2:].abs().max() == 0, curv
    assert float(opt.gamma) == pytest.approx(1 / float(evals[-1]))


# aten ops that only make views or allocate (no kernel on a GPU): left out of the "compute" count
METADATA_OPS = {"aten::" + k for k in (
    "as_strided", "as_strided_", "select", "slice", "narrow", "view", "view_as", "reshape", "_reshape_alias",
    "transpose", "transpose_", "t", "mT", "numpy_T", "permute", "unsqueeze", "squeeze", "expand", "diagonal",
    "unbind", "detach", "alias", "resolve_conj", "resolve_neg", "empty", "empty_like", "empty_strided", "resize_",
    "to", "lift_fresh")}


def aten_ops_per_step(make, n: int, warmup: int, steps: int) -> tuple[float, float]:
    """Mean number of aten op calls in one optimiser step after ``warmup`` steps on a random quadratic in ``n``
    dimensions (float32, CPU): (all of them, nested ones included, as torch.profiler's key_averages counts them;
    those that compute, i.e. not in METADATA_OPS)."""
    a, b = random_quadratic(n, 0)
    a, b = a.float(), b.float()
    x = torch.zeros(n, requires_grad=True)
    opt = make(x)

    def one() -> None:
        opt.zero_grad()
        (0.5 * x @ a @ x - b @ x).backward()

    for _ in range(warmup):
        one()
        opt.step()
    total, compute = 0, 0
    for _ in range(steps):
        one()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
        ev = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        total += sum(e.count for e in ev)
        compute += sum(e.count for e in ev if e.key not in METADATA_OPS)
    return total / steps, compute / steps


def test_ops_per_step_fixed_and_few():
    """The compact form's step is a fixed number of ops (the same for history 10 and 20; < 60 that compute, against
    the two-loop recursion's 178 at history 10), where the two-loop recursion's grows with the history."""
    new = {m: aten_ops_per_step(lambda v, m=m: SyncFreeLBFGS(v, m, 0.5), 64, m + 3, 3) for m in (10, 20)}
    old = {m: aten_ops_per_step(lambda v, m=m: TwoLoopLBFGS(v, m, 0.5), 64, m + 3, 3) for m in (10, 20)}
    assert new[10][1] < 60 and new[10] == new[20], new
    assert old[10][0] > 200 and old[20][0] > 1.5 * old[10][0] and old[10][1] > 2 * new[10][1], old
    assert new[10][0] < old[10][0], (new, old)  # (all ops, views included: 182 against 220)
