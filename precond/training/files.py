"""Result files: ``metrics.json`` and ``curve.csv`` (and ``curve.png``) of a run, ``compare.json``,
``compare.csv`` and ``compare.png`` of a comparison, with every run's files under ``runs/``. Non-finite
numbers are ``null`` in JSON and ``nan``/``inf`` in CSV."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from precond.training.report import plot_runs
from precond.training.results import CompareResult, CompareRow, RunResult


def jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become None."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if hasattr(value, "item"):
        try:
            return jsonable(value.item())
        except Exception:  # noqa: BLE001, S110
            pass
    return repr(value)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def _curve_rows(result: RunResult) -> tuple[list[str], list[list[Any]]]:
    eval_keys: list[str] = []
    for e in result.evals:
        for k in e:
            if k not in ("step", "wall_time_s") and k not in eval_keys:
                eval_keys.append(k)
    header = ["step", "wall_time_s", "loss", *eval_keys]
    by_step: dict[int, dict[str, float]] = {}
    for e in result.evals:
        by_step[int(e["step"])] = e
    rows = []
    if 0 in by_step:
        rows.append([0, 0.0, "", *[by_step[0].get(k, "") for k in eval_keys]])
    for k, (loss, wall) in enumerate(zip(result.losses, result.wall_times), start=1):
        e = by_step.get(k)
        rows.append([k, wall, loss, *[e.get(k2, "") if e else "" for k2 in eval_keys]])
    return header, rows


def _write_curve_csv(path: Path, result: RunResult) -> None:
    header, rows = _curve_rows(result)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows([[_csv_value(v) for v in row] for row in rows])


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v)
    return "" if v is None else v


def write_run(result: RunResult, out_dir: str | Path, *, plot: bool = True) -> Path:
    """Write ``metrics.json``, ``curve.csv`` and (``plot``) ``curve.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.out_dir = str(out)
    _write_json(out / "metrics.json", result.summary())
    _write_curve_csv(out / "curve.csv", result)
    if plot:
        plot_runs([result], out / "curve.png", title=f"{result.label} on {result.task} (seed {result.seed})")
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def write_compare(result: CompareResult, out_dir: str | Path) -> Path:
    """Write ``compare.json``, ``compare.csv``, ``compare.png`` and per-run files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.out_dir = str(out)
    for run in result.runs:
        name = slug(run.label)
        if run.lr_multiplier is not None:
            name += f"-lrx{run.lr_multiplier:g}"
        write_run(run, out / "runs" / f"{name}-seed{run.seed}", plot=False)
    _write_json(out / "compare.json", result.to_dict())
    fields = list(CompareRow.__dataclass_fields__)
    with (out / "compare.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", *fields])
        for rank, row in enumerate(result.all_rows, start=1):
            d = row.to_dict()
            writer.writerow([rank, *[_csv_value(d[f]) for f in fields]])
    shown = [(r.label, r.lr_multiplier) for r in result.rows]  # in the table's order: the legend's
    budget = f", {result.time_budget_s:g} s each" if result.time_budget_s is not None else ""
    count = f"{len(result.rows)} optimizer{'s' if len(result.rows) != 1 else ''}"
    plot_runs(
        [r for key in shown for r in result.runs if (r.label, r.lr_multiplier) == key],
        out / "compare.png",
        title=f"{result.task}: {count}, seeds {result.seeds}{budget}",
    )
    return out

