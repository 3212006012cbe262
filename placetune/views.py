"""Terminal views of placetune's records (rich tables). Nothing here computes a figure."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from placetune.anatomy import Anatomy, column_of
from placetune.placement import Placement, layer_devices, tensor_buffer
from placetune.runners.base import Measurement, Workload
from placetune.units import UNITS, human_bytes


def _unit_for(n: float) -> tuple[float, str]:
    """One unit for a whole table, chosen from its largest cell, so columns stay narrow."""
    scale = 1.0
    for unit in UNITS:
        if n < 1024 * scale * 10 or unit == UNITS[-1]:
            return scale, unit
        scale *= 1024
    raise AssertionError("unreachable")


def _column_order(columns: set[str]) -> list[str]:
    preferred = ["embed", "attn", "norm", "ffn", "router", "shexp", "exp_gate", "exp_up", "exp_gate_up", "exp_down"]
    ordered = [c for c in preferred if c in columns]
    return ordered + sorted(columns - set(ordered))


def anatomy_table(anatomy: Anatomy, console: Console) -> None:
    """Model facts, the per-layer byte table, and the totals that the bandwidth model uses."""
    f = anatomy.facts
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("model", " + ".join(anatomy.paths))
    facts.add_row("architecture", f"{f.arch}  ({f.name})" if f.name else f.arch)
    facts.add_row("layers", f"{f.n_layers}  (leading dense: {f.n_leading_dense})" if f.is_moe else str(f.n_layers))
    facts.add_row("context (train)", str(f.n_ctx_train))
    facts.add_row("embedding", str(f.n_embd))
    facts.add_row("heads (q / kv)", f"{f.n_head} / {f.n_head_kv}   head dim k/v {f.head_dim_k}/{f.head_dim_v}")
    if f.is_moe:
        facts.add_row("experts", f"{f.n_expert}, {f.n_expert_used} used per token, {f.n_expert_shared} shared")
    facts.add_row("weight types", f.file_type)
    console.print(facts)

    rows = anatomy.layer_table()
    columns = _column_order({k for r in rows for k in r if k not in ("layer", "types", "total")})
    scale, unit = _unit_for(max(r["total"] for r in rows))
    table = Table(title=f"{unit} per layer and group", show_lines=False, pad_edge=False)
    table.add_column("layer", justify="right")
    for c in columns:
        table.add_column(c.removeprefix("exp_").replace("gate_up", "gate+up") + ("*" if c.startswith("exp_") else ""),
                         justify="right")
    table.add_column("total", justify="right", style="bold")
    table.add_column("types")
    for r in rows:
        label = "-" if r["layer"] is None else str(r["layer"])
        cells = [f"{r[c] / scale:.1f}" if c in r else "" for c in columns]
        table.add_row(label, *cells, f"{r['total'] / scale:.1f}", ",".join(t for t in r["types"] if t != "F32"))
    console.print(table)
    if f.is_moe:
        console.print("* routed experts by kind", highlight=False)

    totals = Table.grid(padding=(0, 2))
    totals.add_column(style="bold")
    totals.add_column(justify="right")
    totals.add_column()
    total = anatomy.total_bytes or 1
    totals.add_row("total", human_bytes(anatomy.total_bytes), f"{anatomy.total_bytes:,} B")
    totals.add_row("common (non-expert)", human_bytes(anatomy.common_bytes), f"{anatomy.common_bytes / total:.1%}")
    totals.add_row("routed experts", human_bytes(anatomy.expert_bytes), f"{anatomy.expert_bytes / total:.1%}")
    totals.add_row(
        "read per token",
        human_bytes(anatomy.active_bytes),
        f"common + experts x {f.n_expert_used}/{f.n_expert}" if f.is_moe else "every tensor (dense)",
    )
    console.print(totals)


def measurement_table(m: Measurement, workload: Workload, console: Console) -> None:
    """llama-bench-style rows (test, t/s ± stdev, spread) and the status line when it failed."""
    if not m.ok:
        console.print(f"[bold red]{m.status}[/]: {m.reason}", highlight=False)
        return
    table = Table(title=f"measured by {m.runner}")
    for col in ("test", "t/s (median)", "± stdev", "spread", "time-weighted", "samples"):
        table.add_column(col, justify="right")
    depth = f" @ d{workload.depth}" if workload.depth else ""
    for label, stats in ((f"pp{workload.n_prompt}{depth}", m.pp), (f"tg{workload.n_gen}{depth}", m.tg)):
        if stats.samples:
            table.add_row(label, f"{stats.median:.2f}", f"{stats.stdev:.2f}", f"{stats.spread:.1%}",
                          f"{stats.time_weighted:.2f}", str(len(stats.samples)))
    console.print(table)
    facts = []
    if m.load_s is not None:
        facts.append(f"load {m.load_s:.2f} s")
    if m.peak_rss_bytes:
        facts.append(f"peak RSS {human_bytes(m.peak_rss_bytes)}")
    facts.append(f"wall {m.wall_s:.2f} s, of which measured {m.measure_s:.2f} s")
    console.print(", ".join(facts), highlight=False)
    for issue in m.placement_issues:
        console.print(f"[yellow]placement check:[/] {issue}", highlight=False)


def placement_table(anatomy: Anatomy, placement: Placement, devices: list[str], reported: dict[str, int],
                    console: Console) -> None:
    """Where each tensor group lands (predicted from the anatomy) next to llama.cpp's own buffer sizes."""
    layer_dev = layer_devices(anatomy.facts.n_layers, placement.n_gpu_layers, devices, placement.tensor_split)
    grid: dict[str, dict[str, int]] = {}
    for t in anatomy.tensors:
        buft = tensor_buffer(t, placement, layer_dev)
        row = grid.setdefault(column_of(t), {})
        row[buft] = row.get(buft, 0) + t.n_bytes
    bufts = sorted({b for row in grid.values() for b in row} | set(reported), key=lambda b: (b != "CPU", b))
    table = Table(title="where tensors landed (weights, predicted from the GGUF)")
    table.add_column("group")
    for b in bufts:
        table.add_column(b, justify="right")
    for group in _column_order(set(grid)):
        table.add_row(group, *(human_bytes(grid[group][b]) if b in grid[group] else "" for b in bufts))
    totals = {b: sum(row.get(b, 0) for row in grid.values()) for b in bufts}
    table.add_row("[bold]predicted total[/]", *(human_bytes(totals[b]) for b in bufts))
    if reported:
        cells = (human_bytes(reported[b]) if b in reported else "-" for b in bufts)
        table.add_row("[bold]llama.cpp reported[/]", *cells)
    console.print(table)
