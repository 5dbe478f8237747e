"""``model.summary()``-style table of a `Model`."""

from __future__ import annotations

import math

from convlens.models.network import Model


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def summary_rows(model: Model) -> list[tuple[str, str, tuple, int, list[str]]]:
    """``(name, class, output shape, params, inbound names)`` per top-level layer;
    a nested model is one row carrying its layers' parameter total, as in Keras."""
    shapes = model.output_shapes(batch=1)
    h, w, _ = model.graph.input_shape
    if h is None or w is None:
        # Dimensions that follow the input size print as None, as in Keras.
        other = model.output_shapes(batch=1, size=(model.input_size[0] + 32, model.input_size[1] + 32))
        shapes = {k: tuple(a if a == b else None for a, b in zip(v, other[k])) for k, v in shapes.items()}
    specs = model.variable_specs()
    counts = {name: sum(math.prod(v.shape) for v in vs) for name, vs in specs.items()}
    rows = []
    by_name = model.graph.by_name
    for node in model.graph.nodes:
        if node.scope:
            continue
        n = counts.get(node.name, 0)
        if node.cls in ("Sequential", "Functional"):
            n = sum(c for name, c in counts.items() if by_name[name].scope[:1] == (node.kname,))
        shape = (None, *shapes[node.name][1:])
        inbound = list(node.inputs)
        if node.cls in ("Sequential", "Functional"):
            first = next(m for m in model.graph.nodes if m.scope[:1] == (node.kname,))
            inbound = [i for i in first.inputs if not by_name[i].scope]
        rows.append((node.name, node.cls, shape, n, inbound))
    return rows


def summary(model: Model, width: int = 98) -> str:
    """The table Keras's ``model.summary()`` prints: layer (type), output shape,
    parameter count (and the inbound layers for non-sequential graphs), then totals."""
    rows = summary_rows(model)
    chain = all(len(r[4]) <= 1 for r in rows) and all(
        not r[4] or r[4][0] == rows[i - 1][0] for i, r in enumerate(rows) if i)
    cols = [("Layer (type)", 34), ("Output Shape", 24), ("Param #", 12)]
    if not chain:
        cols.append(("Connected to", max(20, width - 70)))

    def line(cells):
        return " ".join(c.rjust(w) if h == "Param #" else c.ljust(w) for (h, w), c in zip(cols, cells)).rstrip()

    sep = "-" * (sum(w for _, w in cols) + len(cols) - 1)
    lines = [f'Model: "{model.name}"', sep, line([h for h, _ in cols]), sep.replace("-", "=")]
    for name, cls, shape, n, inbound in rows:
        shape_s = "(" + ", ".join("None" if s is None else str(s) for s in shape) + ")"
        label = f"{name} ({cls})"
        # Long names wrap as in Keras: the type goes on a line of its own.
        first, second = (label, None) if len(label) <= cols[0][1] else (name, f"({cls})")
        cells = [first, shape_s, f"{n:,}"]
        if not chain:
            cells.append(", ".join(inbound) if inbound else "-")
        lines.append(line(cells))
        if second:
            lines.append(second)
    lines.append(sep)
    t, nt = model.count_params()
    lines += [f" Total params: {t + nt:,} ({_fmt_bytes(4 * (t + nt))})",
              f" Trainable params: {t:,} ({_fmt_bytes(4 * t)})",
              f" Non-trainable params: {nt:,} ({_fmt_bytes(4 * nt)})"]
    return "\n".join(lines)
