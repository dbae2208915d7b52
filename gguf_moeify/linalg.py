"""Small numerical helpers shared by methods and runtimes."""
from __future__ import annotations

import numpy as np
import torch


def ridge_least_squares(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> np.ndarray:
    """W (outputs, d) minimising ||x W^T - y||^2 + lambda ||W||^2 (no bias: the runtimes' linear routers have none),
    lambda = ``ridge`` x the mean diagonal of x^T x; float64 normal equations."""
    xd = x.double()
    gram = xd.t() @ xd
    lam = ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64), xd.t() @ y.double())
    return w.t().float().numpy()
