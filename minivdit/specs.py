"""Method specs: one grammar names a guidance method, its parameters and sweeps over them (compare.py, sample.py).

    SPEC   = METHOD ["+stas"] [":" PARAM {"," PARAM}]        specs are separated by ";" (or given one per --method)
    PARAM  = NAME "=" VALUE {"|" VALUE}                      "|" sweeps: one run per value, cross product of lists
    VALUE  = a number, a word (R, A, scaling, ...) or a list: "blocks=1,2" (a piece without "=" continues the value)

    stg:mode=R,blocks=2        stg:mode=A            cfg+stas:alpha=1|2|3,p=8      dg:scale=1|2
    stg:blocks=1,2|3           cfg:guidance_scale=3|5|7                            cfg;dg;stg   (or cfg,dg,stg)

NAME is a parameter of the guidance options table `guidance.OPTIONS` (the one table: option name, type, method
group, help), written without its method prefix (stas_alpha -> alpha, dg_scale -> scale, stg_blocks -> blocks) or in
full (stas_block, dg_block: needed where both methods of a run have it), plus guidance_scale for every method. A spec
without ":" may list several bare methods with commas (the --methods form: 'cfg,cfg+stas,dg').

Each run gets a label, the method then every parameter as written, "_"-joined, list commas as "-":
'cfg+stas:alpha=1|2,p=8' -> 'cfg+stas_alpha=1_p=8', 'cfg+stas_alpha=2_p=8'. Labels name files, grid captions and
table rows; `filename(label)` writes '*' as 'star', '/' as '_'. Errors (ValueError, raised before any model is
loaded): unknown method or parameter, a value of the wrong type, a parameter of another method (named), an ambiguous
short name, duplicate labels.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .guidance import METHODS, OPTIONS, uses

GRAMMAR = "\n\n".join(__doc__.split("\n\n")[1:3])  # the grammar and examples, for --help


@dataclass(frozen=True)
class Spec:
    """One run of a sweep: label, method, STAS on/off and the guidance.OPTIONS overrides ({option name: value})."""
    label: str
    method: str
    stas: bool = False
    params: dict = field(default_factory=dict, compare=False)


def names(method: str, stas: bool) -> dict[str, str | None]:
    """Spec parameter names -> OPTIONS names for a run of `method` (+ STAS): full names and short names (the
    method prefix dropped); a short name two of the run's methods share maps to None (ambiguous)."""
    table: dict[str, str | None] = {"guidance_scale": "guidance_scale"}
    for name, _, group, _ in OPTIONS:
        if uses(method, stas, group):
            short = name.removeprefix(group.replace("-", "_") + "_")
            table[short] = None if short in table and table[short] != name else name
            table[name] = name
    return table


def _convert(option: str, text: str):
    typ = next((t for n, t, _, _ in OPTIONS if n == option), float)
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"bad value {text!r} for {option} ({getattr(typ, '__name__', typ)} expected)") from None


def _method(head: str) -> tuple[str, bool]:
    method, plus, extra = head.strip().partition("+")
    if method not in METHODS or (plus and extra != "stas"):
        raise ValueError(f"unknown method {head.strip()!r}; choose from {', '.join(METHODS)}, each optionally with "
                         "'+stas' (e.g. cfg+stas)")
    return method, bool(plus)


def _params(method: str, stas: bool, body: str, spec: str) -> list[tuple[str, str, list[str]]]:
    """'alpha=1|2,p=8' -> [(option, written name, [values]), ...]."""
    pieces: list[list[str]] = []
    for piece in body.split(","):
        if "=" in piece:
            pieces.append(list(piece.split("=", 1)))
        elif pieces:
            pieces[-1][1] += "," + piece  # a list value: blocks=1,2
        else:
            raise ValueError(f"spec {spec!r}: {piece!r} is not NAME=VALUE (e.g. {method}:guidance_scale=5)")
    table, out = names(method, stas), []
    run = method + ("+stas" if stas else "")
    for name, value in pieces:
        name = name.strip()
        if name not in table:
            owners = sorted({g for n, _, g, _ in OPTIONS if name in (n, n.removeprefix(g.replace("-", "_") + "_"))})
            hint = (f"it belongs to method {' / '.join(map(repr, owners))}" +
                    (" (write <method>+stas)" if "stas" in owners else "")
                    if owners else f"known for {run}: {', '.join(sorted(table))}")
            raise ValueError(f"spec {spec!r}: {run} has no parameter {name!r}; {hint}")
        if table[name] is None:
            both = [n for n in table if n.endswith("_" + name) and table[n] == n]
            raise ValueError(f"spec {spec!r}: {name!r} is ambiguous in {run}; write one of {both}")
        if any(n == table[name] for n, _, _ in out):
            raise ValueError(f"spec {spec!r}: {name!r} given twice")
        values = [v.strip() for v in value.split("|")]
        for v in values:
            try:
                _convert(table[name], v)
            except ValueError as e:
                raise ValueError(f"spec {spec!r}: {e}") from None
        out.append((table[name], name, values))
    return out


def parse_specs(texts: str | list[str]) -> list[Spec]:
    """Method spec strings (each may hold several, ';'-separated) -> the runs they expand to, in order."""
    runs = []
    for text in [texts] if isinstance(texts, str) else texts:
        for spec in (s.strip() for s in text.split(";")):
            if not spec:
                continue
            head, colon, body = spec.partition(":")
            if not colon:  # bare methods, comma separated
                runs += [Spec(h.strip(), *_method(h)) for h in head.split(",") if h.strip()]
                continue
            method, stas = _method(head)
            params = _params(method, stas, body, spec)
            for combo in itertools.product(*[values for _, _, values in params]):
                label = "_".join([head.strip(), *(f"{w}={v.replace(',', '-')}" for (_, w, _), v in zip(params, combo))])
                runs.append(Spec(label, method, stas, {o: _convert(o, v) for (o, _, _), v in zip(params, combo)}))
    if not runs:
        raise ValueError("no method given (e.g. --method cfg or --method 'stg:mode=R|A')")
    labels = [filename(r.label) for r in runs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"duplicate run labels {dup}: give each method / parameter setting once")
    return runs


def filename(label: str) -> str:
    """A run label as a file stem: 'cfg-zero*' -> 'cfg-zerostar'; a '/' (a path value: autoguidance:ag_model=PATH) ->
    '_'."""
    return label.replace("*", "star").replace("/", "_")
