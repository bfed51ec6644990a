#!/usr/bin/env python3
"""Lists import cycles between the library's modules (src/): a module "imports" another when its
file names `crate::a::b` (in a `use` or a path) or `super::x` for a sibling. Prints each cycle
once; exits 1 if there is any. Run: python3 scripts/module_cycles.py"""
import os, re, sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
mods = {}
for dirpath, _, files in os.walk(root):
    for f in files:
        if not f.endswith(".rs"):
            continue
        rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
        if rel[-1] == "mod":
            rel = rel[:-1]
        if rel == ["lib"]:
            continue
        mods["::".join(rel)] = os.path.join(dirpath, f)

def resolve(path):
    """The longest known module that `path` (a::b::c) names."""
    parts = path.split("::")
    for n in range(len(parts), 0, -1):
        m = "::".join(parts[:n])
        if m in mods:
            return m
    return None

def strip(src):
    src = re.sub(r"//[^\n]*", "", src)           # comments, doc comments (doc links are not imports)
    src = re.sub(r'"(\\.|[^"\\])*"', '""', src)  # strings
    # test modules may import freely
    i = src.find("#[cfg(test)]")
    return src if i < 0 else src[:i]

edges = {m: set() for m in mods}
for m, f in mods.items():
    src = strip(open(f, encoding="utf-8").read())
    targets = set()
    # `use crate::{a, b::{c, d}}` groups: expand one level
    for g in re.finditer(r"crate::\{([^;]*?)\};", src, re.S):
        for item in re.split(r",(?![^{]*\})", g.group(1)):
            item = item.strip()
            head = re.match(r"[A-Za-z_][\w:]*", item)
            if head:
                targets.add(head.group(0).rstrip(":"))
    for p in re.finditer(r"crate::([A-Za-z_]\w*(?:::[A-Za-z_]\w*)*)", src):
        targets.add(p.group(1))
    parent = m.rsplit("::", 1)[0] if "::" in m else ""
    for p in re.finditer(r"\bsuper::([A-Za-z_]\w*(?:::[A-Za-z_]\w*)*)", src):
        base = m.rsplit("::", 1)[0]
        # `super` from a file module is its parent module
        parent_of_file = base if not mods[m].endswith("mod.rs") else (base.rsplit("::", 1)[0] if "::" in base else "")
        targets.add((parent_of_file + "::" if parent_of_file else "") + p.group(1))
    for t in targets:
        r = resolve(t)
        # a module naming its own ancestor (e.g. model/x using crate::model::Y re-exported) counts
        if r and r != m and not m.startswith(r + "::") and not r.startswith(m + "::"):
            edges[m].add(r)

# Tarjan's strongly connected components
index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def sc(v):
    index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index:
            sc(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1:
            out.append(sorted(comp))
for v in sorted(mods):
    if v not in index:
        sc(v)
for comp in out:
    inner = [f"{a} -> {b}" for a in comp for b in sorted(edges[a]) if b in comp]
    print("cycle:", ", ".join(comp), "|", "; ".join(inner))
if not out:
    print(f"no import cycles among {len(mods)} modules")
sys.exit(1 if out else 0)
