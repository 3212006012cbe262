"""Terminal views of placetune's records (rich tables). Nothing here computes a figure."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from placetune.anatomy import Anatomy

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
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
    table = Table(title="bytes per layer and group", show_lines=False)
    table.add_column("layer", justify="right")
    for c in columns:
        table.add_column(c, justify="right")
    table.add_column("total", justify="right", style="bold")
    table.add_column("types")
    for r in rows:
        label = "-" if r["layer"] is None else str(r["layer"])
        cells = [human_bytes(r[c]) if c in r else "" for c in columns]
        table.add_row(label, *cells, human_bytes(r["total"]), ",".join(r["types"]))
    console.print(table)

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
