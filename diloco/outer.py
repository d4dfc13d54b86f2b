"""The outer optimizer: pseudo-gradients and (Nesterov) SGD on the global parameters.

The pseudo-gradient of a fragment is Delta = theta_global - theta_local (it points the way
a gradient does: the outer step theta_global - lr * Delta moves the global parameters
toward where the replicas went). The replicas' Deltas are averaged by the exchange and
applied here with SGD, in fp32, exactly as `torch.optim.SGD(lr, momentum, nesterov=True,
dampening=0)` would:

    buf <- Delta                      (first step)
    buf <- momentum * buf + Delta     (later steps)
    update <- Delta + momentum * buf  (nesterov; plain momentum uses buf)
    theta_global <- theta_global - lr * update

Each fragment has its own momentum buffer, since fragments step at different times.
"""

from __future__ import annotations

from typing import Any

import torch


def pseudo_gradient(global_params: torch.Tensor, local_params: torch.Tensor) -> torch.Tensor:
    """Delta = theta_global - theta_local, in fp32."""
    return global_params.float() - local_params.float()


class OuterSGD:
    """SGD with (Nesterov) momentum over `count` flat fp32 fragments."""

    def __init__(self, lr: float, momentum: float, nesterov: bool, count: int) -> None:
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.buffers: list[torch.Tensor | None] = [None] * count

    @torch.no_grad()
    def step(self, index: int, params: torch.Tensor, grad: torch.Tensor) -> None:
        """Update `params` (fragment `index`) in place with the averaged `grad`."""
        update = grad
        if self.momentum:
            buf = self.buffers[index]
            if buf is None:
                buf = self.buffers[index] = grad.detach().clone()
            else:
                buf.mul_(self.momentum).add_(grad)
            update = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
        params.add_(update, alpha=-self.lr)

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "buffers": [None if b is None else b.clone() for b in self.buffers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buffers = state["buffers"]
        if len(buffers) != len(self.buffers):
            raise ValueError(
                f"outer state has {len(buffers)} fragments, expected {len(self.buffers)}"
            )
        self.buffers = [None if b is None else b.detach().clone() for b in buffers]
