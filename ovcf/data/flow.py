"""CONSORT-style cohort flow report of an ingest: how many rows came in, why each left, what remained.

A reader of the paper (or a reviewer of the data) must be able to follow every received row to
either one exclusion reason or one included center, so the totals add up: each excluded row is
counted once, under its first reason in protocol order, and separately under every reason it has.
The report holds pseudonyms only, never file paths, so it can be shared with the cohort's results.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ovcf.atomic import write_atomic
from ovcf.contract import DATA_PROBLEM_CODES, EXCLUSION_CODES, LABELS

PROTOCOL_ORDER = (*EXCLUSION_CODES, *DATA_PROBLEM_CODES)
UNSPECIFIED = "unspecified"  # an excluded row that carries no reason still has to be counted somewhere


def code_key(code: str) -> tuple[int, str]:
    """Sort key of an exclusion code: protocol order first, unknown codes after them alphabetically."""
    return (PROTOCOL_ORDER.index(code), "") if code in PROTOCOL_ORDER else (len(PROTOCOL_ORDER), code)


def sorted_codes(codes) -> list[str]:
    """Distinct `codes` in protocol order, so every table and diagram lists reasons the same way."""
    return sorted(set(codes), key=code_key)


def _reasons(row: dict) -> list[str]:
    """The reasons of an excluded row in protocol order (never empty, so the row is counted)."""
    return sorted_codes(row.get("reasons") or []) or [UNSPECIFIED]


def _in_order(counts: Counter) -> dict[str, int]:
    """Nonzero `counts` keyed in protocol order."""
    return {code: counts[code] for code in sorted_codes(counts) if counts[code]}


def _by_center(included: list[dict]) -> dict[str, dict[str, int]]:
    """Included rows per center and label, with the number of distinct patients behind them."""
    out: dict[str, dict[str, int]] = {}
    for center in sorted({r["center"] for r in included}):
        rows = [r for r in included if r["center"] == center]
        counts = {label: 0 for label in LABELS}
        counts.update(Counter(r["label"] for r in rows))
        out[center] = {**counts, "patients": len({r["pseudonym"] for r in rows})}
    return out


def _n_rows(center: dict[str, int]) -> int:
    """Included rows of a center: all label counts, so a row with an unexpected label is not lost."""
    return sum(n for key, n in center.items() if key != "patients")


def flow_totals(rows: list[dict], files: dict) -> dict:
    """Counts of the flow: received -> excluded per reason -> included per center and label.

    Args:
        rows: one dict per clinical.csv row (`row`, `pseudonym`, `center`, `level`, `label`, `included`,
            `reasons`, `flags`, `note`).
        files: counts from the DICOM scan (ints, or dicts of ints), passed through unchanged.

    Returns:
        `received`, `patients`, `excluded`, `included`, `excluded_by_reason` (each excluded row once,
        under its first reason in protocol order), `reasons_any` (rows having each reason at all),
        `included_by_center`, `flagged` (rows per flag) and `files`.
    """
    excluded = [r for r in rows if not r["included"]]
    included = [r for r in rows if r["included"]]
    return {
        "received": len(rows),
        "patients": len({r["pseudonym"] for r in rows}),
        "excluded": len(excluded),
        "included": len(included),
        "excluded_by_reason": _in_order(Counter(_reasons(r)[0] for r in excluded)),
        "reasons_any": _in_order(Counter(code for r in excluded for code in _reasons(r))),
        "included_by_center": _by_center(included),
        "flagged": dict(sorted(Counter(f for r in rows for f in set(r.get("flags") or [])).items())),
        "files": files,
    }


def _cell(value) -> str:
    """A markdown table cell: pipes escaped and newlines flattened, so free-text notes cannot break the table."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], body: list[list]) -> list[str]:
    """Markdown table lines; columns holding only numbers (or blanks) are right-aligned, as counts read best."""
    cols = [[row[i] for row in body if row[i] != ""] for i in range(len(header))]
    numeric = [bool(col) and all(isinstance(v, int) for v in col) for col in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in body]


