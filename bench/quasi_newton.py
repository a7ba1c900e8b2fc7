"""Newton and quasi-Newton recipes against scipy.optimize and torch.optim.LBFGS on convex problems.

    python bench/quasi_newton.py [--tol 1e-8] [--max-iter 500] [--problems logistic,least_squares,rosenbrock]

One run (after an untimed warm-up pass), float64, one thread (torch and BLAS). For each problem and method: iterations (optimizer
steps; scipy's and torch's iterations), closure / function evaluations, and
wall-clock until the objective gap ``f - f*`` first falls to ``tol`` (the gap
check runs outside the timed region). ``f*`` comes from scipy (BFGS to
gtol 1e-12) or a closed form.

Problems
--------
* ``logistic``: breast-cancer logistic regression (``precond.tasks.logistic``:
  Linear(30, 2), cross-entropy + ``0.005·‖W‖²``, full batch, likelihood categorical).
  The L2 term lives in the closure, so the GGN / Fisher recipes do not see its
  curvature: they run with ``damping = 0.01`` (that curvature, on the weights).
* ``least_squares``: scikit-learn's diabetes data (442 x 10, standardised),
  Linear(10, 1) + ``F.mse_loss`` (likelihood gaussian).
* ``rosenbrock``: ``½[(1 - x)² + 100 (y - x²)²]`` from (-1.5, 2) written as
  ``F.mse_loss(r, 0)`` of the residuals ``r`` (likelihood gaussian, so the
  Gauss-Newton family applies); no layers, so no K-BFGS.

Each precond recipe runs with its defaults (lr, line search, damping) except
where the table says otherwise. scipy gets exact gradients (and Hessian-vector
products for Newton-CG) from numpy code; torch.optim.LBFGS runs one iteration
per ``step()`` (``max_iter=1, max_eval=26``) with ``line_search_fn='strong_wolfe'``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one BLAS thread for numpy/scipy too
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import scipy.optimize as so  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import precond  # noqa: E402
from precond.recipe import builtin_recipes  # noqa: E402
from precond.tasks.logistic import L2, breast_cancer_arrays  # noqa: E402

D = torch.float64
RECIPES = [
    "newton",
    "gauss_newton",
    "hessian_free",
    "natural_gradient",
    "normalized_natural_gradient",
    "bfgs",
    "dfp",
    "sr1",
    "sherman_morrison",
    "lbfgs",
    "kbfgs",
]
GGN_FAMILY = {"gauss_newton", "natural_gradient", "normalized_natural_gradient", "hessian_free"}


@dataclass
class Problem:
    name: str
    likelihood: str
    make_model: Callable[[], nn.Module]
    closure: Callable[[nn.Module], Any]  # model -> closure
    f_np: Callable[[np.ndarray], tuple[float, np.ndarray]]  # x -> (f, grad), x = flat parameters
    hessp_np: Callable[[np.ndarray, np.ndarray], np.ndarray]
    x0: np.ndarray
    f_star: float
    layers: bool = True  # has nn.Linear layers (K-BFGS)
    ggn_damping: float = 0.0  # damping for the GGN family (curvature the GGN misses)


def flat(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


# --- problems -------------------------------------------------------------------------------


def logistic() -> Problem:
    xs = breast_cancer_arrays()
    x_np = np.c_[xs[0], np.ones(len(xs[0]))]
    y_np = np.eye(2)[xs[2]]
    reg = np.full((2, 31), L2)
    reg[:, -1] = 0.0
    x_t, y_t = torch.tensor(xs[0], dtype=D), torch.tensor(xs[2])

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(30, 2).to(D)

    def closure(model: nn.Module) -> Callable[[], Any]:
        def c():
            out = model(x_t)
            return F.cross_entropy(out, y_t) + 0.5 * L2 * model.weight.pow(2).sum(), out

        return c

    def unpack(x: np.ndarray) -> np.ndarray:  # [W (2x30), b (2)] -> (2, 31) with the bias last
        return np.c_[x[:60].reshape(2, 30), x[60:]]

    def pack(th: np.ndarray) -> np.ndarray:
        return np.r_[th[:, :30].ravel(), th[:, 30]]

    def probs(th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = x_np @ th.T
        z = z - z.max(1, keepdims=True)
        lse = np.log(np.exp(z).sum(1))
        return z - lse[:, None], np.exp(z - lse[:, None])

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        th = unpack(x)
        logp, p = probs(th)
        val = -(y_np * logp).sum(1).mean() + 0.5 * (reg * th**2).sum()
        return float(val), pack((p - y_np).T @ x_np / len(x_np) + reg * th)

    def hessp(x: np.ndarray, v: np.ndarray) -> np.ndarray:
        th, vv = unpack(x), unpack(v)
        _, p = probs(th)
        zv = x_np @ vv.T  # (N, 2)
        hz = p * zv - p * (p * zv).sum(1, keepdims=True)
        return pack(hz.T @ x_np / len(x_np) + reg * vv)

    x0 = flat(make())
    f_star = so.minimize(f, x0, jac=True, method="BFGS", options={"gtol": 1e-12, "maxiter": 10000}).fun
    return Problem("logistic", "categorical", make, closure, f, hessp, x0, f_star, ggn_damping=L2)


def least_squares() -> Problem:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x_np = (data.data - data.data.mean(0)) / data.data.std(0)
    y_np = (data.target - data.target.mean()) / data.target.std()
    a = np.c_[x_np, np.ones(len(x_np))]
    x_t, y_t = torch.tensor(x_np, dtype=D), torch.tensor(y_np, dtype=D).unsqueeze(1)
    n = len(x_np)

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(10, 1).to(D)

    def closure(model: nn.Module) -> Callable[[], Any]:
        def c():
            out = model(x_t)
            return F.mse_loss(out, y_t), out

        return c

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        r = a @ x - y_np
        return float(r @ r / n), 2.0 * a.T @ r / n

    def hessp(x: np.ndarray, v: np.ndarray) -> np.ndarray:
        return 2.0 * a.T @ (a @ v) / n

    sol = np.linalg.lstsq(a, y_np, rcond=None)[0]
    return Problem("least_squares", "gaussian", make, closure, f, hessp, flat(make()), f(sol)[0])


class Rosenbrock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.xy = nn.Parameter(torch.tensor([-1.5, 2.0], dtype=D))

    def forward(self) -> torch.Tensor:
        x, y = self.xy[0], self.xy[1]
        return torch.stack([1.0 - x, 10.0 * (y - x * x)])


def rosenbrock() -> Problem:
    zero = torch.zeros(2, dtype=D)

    def closure(model: nn.Module) -> Callable[[], Any]:
        def c():
            r = model()
            return F.mse_loss(r, zero), r

        return c

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        return 0.5 * float(so.rosen(x)), 0.5 * so.rosen_der(x)

    def hessp(x: np.ndarray, v: np.ndarray) -> np.ndarray:
        return 0.5 * so.rosen_hess_prod(x, v)

    return Problem("rosenbrock", "gaussian", Rosenbrock, closure, f, hessp, np.array([-1.5, 2.0]), 0.0, layers=False)


PROBLEMS = {"logistic": logistic, "least_squares": least_squares, "rosenbrock": rosenbrock}


# --- runners ------------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    iterations: int | None
    evaluations: int | None
    seconds: float | None
    final_gap: float
    note: str = ""

    @property
    def per_iteration_ms(self) -> float | None:
        return None if not self.iterations or self.seconds is None else 1e3 * self.seconds / self.iterations


class Counted:
    """A closure that counts its calls."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.fn()


