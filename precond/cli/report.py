"""What ``precond compare`` says about a comparison: the verdict (which recipe wins, by how much) and
``compare.md``."""

from __future__ import annotations

from typing import Optional

from precond.training.report import fmt as _fmt


def _target_text(result) -> str:
    op = ">=" if result.higher_is_better else "<="
    return f"{result.metric} {op} {_fmt(result.target)}"


def _meets(value: float, result) -> bool:
    if value != value:  # nan
        return False
    return value >= result.target if result.higher_is_better else value <= result.target


def verdict(result) -> list[str]:
    """Plain sentences: which recipe wins (fewest steps to target, fastest wall-clock) and by how much."""
    rows = [r for r in result.rows if r.status == "ok" or r.reached]
    target = f"{result.metric} {'>=' if result.higher_is_better else '<='} {_fmt(result.target)}"
    by = {r.label: r for r in result.rows}
    budget = getattr(result, "time_budget_s", None)
    head: list[str] = []
    if budget is not None:
        ranked = [r for r in result.rows if r.status == "ok" and r.final_metric == r.final_metric]
        if ranked:
            best = ranked[0]
            text = (f"best after {budget:g} s of training each: {best.label}, {result.metric} "
                    f"{_fmt(best.final_metric)} ({_fmt(best.steps_done)} steps)")
            if len(ranked) > 1:
                nxt = ranked[1]
                text += f" vs {nxt.label} {_fmt(nxt.final_metric)} ({_fmt(nxt.steps_done)} steps)"
            head.append(text)
    return head + _verdict_target(result, rows, target, by)


def _verdict_target(result, rows, target, by) -> list[str]:
    reached = [r for r in result.rows if r.steps_to_target is not None]
    lines = []
    if not reached:
        pool = [r for r in rows if r.final_metric == r.final_metric] or list(result.rows)
        if not pool:
            return [f"no recipe reached the target {target}"]
        best = sorted(pool, key=lambda r: -r.final_metric if result.higher_is_better else r.final_metric)[0]
        return [
            f"no recipe reached the target {target} in {result.steps} steps; "
            f"best final {result.metric}: {best.label} ({_fmt(best.final_metric)})"
        ]
    # fewest steps (ties: less wall-clock): the table's order is by the final metric under a time budget
    reached = sorted(reached, key=lambda r: (r.steps_to_target, r.time_to_target_s))
    first = reached[0]
    others = [r for r in reached if r.label != first.label]
    text = f"fewest steps to {target}: {first.label}, {_fmt(first.steps_to_target)} steps"
    ref = by.get("adam") if first.label != "adam" else (others[0] if others else None)
    if ref is not None and ref.label != first.label:
        if ref.steps_to_target is not None and ref.steps_to_target == first.steps_to_target:
            text += f", tied with {ref.label} (ahead on wall-clock)"
        elif ref.steps_to_target is not None:
            text += (
                f" vs {ref.label} {_fmt(ref.steps_to_target)} "
                f"({ref.steps_to_target / first.steps_to_target:.2f}x fewer)"
            )
        else:
            text += f"; {ref.label} did not reach it in {result.steps} steps"
    if not _meets(first.final_metric, result):
        text += f", but it ends off the target again, at {result.metric} {_fmt(first.final_metric)}"
    lines.append(text)
    fastest = min(reached, key=lambda r: r.time_to_target_s)
    rest = sorted((r for r in reached if r.label != fastest.label), key=lambda r: r.time_to_target_s)
    text = f"fastest wall-clock to target: {fastest.label}, {fastest.time_to_target_s:.3g} s"
    if rest:
        ratio = rest[0].time_to_target_s / fastest.time_to_target_s if fastest.time_to_target_s > 0 else float("inf")
        text += f" vs {rest[0].label} {rest[0].time_to_target_s:.3g} s ({ratio:.2f}x faster)"
    adam = by.get("adam")
    if adam is not None and adam.label not in (fastest.label, rest[0].label if rest else None):
        if adam.time_to_target_s is not None and fastest.time_to_target_s > 0:
            text += f"; adam {adam.time_to_target_s:.3g} s ({adam.time_to_target_s / fastest.time_to_target_s:.2f}x)"
    lines.append(text)
    missed = [r.label for r in result.rows if r.steps_to_target is None]
    if missed:
        lines.append(f"did not reach the target (median over seeds) in {result.steps} steps: {', '.join(missed)}")
    return lines


def compare_markdown(result, lr_reasons: Optional[dict] = None, skipped: Optional[dict] = None) -> str:
    """The comparison as Markdown (what `compare.md` holds): the ranked table, then the verdict."""
    op = ">=" if result.higher_is_better else "<="
    grid = result.lr_grid is not None
    has_ref = any(r.rel_ms_per_step is not None for r in result.rows)
    head = ["#", "recipe", "lr", "reached", "steps to target", "time to target (s)", f"final {result.metric}",
            "final train loss", "ms/step"]
    if has_ref:
        head.append("× adam ms/step")
    head.append("status")
    lines = [
        f"`{result.task}`: target {result.metric} {op} {_fmt(result.target)}, "
        + (f"{result.time_budget_s:g} s of training each, " if getattr(result, "time_budget_s", None) is not None
           else f"{result.steps} steps, ")
        + f"seeds {', '.join(map(str, result.seeds))}" + (f", lr grid × {', '.join(f'{m:g}' for m in result.lr_grid)}" if grid else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for rank, row in enumerate(result.rows, start=1):
        lr = _fmt_lr(row.lr) + (f" (×{row.lr_multiplier:g})" if grid and row.lr_multiplier is not None else "")
        cells = [str(rank), f"`{row.label}`", lr, f"{row.reached}/{row.seeds}", _fmt(row.steps_to_target),
                 _fmt(row.time_to_target_s, 3), _fmt(row.final_metric), _fmt(row.final_train_loss), _fmt(row.ms_per_step, 3)]
        if has_ref:
            cells.append(_fmt(row.rel_ms_per_step, 3))
        cells.append(row.status if row.status == "ok" else f"{row.status}: {row.message}".replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {line}" for line in verdict(result)]
    for label, reason in (skipped or {}).items():
        lines.append(f"- skipped `{label}`: it cannot run on this task: {reason}")
    if lr_reasons:
        lines.append("- learning rates: " + "; ".join(f"`{k}` {v}" for k, v in lr_reasons.items()))
    return "\n".join(lines) + "\n"


def _fmt_lr(value) -> str:
    return "—" if value is None else f"{value:g}"

