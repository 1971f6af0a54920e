#!/usr/bin/env python3
"""Import cycles between a Rust crate's top-level modules.

Usage: scripts/cycles.py [SRC_DIR] [--with-tests] [--edges]

Reads SRC_DIR/**/*.rs (default: ./src), maps each file to its top-level
module (src/foo.rs and src/foo/... -> foo; lib.rs is the crate root, main.rs and src/bin/ are other
crates and are skipped), and collects every reference to another top-level module: `crate::bar...`,
`crate::{bar::X, baz}` groups and `super::` chains that climb out of the module, in `use`
statements and in paths anywhere in the code. Comments, doc comments and string literals are not
references. Items under `#[cfg(test)]` (test modules, test-only files declared `#[cfg(test)] mod x;`)
are left out unless --with-tests is given: test code may reach anywhere.

It builds the directed graph between top-level modules and prints every strongly connected component
of more than one module, with its elementary cycles (up to 20 per component) and, for each edge of
a cycle, the first place that makes it (file:line). Exit 1 when there is a cycle, else prints
"no cycles (N modules, M edges)" and exits 0. --edges also prints the whole edge list.
"""
import os
import re
import sys
from collections import defaultdict

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_code(text):
    """Blank comments, string, byte-string, raw-string and char literals (newlines kept, so line
    numbers stay), leaving only code."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        nxt = text[i + 1] if i + 1 < n else ""
        if c == "/" and nxt == "/":
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif c == "/" and nxt == "*":
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth += 1
                    j += 2
                elif text.startswith("*/", j):
                    depth -= 1
                    j += 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif (c == "r" or (c == "b" and nxt == "r")) and re.match(r"b?r#*\"", text[i:i + 260]) \
                and not (i > 0 and re.match(r"[A-Za-z0-9_]", text[i - 1])):
            m = re.match(r"b?r(#*)\"", text[i:])
            close = '"' + m.group(1)
            j = text.find(close, i + m.end())
            j = n if j < 0 else j + len(close)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"' or (c == "b" and nxt == '"' and not (i > 0 and re.match(r"[A-Za-z0-9_]", text[i - 1]))):
            j = i + (2 if c == "b" else 1)
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j = min(n, j + 1)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "'":
            # a char literal ('x', '\n', '\u{1F600}', b'x') and not a lifetime ('a, 'static)
            m = re.match(r"'(\\u\{[0-9A-Fa-f]+\}|\\x[0-9A-Fa-f]{2}|\\.|[^\\'\n])'", text[i:])
            if m:
                out.append(" " * m.end())
                i += m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching(code, open_pos):
    """Index just past the brace that closes the one at open_pos."""
    depth = 0
    for j in range(open_pos, len(code)):
        if code[j] == "{":
            depth += 1
        elif code[j] == "}":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(code)


def blank(code, a, b):
    return code[:a] + re.sub(r"[^\n]", " ", code[a:b]) + code[b:]


def drop_cfg_test(code):
    """Blank every item under #[cfg(test)]; return (code, names of `#[cfg(test)] mod x;` files)."""
    test_mods = []
    pat = re.compile(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")
    pos = 0
    while True:
        m = pat.search(code, pos)
        if not m:
            return code, test_mods
        j = m.end()
        # further attributes before the item
        while True:
            a = re.match(r"\s*#\s*\[", code[j:])
            if not a:
                break
            k = j + a.end() - 1
            depth = 0
            while k < len(code):
                if code[k] == "[":
                    depth += 1
                elif code[k] == "]":
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            j = k + 1
        semi = code.find(";", j)
        brace = code.find("{", j)
        if brace != -1 and (semi == -1 or brace < semi):
            end = matching(code, brace)
        else:
            end = len(code) if semi == -1 else semi + 1
            mm = re.match(r"\s*(?:pub(?:\s*\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", code[j:end])
            if mm:
                test_mods.append(mm.group(1))
        code = blank(code, m.start(), end)
        pos = m.start() + 1


def inline_mods(code):
    """[(start, end, name)] of inline `mod name { ... }` blocks."""
    out = []
    for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*\{", code):
        b = m.end() - 1
        out.append((b, matching(code, b), m.group(1)))
    return out


def group_heads(code, open_pos):
    """First path segment of each entry of a `{a::b, c, d::{e}}` use group."""
    end = matching(code, open_pos)
    body = code[open_pos + 1:end - 1]
    heads, depth, cur = [], 0, []
    for ch in body + ",":
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            entry = "".join(cur).strip()
            m = re.match(IDENT, entry)
            if m:
                heads.append(m.group(0))
            cur = []
        else:
            cur.append(ch)
    return heads


def module_path(rel):
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    return parts


def scan(src, with_tests):
    files = []
    for root, dirs, names in os.walk(src):
        dirs.sort()
        for nm in sorted(names):
            if nm.endswith(".rs"):
                files.append(os.path.relpath(os.path.join(root, nm), src))
    files = [f for f in files if f != "main.rs" and not f.startswith("bin" + os.sep)]
    tops = set()
    for f in files:
        if f != "lib.rs":
            tops.add(module_path(f)[0])
    test_files = set()
    cleaned = {}
    for f in files:
        with open(os.path.join(src, f), encoding="utf-8", errors="replace") as fh:
            code = strip_code(fh.read())
        if not with_tests:
            code, tmods = drop_cfg_test(code)
            base = os.path.dirname(f) if os.path.basename(f) in ("lib.rs", "mod.rs") else f[:-3]
            for t in tmods:
                for cand in (os.path.join(base, t + ".rs"), os.path.join(base, t, "mod.rs")):
                    test_files.add(os.path.normpath(cand))
        cleaned[f] = code
    # a test-only module takes its files and its directory's files with it
    test_dirs = {os.path.dirname(t) if t.endswith(os.sep + "mod.rs") else t[:-3] for t in test_files}

    def test_only(f):
        return f in test_files or any(f.startswith(d + os.sep) for d in test_dirs)
    edges = defaultdict(list)  # (a, b) -> [(file, line, text)]
    for f, code in cleaned.items():
        if test_only(f):
            continue
        mpath = [] if f == "lib.rs" else module_path(f)
        if not mpath:
            continue  # the crate root is not a node
        me = mpath[0]
        mods = inline_mods(code)
        for m in re.finditer(r"(?<![A-Za-z0-9_$])(crate\s*::|(?:super\s*::\s*)+)\s*", code):
            word = m.group(1)
            if word.startswith("crate"):
                base = []
            else:
                ups = word.count("super")
                here = mpath + [name for (a, b, name) in mods if a < m.start() < b]
                if ups > len(here):
                    continue
                base = here[:len(here) - ups]
            rest = code[m.end():]
            if rest.startswith("{"):
                heads = group_heads(code, m.end())
            else:
                h = re.match(IDENT, rest)
                heads = [h.group(0)] if h else []
            for head in heads:
                if head in ("self", "super", "crate"):
                    full = base
                else:
                    full = base + [head]
                if not full:
                    continue
                target = full[0]
                if target not in tops or target == me:
                    continue
                line_no = code.count("\n", 0, m.start()) + 1
                if len(edges[(me, target)]) < 3:
                    with open(os.path.join(src, f), encoding="utf-8", errors="replace") as fh:
                        src_line = fh.read().splitlines()[line_no - 1].strip()
                    edges[(me, target)].append((f, line_no, src_line[:100]))
    return tops, edges


def sccs(nodes, adj):
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(adj[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def simple_cycles(comp, adj, limit=20):
    comp_set = set(comp)
    found = []
    order = sorted(comp)
    for i, start in enumerate(order):
        allowed = set(order[i:])
        path = [start]

        def dfs(v):
            if len(found) >= limit:
                return
            for w in sorted(adj[v]):
                if w not in comp_set or w not in allowed:
                    continue
                if w == start:
                    found.append(path + [start])
                elif w not in path:
                    path.append(w)
                    dfs(w)
                    path.pop()
        dfs(start)
    return sorted(found, key=lambda c: (len(c), c))


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    with_tests = "--with-tests" in sys.argv
    src = args[0] if args else os.path.join(os.getcwd(), "src")
    if not os.path.isdir(src):
        print(f"no source directory at {src}")
        return 2
    tops, edges = scan(src, with_tests)
    adj = defaultdict(set)
    for (a, b) in edges:
        adj[a].add(b)
    if "--edges" in sys.argv:
        for (a, b), ev in sorted(edges.items()):
            f, ln, txt = ev[0]
            print(f"edge {a} -> {b}: src/{f}:{ln} {txt}")
    bad = [c for c in sccs(tops, adj) if len(c) > 1]
    scope = "with tests" if with_tests else "without #[cfg(test)] code"
    if not bad:
        print(f"no cycles ({len(tops)} modules, {len(edges)} edges, {scope})")
        return 0
    ncyc = 0
    for comp in bad:
        print(f"strongly connected: {', '.join(comp)}")
        for cyc in simple_cycles(comp, adj):
            ncyc += 1
            print("cycle: " + " -> ".join(cyc))
            for a, b in zip(cyc, cyc[1:]):
                f, ln, txt = edges[(a, b)][0]
                print(f"    {a} -> {b}: src/{f}:{ln}  {txt}")
    print(f"{ncyc} cycle(s) in {len(bad)} component(s) ({len(tops)} modules, {len(edges)} edges, {scope})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