def gap_of(problem: Problem, model: nn.Module) -> float:
    return problem.f_np(flat(model))[0] - problem.f_star


def run_precond(problem: Problem, recipe: str, tol: float, max_iter: int) -> Row:
    model = problem.make_model()
    sets: dict[str, Any] = {}
    note = ""
    if recipe in GGN_FAMILY and problem.ggn_damping and recipe != "hessian_free":
        sets["transform.0.damping"] = problem.ggn_damping
        note = f"damping {problem.ggn_damping:g}"
    try:
        opt = precond.build(recipe, model, likelihood=problem.likelihood, set=sets or None)
    except Exception as exc:  # noqa: BLE001 - a recipe that does not apply to this problem
        return Row(recipe, None, None, None, math.nan, f"n/a: {str(exc).splitlines()[0][:60]}")
    closure = Counted(problem.closure(model))
    elapsed = 0.0
    gap = gap_of(problem, model)
    for it in range(1, max_iter + 1):
        t0 = time.perf_counter()
        try:
            opt.step(closure)
        except Exception as exc:  # noqa: BLE001
            return Row(recipe, None, closure.calls, None, gap, f"failed: {str(exc).splitlines()[0][:60]}")
        elapsed += time.perf_counter() - t0
        gap = gap_of(problem, model)
        if not math.isfinite(gap):
            return Row(recipe, None, closure.calls, None, gap, (note + "; diverged").strip("; "))
        if gap <= tol:
            return Row(recipe, it, closure.calls, elapsed, gap, note)
    return Row(recipe, None, closure.calls, elapsed, gap, note)


