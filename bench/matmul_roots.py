"""SOAP's refresh by power iteration + QR against eigh, and coupled-Newton inverse roots against eigh, by block size.

For each size n, one symmetric PSD factor like Shampoo's (an EMA of ``G Gᵀ`` with a spread spectrum) and a
basis that is one refresh old (the eigenbasis of the factor before 10 more EMA steps):

* refresh: ``eigh`` of the factor vs ``power_qr`` (``diag(Oᵀ M O)``, sort, ``M O``, QR) from the old basis,
  and how far each basis is from diagonalising the factor (``off = ‖B − diag B‖_F / ‖B‖_F``, ``B = Qᵀ M Q``);
* root: ``Q diag((λ + ε)^(−1/4)) Qᵀ`` through ``eigh`` vs ``coupled_newton`` (p = 4, tol 1e-6), with the
  iterations it took and its error against the float64 eigh root.

Median of ``--repeat`` timings, float32 on the CPU (or ``--device cuda``), ``--threads`` torch threads;
prints the ratios (eigh time / matmul-only time: above 1 the matmul-only path is faster).

Run: python bench/matmul_roots.py [--sizes 128 256 512 1024] [--repeat 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from precond.linalg.newton import coupled_newton
from precond.linalg.spectral import power_qr


def factor(n: int, steps: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An EMA (β = 0.95) of ``G Gᵀ`` over ``steps`` gradients ``(n, n/2)`` — a fixed part plus as much noise,
    column scales spread over 1e3 — and the same EMA 10 steps earlier."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -3, n // 2)
    m = torch.zeros(n, n, dtype=torch.float64)
    earlier = m
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    base = torch.randn(n, n // 2, generator=g, dtype=torch.float64)
    for t in range(steps):
        x = mix @ (base + torch.randn(n, n // 2, generator=g, dtype=torch.float64)) * scale
        m = 0.95 * m + 0.05 * x @ x.T
        if t == steps - 11:
            earlier = m.clone()
    return m.float().to(device), earlier.float().to(device)


def timed(fn: Callable[[], object], repeat: int, device: str) -> float:
    out = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def off(m: torch.Tensor, q: torch.Tensor) -> float:
    b = q.double().T @ m.double() @ q.double()
    return float(torch.linalg.matrix_norm(b - torch.diag(torch.diag(b))) / torch.linalg.matrix_norm(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    eps = 1e-6
    print(f"device {args.device}, float32, {args.threads} thread(s), median of {args.repeat}")
    print("| n | eigh (ms) | power_qr (ms) | ratio | off(eigh) | off(old basis) | off(power_qr) "
          "| eigh root (ms) | coupled Newton (ms) | ratio | iterations | rel. error CN | rel. error eigh |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        m, earlier = factor(n, 40, n, args.device)
        old = torch.linalg.eigh(earlier).eigenvectors.flip(-1)
        t_eigh = timed(lambda: torch.linalg.eigh(m), args.repeat, args.device)
        t_qr = timed(lambda: power_qr(m, old), args.repeat, args.device)
        res = power_qr(m, old)
        assert res is not None
        q_eigh = torch.linalg.eigh(m).eigenvectors

        def eigh_root() -> torch.Tensor:
            lam, q = torch.linalg.eigh(m)
            return (q * (lam.clamp_min(0) + eps).pow(-0.25)) @ q.T

        t_root = timed(eigh_root, args.repeat, args.device)
        t_cn = timed(lambda: coupled_newton(m, 4, damping=eps), args.repeat, args.device)
        cn = coupled_newton(m, 4, damping=eps)
        lam64, q64 = torch.linalg.eigh(m.double())
        exact = (q64 * (lam64.clamp_min(0) + eps).pow(-0.25)) @ q64.T
        err_cn = float((cn.root.double() - exact).abs().max() / exact.abs().max())
        err_eigh = float((eigh_root().double() - exact).abs().max() / exact.abs().max())
        print(f"| {n} | {1e3 * t_eigh:.1f} | {1e3 * t_qr:.1f} | {t_eigh / t_qr:.2f} | {off(m, q_eigh):.1e} | "
              f"{off(m, old):.1e} | {off(m, res.eigenvectors):.1e} | {1e3 * t_root:.1f} | {1e3 * t_cn:.1f} | "
              f"{t_root / t_cn:.2f} | {cn.iterations} | {err_cn:.1e} | {err_eigh:.1e} |", flush=True)


if __name__ == "__main__":
    main()
