"""SyncFreeLBFGS: L-BFGS with unit steps and no host synchronisation, for the single-image fit's code and colour
stages (``fit.optimizer lbfgs``, ``fit.colour_solver lbfgs``; utils/apps/track/fit.py).

The direction is computed from the compact representation of the L-BFGS inverse Hessian (Byrd, Nocedal & Schnabel
1994) instead of the two-loop recursion: the two-loop recursion costs a dot product and an axpy per curvature pair
and loop (~220 small ops per step with 10 pairs), and on a GPU the fit's iteration is launch-bound (one H100, 46,987
Gaussians: 5.9 ms per L-BFGS code iteration against Adam's 4.4 ms). The compact form is a fixed number of tensor ops
whatever the history length: the new pair's row and column of the stored pairs' Gram matrix (O(m n), like the
two-loop recursion's work), one matrix-vector product with the gradient, two (m, m) triangular solves and one
product back to n dimensions.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class SyncFreeLBFGS:
    """L-BFGS on one tensor (the style w, the code z or the colour residual) with a unit step and no host
    synchronisation: the code stage is a smooth problem in a few hundred dimensions, where curvature pairs from the
    last ``history`` steps converge in far fewer iterations than Adam's per-coordinate steps (each iteration is a
    network forward and backward, so iterations are the cost).  Unlike torch.optim.LBFGS nothing reads a value back
    to the host (no line search, no tolerance tests; a curvature pair with s.y <= 0 is kept but masked out of the
    direction, as a zero weight rho in the two-loop recursion would), so the loop still runs asynchronously on a GPU.
    The first step is -g scaled to move the largest coordinate by ``max_step`` (torch's LBFGS: min(1, 1 / |g|_1));
    every step is capped at ``max_step`` per coordinate (0: only the first step is scaled, to 1 / |g|_1; uncapped
    unit steps diverged on the tests' small model, where a near-flat direction gave a huge s.y / y.y).  Same
    interface as the Adam it replaces: backward, then step(); zero_grad().

    State: ``pairs`` (2, m, n) ring buffer of the steps s = x_k+1 - x_k (``pairs[0]``) and gradient changes
    y = g_k+1 - g_k (``pairs[1]``), m = ``history``, n = var.numel() (zeros in unused slots); the number of steps
    taken is a host int, so the ring position never needs a device value.
    """

    def __init__(self, var: Tensor, history: int, max_step: float) -> None:
        if history < 1:
            raise ValueError(f"SyncFreeLBFGS needs history >= 1, got {history}")
        self.var, self.history, self.max_step = var, history, max_step
        n, kw = var.numel(), {"device": var.device, "dtype": var.dtype}
        self.pairs = torch.zeros(2, history, n, **kw)  # [s; y] per slot, zeros where unused
        self.gamma = torch.ones((), **kw)  # initial Hessian inverse scale s.y / y.y of the newest good pair
        self.prev_x, self.prev_g = torch.zeros(n, **kw), torch.zeros(n, **kw)  # x and g of the last step
        self.count = 0  # steps taken (host int: the ring position never needs a device value)
        self.eye = torch.eye(history, **kw)
        self.gram = torch.zeros(2 * history, 2 * history, **kw)  # [S Y]^T [S Y] in slot order
        # order[k]: the rows of pairs.view(2m, n) oldest first when the newest pair is in slot k; gram_order[k]: the
        # flat indices of gram in that order; unorder[k]: the inverse permutation
        idx = (torch.arange(history)[None, :] + torch.arange(1, history + 1)[:, None]) % history
        order = torch.cat([idx, idx + history], 1)  # (m, 2m)
        self.gram_order = (order[:, :, None] * 2 * history + order[:, None, :]).to(var.device)  # (m, 2m, 2m)
        self.order, self.unorder = order.to(var.device), order.argsort(1).to(var.device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.var.grad = None

    @torch.no_grad()
    def step(self) -> None:
        x, g = self.var.detach().reshape(-1), self.var.grad.detach().reshape(-1)
        if self.count == 0:
            if self.max_step > 0:
                d = g / torch.linalg.vector_norm(g, math.inf).clamp_min(1e-30) * -self.max_step
            else:
                d = g * (-1.0 / g.abs().sum().clamp_min(1.0))
        else:
            d = self._direction(x, g)
        if self.max_step > 0:
            # at most max_step per coordinate
            d = d / torch.linalg.vector_norm(d, math.inf).clamp_min(self.max_step) * self.max_step
        self.prev_x.copy_(x)
        self.prev_g.copy_(g)
        self.count += 1
        self.var.add_(d.view_as(self.var))

    def _direction(self, x: Tensor, g: Tensor) -> Tensor:
        """(n,) the L-BFGS step -H g after storing the newest pair, from the compact form
        H = gamma I + [S, gamma Y] M [S, gamma Y]^T with M = [[R^-T (D + gamma Y^T Y) R^-1, -R^-T], [-R^-1, 0]],
        R = triu(S^T Y), D = diag(S^T Y) (S, Y: (n, m) pairs oldest first):
        -H g = -(gamma g + S p - gamma Y u), u = R^-1 S^T g, p = R^-T ((D + gamma Y^T Y) u - gamma Y^T g)."""
        m, slot = self.history, (self.count - 1) % self.history
        torch.sub(x, self.prev_x, out=self.pairs[0, slot])
        torch.sub(g, self.prev_g, out=self.pairs[1, slot])
        w = self.pairs.view(2 * m, -1)  # (2m, n) [S^T; Y^T] in slot order
        # the Gram matrix changes in the new pair's rows and columns only: O(m n) per step, as the two-loop recursion
        new = w @ self.pairs[:, slot].T  # (2m, 2)
        self.gram.view(2 * m, 2, m)[:, :, slot] = new
        self.gram.view(2, m, 2 * m)[:, slot, :] = new.T
        # every inner product below, with the pairs oldest first (R is upper triangular in time order), newest last
        gram = self.gram.view(-1)[self.gram_order[slot]]  # (2m, 2m)
        wg = (w @ g)[self.order[slot]]  # (2m,)
        sy = gram[:m, m:]  # (m, m) S^T Y
        diag = gram.diagonal()
        # positive curvature along each stored step (an unused slot's zero pair fails the test)
        ok = sy.diagonal() > 1e-10 * diag[m:].clamp_min(1e-30).sqrt() * diag[:m].sqrt()  # (m,)
        self.gamma = torch.where(ok[-1], sy[-1, -1] / diag[-1].clamp_min(1e-30), self.gamma)  # the newest pair's
        gamma, v = self.gamma, ok.to(g.dtype)[:, None]  # (m, 1) 1 for the pairs used
        # masked pairs (unused slots, s.y <= 0) get a unit row and column in R and zero coefficients u, p, so the
        # direction is the two-loop recursion's over the other pairs (where such a pair has rho 0, a no-op)
        r = torch.where(ok[:, None] & ok[None, :], sy.triu(), self.eye)
        a, b = wg.view(2, m, 1).unbind(0)  # S^T g, Y^T g
        u = torch.linalg.solve_triangular(r, a * v, upper=True)  # (m, 1) R^-1 S^T g
        t = v * (sy.diagonal()[:, None] * u + gamma * (gram[m:, m:] @ u - b))
        p = torch.linalg.solve_triangular(r.mT, t, upper=False)  # (m, 1)
        coef = torch.cat([p, -gamma * u]).view(-1)[self.unorder[slot]]  # (2m,) in slot order
        return torch.addmv(g * gamma, w.T, coef).neg_()
