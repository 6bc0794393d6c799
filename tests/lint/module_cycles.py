#!/usr/bin/env python3
"""Fails when modules of a crate depend on each other in a cycle.

Usage: module_cycles.py CRATE_SRC_DIR [...]

A module here is a file under src/ (a folder's mod.rs is the folder), taken at two
depths: top-level modules (`dataset`, `method`, ...) and, inside each, their children
(`method::stage1`, ...). A module depends on another when its non-test code names it
(`crate::x::...`, `use crate::{x, ...}`, `super::x`). Test code (everything from the
first `#[cfg(test)]` of a file, and files named test_support.rs) is left out: tests may
reach anywhere. Binaries (src/bin, main.rs) are roots and cannot be part of a cycle
with the library, so they are skipped too.
"""
import os
import re
import sys


def modules(src):
    """(path, module path as a list) of every library source file under src."""
    for folder, _, files in os.walk(src):
        rel_folder = os.path.relpath(folder, src)
        if rel_folder.split(os.sep)[0] == "bin":
            continue
        for name in files:
            if not name.endswith(".rs") or name in ("lib.rs", "main.rs", "test_support.rs"):
                continue
            parts = [] if rel_folder == "." else rel_folder.split(os.sep)
            stem = name[:-3]
            if stem != "mod":
                parts.append(stem)
            yield os.path.join(folder, name), parts


def non_test_code(text):
    text = re.sub(r"//[^\n]*", "", text)
    cut = text.find("#[cfg(test)]")
    return text if cut < 0 else text[:cut]


def references(code, own):
    """Module paths (lists) that `code` of module `own` names."""
    found = []
    for m in re.finditer(r"\bcrate::((?:\w+::)*\w+)", code):
        found.append(m.group(1).split("::"))
    for m in re.finditer(r"\bcrate::\{([^}]*)\}", code):
        for item in m.group(1).split(","):
            item = item.strip()
            if item:
                found.append(item.split("::"))
    for m in re.finditer(r"\bsuper::((?:\w+::)*\w+)", code):
        found.append(own[:-1] + m.group(1).split("::"))
    return found


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def check(src):
    files = list(modules(src))
    known = {tuple(parts) for _, parts in files}
    problems = []
    for depth in (1, 2):
        edges = {}
        for path, parts in files:
            if len(parts) < depth:
                continue
            me = tuple(parts[:depth])
            with open(path, encoding="utf-8") as f:
                code = non_test_code(f.read())
            for ref in references(code, parts):
                target = tuple(ref[:depth])
                if len(target) < depth or target == me or target not in known:
                    continue
                # At depth 2 only siblings inside the same top-level module count;
                # dependencies across top-level modules are depth 1's business.
                if depth == 2 and target[0] != me[0]:
                    continue
                edges.setdefault(me, set()).add(target)
        for component in cycles(edges):
            names = ["::".join(c) for c in component]
            detail = "; ".join(
                f"{'::'.join(a)} -> {', '.join('::'.join(b) for b in sorted(edges[a]) if b in component)}"
                for a in component
            )
            problems.append(f"{src}: modules in a cycle: {', '.join(names)} ({detail})")
    return problems, len(files)


def main():
    problems = []
    for src in sys.argv[1:]:
        found, count = check(src)
        problems.extend(found)
        print(f"{src}: {count} modules, {len(found)} cycles")
    for p in problems:
        print(p, file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
