"""Mermaid rendering of a saga: the forward DAG and the compensation precedence."""

from __future__ import annotations

from saga_core.definition import SagaDefinition


def _id(name: str) -> str:
    return "s_" + "".join(c if c.isalnum() else "_" for c in name)


def render_mermaid(definition: SagaDefinition) -> str:
    """A Mermaid ``flowchart`` with two subgraphs.

    *Forward*: the step DAG (pivot and retriable steps marked). *Compensation*: the edges of
    ``P`` that are not implied by others (explicit ones solid, default ones dashed) and the
    default edges an explicit order dropped (dotted, labelled ``dropped``).
    """
    g = definition.graph
    kinds = {s.name: s.kind for s in definition.steps}
    lines = ["flowchart TB", '  subgraph forward["forward"]', "    direction TB"]
    for s in definition.order:
        label = s if kinds[s] == "compensatable" else f"{s} ({kinds[s]})"
        lines.append(f'    {_id(s)}["{label}"]')
    for s in definition.order:
        for d in g.depends_on[s]:
            lines.append(f"    {_id(d)} --> {_id(s)}")
    lines.append("  end")
    lines += [
        '  subgraph compensation["compensation (comp(a) before comp(b))"]',
        "    direction TB",
    ]
    comps = [s for s in definition.order if s in g.compensatable]
    for s in comps:
        lines.append(f'    c_{_id(s)}(["undo {s}"])')
    # Show only covering edges of P: an edge implied through another step adds nothing to read.
    for t, s in sorted(g.precedence):
        implied = any((t, m) in g.precedence and (m, s) in g.precedence for m in comps)
        if implied:
            continue
        arrow = "-->" if (t, s) in g.explicit else "-.->"
        lines.append(f"    c_{_id(t)} {arrow} c_{_id(s)}")
    for b, a in sorted(g.dropped):
        lines.append(f'    c_{_id(b)} -. "dropped: explicit order wins" .-x c_{_id(a)}')
    lines.append("  end")
    return "\n".join(lines) + "\n"