def run_scipy(problem: Problem, method: str, tol: float, max_iter: int) -> Row:
    state = {"it": 0, "hit": None, "pause": 0.0, "gap": math.inf}
    evals = {"n": 0}

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        evals["n"] += 1
        return problem.f_np(x)

    def callback(xk: np.ndarray) -> None:
        t = time.perf_counter()
        state["it"] += 1
        state["gap"] = problem.f_np(xk)[0] - problem.f_star
        if state["gap"] <= tol and state["hit"] is None:
            state["hit"] = (state["it"], evals["n"], t)
        state["pause"] += time.perf_counter() - t
        if state["hit"] is not None:
            raise StopIteration

    kwargs: dict[str, Any] = {"jac": True, "callback": callback}
    if method == "Newton-CG":
        kwargs["hessp"] = problem.hessp_np
        kwargs["options"] = {"maxiter": max_iter, "xtol": 1e-14}
    elif method == "L-BFGS-B":
        kwargs["options"] = {"maxiter": max_iter, "gtol": 0.0, "ftol": 0.0}
    else:
        kwargs["options"] = {"maxiter": max_iter, "gtol": 0.0}
    t0 = time.perf_counter()
    so.minimize(fun, problem.x0.copy(), method=method, **kwargs)
    if state["hit"] is None:
        return Row(f"scipy {method}", None, evals["n"], None, state["gap"])
    it, n, t = state["hit"]
    return Row(f"scipy {method}", it, n, t - t0 - state["pause"], state["gap"])


def run_torch_lbfgs(problem: Problem, tol: float, max_iter: int) -> Row:
    model = problem.make_model()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=1, max_eval=26, history_size=100, line_search_fn="strong_wolfe")
    inner = problem.closure(model)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        opt.zero_grad()
        loss = inner()[0]
        loss.backward()
        return loss

    elapsed = 0.0
    gap = gap_of(problem, model)
    for it in range(1, max_iter + 1):
        t0 = time.perf_counter()
        opt.step(closure)
        elapsed += time.perf_counter() - t0
        gap = gap_of(problem, model)
        if gap <= tol:
            return Row("torch LBFGS (strong_wolfe)", it, calls["n"], elapsed, gap)
    return Row("torch LBFGS (strong_wolfe)", None, calls["n"], elapsed, gap)


def fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def table(problem: Problem, rows: list[Row], tol: float) -> str:
    head = f"\n## {problem.name}  (f* = {problem.f_star:.12g}, tolerance f - f* <= {tol:g})\n"
    lines = [
        "| method | iterations | evaluations | ms to tol | ms / iteration | final gap | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ms = None if r.seconds is None else 1e3 * r.seconds
        lines.append(
            f"| {r.method} | {fmt(r.iterations)} | {fmt(r.evaluations)} | {fmt(ms, '.1f')} | "
            f"{fmt(r.per_iteration_ms, '.2f')} | {fmt(r.final_gap, '.1e')} | {r.note} |"
        )
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float, default=1e-8)
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    available = set(builtin_recipes())
    recipes = [r for r in args.recipes.split(",") if r in available]
    print(f"precond {precond.__version__ if hasattr(precond, '__version__') else ''} · torch {torch.__version__} · "
          f"scipy {__import__('scipy').__version__} · float64 · 1 thread · tol {args.tol:g}")
    for name in args.problems.split(","):
        problem = PROBLEMS[name]()
        for _ in range(2):  # the first pass warms up code paths and caches; the second is reported
            rows = [run_precond(problem, r, args.tol, args.max_iter) for r in recipes]
            rows += [run_scipy(problem, m, args.tol, args.max_iter) for m in ("BFGS", "L-BFGS-B", "Newton-CG")]
            rows.append(run_torch_lbfgs(problem, args.tol, args.max_iter))
        if not problem.layers:
            rows = [r if r.method != "kbfgs" else Row("kbfgs", None, None, None, math.nan, "n/a: no layers") for r in rows]
        print(table(problem, rows, args.tol))


if __name__ == "__main__":
    main()