def _flow_section(totals: dict) -> list[str]:
    """Received -> excluded per reason (first reason and any reason) -> included."""
    body = [["Received", totals["received"], ""], ["Patients", totals["patients"], ""], ["Excluded", totals["excluded"], ""]]
    for code, n_any in totals["reasons_any"].items():
        body.append([code, totals["excluded_by_reason"].get(code, 0), n_any])
    body.append(["Included", totals["included"], ""])
    return ["## Flow", "", *_table(["Step", "Rows (first reason)", "Rows (any reason)"], body), ""]


def _center_section(totals: dict) -> list[str]:
    """Included rows per center and label, with a total line; one center gets a line saying what it
    allows instead (contract, "Splits"): a reader should not look for an external set."""
    centers = totals["included_by_center"]
    body = [[c, n["acute"], n["chronic"], _n_rows(n), n["patients"]] for c, n in centers.items()]
    note = []
    if len(body) == 1:
        note = [f"One center ({body[0][0]}): patient folds for internal validation only; no external test set.", ""]
    else:
        body.append(["Total", *(sum(row[i] for row in body) for i in range(1, 5))])
    return ["## Included by center", "", *_table(["Center", "Acute", "Chronic", "Rows", "Patients"], body), "", *note]


def _files_section(files: dict) -> list[str]:
    """Files and series scanned, and series rejected per reason (nested dicts become `key: subkey`)."""
    body = []
    for key, value in files.items():
        if isinstance(value, dict):
            body += [[f"{key}: {sub}", n] for sub, n in value.items()]
        else:
            body.append([key, value])
    return ["## Files and series", "", *(_table(["Item", "Count"], body) if body else ["None recorded."]), ""]


def _flag_section(rows: list[dict], totals: dict) -> list[str]:
    """Rows a reader should look at although they were not excluded for it."""
    flagged = [r for r in rows if r.get("flags")]
    if not flagged:
        return ["## Flagged rows", "", "None.", ""]
    counts = ", ".join(f"{flag}: {n}" for flag, n in totals["flagged"].items())
    body = [[r["row"], r["pseudonym"], r["center"], r["level"], ", ".join(r["flags"]), r.get("note", "")] for r in flagged]
    return ["## Flagged rows", "", counts, "", *_table(["Row", "Pseudonym", "Center", "Level", "Flags", "Note"], body), ""]


def _excluded_lines(rows: list[dict]) -> list[str]:
    """One line per excluded row, so each exclusion can be checked against the source."""
    lines = []
    for r in rows:
        if not r["included"]:
            note = f" — {r['note']}" if r.get("note") else ""
            lines.append(f"- row {r['row']} ({r['pseudonym']}, {r['center']}, {r['level']}): {', '.join(_reasons(r))}{note}")
    return ["## Excluded rows", "", *(lines or ["None."]), ""]


def flow_markdown(rows: list[dict], totals: dict, title: str = "Cohort flow") -> str:
    """The readable report: flow table, centers, files, flagged rows and one line per excluded row."""
    rows = sorted(rows, key=lambda r: r["row"])
    sections = [f"# {title}", "", *_flow_section(totals), *_center_section(totals), *_files_section(totals["files"])]
    return "\n".join([*sections, *_flag_section(rows, totals), *_excluded_lines(rows)])


BOX = {"boxstyle": "round,pad=0.6", "facecolor": "white", "edgecolor": "black", "linewidth": 1.2}
LINE_IN = 0.19  # inches per text line at fontsize 10, with spacing
GAP_IN = 0.5  # vertical gap between boxes, room for the arrows
CHAR_IN = 0.08  # inches per character at fontsize 10 (estimate, only used to size the figure)


def _box_height(lines: int) -> float:
    """Estimated height (inches) of a box of `lines` lines, padding included."""
    return lines * LINE_IN + 0.25


def _extent(ax, text) -> tuple[float, float, float, float]:
    """Measured (x0, y0, x1, y1) of a text's box in data units, so arrows end exactly on its edge.

    The box patch only gets its size when the text is drawn, hence the draw before any measuring.
    """
    box = text.get_bbox_patch().get_window_extent().transformed(ax.transData.inverted())
    return box.x0, box.y0, box.x1, box.y1


def _arrow(ax, start: tuple[float, float], end: tuple[float, float]) -> None:
    """An arrow from `start` to `end` (data units)."""
    style = {"arrowstyle": "-|>", "color": "black", "lw": 1.2, "shrinkA": 0, "shrinkB": 0}
    ax.annotate("", xy=end, xytext=start, arrowprops=style)


