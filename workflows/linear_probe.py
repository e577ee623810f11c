"""Small linear probes in torch for the bench metrics: one-vs-rest logistic regression (L-BFGS, L2) and an
L1-regularised variant (Adam) whose weights rank latents for k-sparse probes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Probe:
    """``score(x) = ((x - mean) / std) @ W + b``: one column per class (one-vs-rest), positive means yes."""

    W_DC: Tensor
    b_C: Tensor
    mean_D: Tensor
    std_D: Tensor

    def score(self, x_ND: Tensor) -> Tensor:
        return ((x_ND.float() - self.mean_D) / self.std_D) @ self.W_DC + self.b_C

    def directions(self) -> Tensor:
        """[C, D] the probe directions in the input's own coordinates (standardisation undone)."""
        return (self.W_DC / self.std_D[:, None]).T


def _standardise(x_ND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    mean, std = x_ND.mean(0), x_ND.std(0).clamp_min(1e-6)
    return (x_ND - mean) / std, mean, std


def _pos_weight(Y_NC: Tensor) -> Tensor:
    """Class balance: positives weighted by negatives / positives per column."""
    pos = Y_NC.sum(0).clamp_min(1.0)
    return (len(Y_NC) - pos).clamp_min(1.0) / pos


def fit_ovr(x_ND: Tensor, Y_NC: Tensor, *, l2: float = 0.5, steps: int = 200, balanced: bool = True) -> Probe:
    """One-vs-rest logistic probes for every column of the 0/1 targets ``Y_NC``, fitted jointly by L-BFGS."""
    x, mean, std = _standardise(x_ND.float())
    Y = Y_NC.float()
    W = torch.zeros(x.shape[1], Y.shape[1], requires_grad=True)
    b = torch.zeros(Y.shape[1], requires_grad=True)
    weight = _pos_weight(Y) if balanced else None
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-5,
                            tolerance_change=1e-7)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ W + b, Y, pos_weight=weight) + l2 * W.pow(2).sum() / len(x)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(W.detach(), b.detach(), mean, std)


def fit_binary(x_NK: Tensor, y_N: Tensor, *, l2: float = 1e-2, steps: int = 25) -> Probe:
    """A class-balanced binary logistic probe on a few inputs (k-sparse probes), by Newton's method: a
    (K+1)-square solve per step, converged in a handful of steps, where a general optimiser takes hundreds."""
    x, mean, std = _standardise(x_NK.double())
    X = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    y = y_N.double()
    pos = float(y.sum())
    sample_w = torch.where(y > 0, (len(y) - pos) / max(pos, 1.0), 1.0)
    ridge = l2 * torch.eye(X.shape[1], dtype=x.dtype)
    ridge[-1, -1] = 0.0
    theta = torch.zeros(X.shape[1], dtype=x.dtype)
    for _ in range(steps):
        p = torch.sigmoid(X @ theta)
        grad = X.T @ (sample_w * (p - y)) + ridge @ theta
        hess = (X * (sample_w * p * (1 - p))[:, None]).T @ X + ridge + 1e-9 * torch.eye(X.shape[1], dtype=x.dtype)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if float(step.abs().max()) < 1e-6:
            break
    return Probe(theta[:-1, None].float(), theta[-1:].float(), mean.float(), std.float())


def fit_l1_ovr(x_ND: Tensor, Y_NC: Tensor, *, l1: float = 0.01, steps: int = 300, lr: float = 0.01,
               seed: int = 0) -> Tensor:
    """[D, C] weights of L1-regularised one-vs-rest logistic probes (raw inputs, Adam, full batch): the
    largest positive weights of a column are the inputs that predict that class most on their own."""
    torch.manual_seed(seed)
    x, Y = x_ND.float(), Y_NC.float()
    scale = x.abs().amax(0).clamp_min(1e-6)  # latents differ in scale by orders of magnitude
    x = x / scale
    W = torch.zeros(x.shape[1], Y.shape[1], requires_grad=True)
    b = torch.zeros(Y.shape[1], requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    weight = _pos_weight(Y)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x @ W + b, Y, pos_weight=weight) + l1 * W.abs().sum(0).mean()
            loss.backward()
            opt.step()
    return W.detach() / scale[:, None]


def f1_score(pred_N: Tensor, true_N: Tensor) -> float:
    tp = float((pred_N & true_N).sum())
    denom = float(pred_N.sum() + true_N.sum())
    return 2 * tp / denom if denom else 0.0


def accuracy(pred_N: Tensor, true_N: Tensor) -> float:
    return float((pred_N == true_N).float().mean()) if len(true_N) else float("nan")
