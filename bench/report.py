"""Tables (markdown, also printed) and the JSON file of a benchmark run."""
from __future__ import annotations


def _fmt(x, unit: str = "") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        a = abs(x)
        s = f"{x:.0f}" if a >= 100 else f"{x:.1f}" if a >= 10 else f"{x:.2f}" if a >= 0.1 or a == 0 else f"{x:.3f}"
    else:
        s = str(x)
    return s


def target_text(metric: dict, t: dict) -> str:
    op = "≥" if t["op"] == "ge" else "≤"
    if t["against"] is None:
        return f"{metric['subject']} {op} {_fmt(float(t['bound']))} {metric['unit']}"
    return f"{metric['subject']} {op} {t['bound']:g}× {t['against']}"


def verdict(t: dict) -> str:
    return "n/a" if t["met"] is None else "met" if t["met"] else "**MISSED**"


def metric_markdown(m: dict) -> str:
    lines = [f"### {m['title']}", ""]
    better = "higher is better" if m["higher_is_better"] else "lower is better"
    lines.append(f"Unit: {m['unit']} ({better}).")
    lines.append("")
    lines.append(f"| | median | min–max | IQR | n | {m['subject']} ÷ row |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for name, r in m["rows"].items():
        ratio = "" if name == m["subject"] else (f"{m['ratios'][name]:.2f}×" if name in m["ratios"] else "–")
        spread = f"{_fmt(r['min'])}–{_fmt(r['max'])}" if r["n"] else "–"
        iqr = f"{_fmt(r['q1'])}–{_fmt(r['q3'])}" if r["n"] else "–"
        lines.append(f"| {name} | {_fmt(r['median'])} | {spread} | {iqr} | {r['n']} | {ratio} |")
    for t in m["targets"]:
        value = "–" if t["value"] is None else (f"{t['value']:.2f}×" if t["against"] else f"{_fmt(t['value'])}")
        lines.append("")
        lines.append(f"Target: {target_text(m, t)} — measured {value}: {verdict(t)}")
    for name, err in m["errors"].items():
        lines.append("")
        lines.append(f"Error ({name}): {err}")
    for note in m["notes"]:
        lines.append("")
        lines.append(f"Note: {note}")
    lines.append("")
    return "\n".join(lines)


def summary_markdown(results: dict) -> str:
    lines = ["| metric | target | measured | verdict |", "|---|---|---:|---|"]
    for m in results["metrics"].values():
        for t in m["targets"]:
            value = "–" if t["value"] is None else (f"{t['value']:.2f}×" if t["against"] else
                                                    f"{_fmt(t['value'])} {m['unit']}")
            lines.append(f"| {m['key']} | {target_text(m, t)} | {value} | {verdict(t)} |")
    return "\n".join(lines) + "\n"


def full_markdown(results: dict) -> str:
    mc = results["machine"]
    head = [
        f"# activator benchmark results ({results['mode']} mode)",
        "",
        f"- date: {results['date']}; duration {results['duration_s']:.0f} s",
        f"- machine: {mc['cores']} cores ({mc['cpu']}), kernel {mc['kernel']}, Python {mc['python']} "
        f"({mc['executable']}), {mc['memory_gib']:.1f} GiB RAM",
        f"- load average at start / end: {mc['loadavg_start']} / {results.get('loadavg_end', '?')}",
        f"- peers: {', '.join(f'{k} {v}' for k, v in results['peers'].items())}",
    ]
    for note in results.get("notes", []):
        head.append(f"- note: {note}")
    head += ["", "## Targets", "", summary_markdown(results), "## Details", ""]
    body = [metric_markdown(m) for m in results["metrics"].values()]
    return "\n".join(head) + "\n" + "\n".join(body)