def _line(ax, xs: list[float], ys: list[float]) -> None:
    """A plain connecting line (data units)."""
    ax.plot(xs, ys, color="black", lw=1.2)


def _diagram_texts(totals: dict) -> tuple[str, str, list[str]]:
    """The top box, exclusion box and one text per center box of the diagram."""
    top = f"Rows received: {totals['received']} ({totals['patients']} patients)"
    reasons = [f"  {code}: {n}" for code, n in totals["excluded_by_reason"].items()]
    side = "\n".join([f"Excluded: {totals['excluded']}", *reasons])
    centers = [
        f"Center {c}: included {_n_rows(n)}\n(acute {n['acute']}, chronic {n['chronic']}; {n['patients']} patients)"
        for c, n in totals["included_by_center"].items()
    ] or ["Included: 0"]
    return top, side, centers


def flow_figure(totals: dict):
    """CONSORT-style diagram: received -> (excluded, per reason, on the right) -> one box per center.

    Drawn on a bare `Figure` with the Agg canvas, so it works without a display. Layout is in
    inches (axes limits = figure size) and the figure grows with the number of reasons and centers.
    """
    top, side, centers = _diagram_texts(totals)
    side_lines = side.count("\n") + 1
    center_w = max(len(line) for text in centers for line in text.split("\n")) * CHAR_IN + 0.6
    side_w = max(len(line) for line in side.split("\n")) * CHAR_IN + 0.6
    width = max(len(centers) * (center_w + 0.4) + 0.4, 2 * (side_w + 0.8), len(top) * CHAR_IN + 1.4, 6.0)
    heights = [_box_height(1), _box_height(side_lines), _box_height(2)]
    height = sum(heights) + 2 * GAP_IN + 1.0  # 0.4 top and 0.3 bottom margins, 0.3 for the branch line
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: ingest workers never draw
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    mid = width / 2
    top_y = height - 0.4 - heights[0] / 2
    side_y = top_y - heights[0] / 2 - GAP_IN - heights[1] / 2
    center_y = 0.3 + heights[2] / 2
    kw = {"fontsize": 10, "va": "center", "bbox": BOX}
    top_text = ax.text(mid, top_y, top, ha="center", fontweight="bold", **kw)
    side_text = ax.text(mid + 0.5, side_y, side, ha="left", **kw)
    slots = width / len(centers)
    center_texts = [ax.text(slots * (i + 0.5), center_y, text, ha="center", **kw) for i, text in enumerate(centers)]
    fig.canvas.draw()
    top_bottom = _extent(ax, top_text)[1]
    centers_top = max(_extent(ax, t)[3] for t in center_texts)
    branch_y = centers_top + 0.25
    _line(ax, [mid, mid], [top_bottom, branch_y])
    _arrow(ax, (mid, side_y), (_extent(ax, side_text)[0], side_y))
    xs = [t.get_position()[0] for t in center_texts]
    _line(ax, [min(xs + [mid]), max(xs + [mid])], [branch_y, branch_y])
    for x, t in zip(xs, center_texts):
        _arrow(ax, (x, branch_y), (x, _extent(ax, t)[3]))
    return fig


def write_flow(out: Path, rows: list[dict], files: dict, title: str = "Cohort flow") -> dict:
    """Write `flow.json`, `flow.md` and `flow.png` into folder `out` (created if missing).

    Args:
        out: the report folder; no other path is written into the report (only pseudonyms identify patients).
        rows: one dict per clinical.csv row, see `flow_totals`.
        files: counts from the DICOM scan, see `flow_totals`.
        title: heading of the markdown report; never a folder or file name (exports are often named after a patient).

    Returns:
        The totals (`flow_totals(rows, files)`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    totals = flow_totals(rows, files)
    ordered = sorted(rows, key=lambda r: r["row"])
    payload = json.dumps({"totals": totals, "rows": ordered}, indent=1, ensure_ascii=False)
    write_atomic(out / "flow.json", lambda p: p.write_text(payload + "\n", encoding="utf-8"))
    report = flow_markdown(ordered, totals, title)
    write_atomic(out / "flow.md", lambda p: p.write_text(report + "\n", encoding="utf-8"))
    figure = flow_figure(totals)
    write_atomic(out / "flow.png", lambda p: figure.savefig(p, format="png", dpi=150))
    return totals
