"""A self-contained interactive HTML flame graph: one file, no network access, data and code inline.

Click a frame to zoom into it (click the top bar or Reset to zoom out), type in Search to highlight
every frame that matches (the share matched is shown), hover for the frame's samples and percent. Given
a baseline it draws a differential flame graph: sized by the newer profile, each frame coloured by how
its share changed (red: more than before, blue: less), both shares in the tooltip.
"""

from __future__ import annotations

import html as html_escape
import json
from typing import Any

from bpfscope.domains.profile.profiles import Profile

# A node: [name, value, children, baseline value] (the last only in a differential graph).
Node = list[Any]


def tree(profile: Profile) -> Node:
    root: Node = ["all", 0, {}, 0]
    for stack, value in profile.stacks().items():
        node = root
        node[1] += value
        for name in stack:
            children = node[2]
            node = children.setdefault(name, [name, 0, {}, 0])
            node[1] += value
    return root


def _add_baseline(node: Node, baseline: Profile, scale: float) -> None:
    """Each node's baseline value, scaled so the two profiles have the same total (normalised)."""
    for stack, value in baseline.stacks().items():
        current: Node | None = node
        node[3] += value * scale
        for name in stack:
            assert current is not None
            current = current[2].get(name)
            if current is None:
                break  # gone in the newer profile: its share shows as less in the parent
            current[3] += value * scale


def _finish(node: Node, diff: bool) -> list[Any]:
    children = sorted(node[2].values(), key=lambda n: n[0])
    out = [node[0], node[1], [_finish(c, diff) for c in children]]
    if diff:
        out.append(round(node[3], 3))
    return out


def html(profile: Profile, title: str = "bpfscope profile", baseline: Profile | None = None) -> str:
    root = tree(profile)
    diff = baseline is not None
    if baseline is not None:
        base_total = sum(baseline.stacks().values())
        _add_baseline(root, baseline, root[1] / base_total if base_total else 0.0)
    data = {
        "title": title,
        "unit": profile.unit,
        "diff": diff,
        "root": _finish(root, diff),
    }
    # </script> cannot appear inside the inline JSON: '<' is escaped.
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return _PAGE.replace("__TITLE__", html_escape.escape(title)).replace("__DATA__", payload)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 12px sans-serif; margin: 8px; }
#bar { display: flex; gap: 8px; align-items: center; margin-bottom: 6px; }
#bar h1 { font-size: 15px; margin: 0 12px 0 0; }
#graph { position: relative; width: 100%; overflow: hidden; }
.f { position: absolute; height: 15px; line-height: 15px; overflow: hidden; white-space: nowrap;
     border-right: 1px solid #fff; box-sizing: border-box; cursor: pointer; padding-left: 2px; }
.f.hit { background: #e040e0 !important; }
#tip { position: fixed; display: none; background: #ffe; border: 1px solid #999; padding: 4px 6px;
       pointer-events: none; max-width: 600px; word-break: break-all; }
#status { color: #555; }
</style></head><body>
<div id="bar"><h1>__TITLE__</h1>
<input id="search" placeholder="Search (regex)" size="30"> <button id="reset">Reset zoom</button>
<span id="status"></span></div>
<div id="graph"></div><div id="tip"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const graph = document.getElementById("graph"), tip = document.getElementById("tip");
const status = document.getElementById("status"), search = document.getElementById("search");
const ROW = 16, MIN_PX = 0.5;
const total = data.root[1] || 1;
let focus = data.root, path = [data.root];

function hue(name) {
  let h = 0;
  for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
  return h;
}
function color(node) {
  if (!data.diff) {
    const h = hue(node[0]);
    if (node[0].endsWith("_[k]")) return `rgb(${200 + h % 55},${120 + h % 60},${60 + h % 40})`;
    return `rgb(${205 + h % 50},${80 + h % 120},${40 + (h >> 8) % 40})`;
  }
  const before = node[3], after = node[1];
  const delta = (after - before) / total;  // share of the whole that moved
  const k = Math.min(1, Math.abs(delta) * 20);
  const c = Math.round(255 - 155 * k);
  return delta >= 0 ? `rgb(255,${c},${c})` : `rgb(${c},${c},255)`;
}
function pct(v) { return (100 * v / total).toFixed(2) + "%"; }
function describe(node) {
  let text = `${node[0]}\\n${node[1]} ${data.unit} (${pct(node[1])})`;
  if (data.diff) {
    const d = 100 * (node[1] - node[3]) / total;
    text += `\\nbefore ${pct(node[3])}, after ${pct(node[1])}: ${d >= 0 ? "+" : ""}${d.toFixed(2)} points`;
  }
  return text;
}
function draw() {
  graph.textContent = "";
  const width = graph.clientWidth;
  let depth = 0;
  const frag = document.createDocumentFragment();
  function box(node, x, w, level) {
    const div = document.createElement("div");
    div.className = "f";
    div.style.left = x + "px"; div.style.width = w + "px"; div.style.top = level * ROW + "px";
    div.style.background = color(node);
    div.textContent = w > 30 ? node[0] : "";
    div.onclick = () => zoom(node);
    div.onmousemove = (e) => { tip.style.display = "block"; tip.style.left = e.clientX + 12 + "px";
      tip.style.top = e.clientY + 12 + "px"; tip.innerText = describe(node); };
    div.onmouseout = () => { tip.style.display = "none"; };
    div.node = node;
    frag.appendChild(div);
    depth = Math.max(depth, level + 1);
  }
  path.forEach((node, i) => box(node, 0, width, i));
  const scale = width / (focus[1] || 1);
  function walk(node, x, level) {
    let cx = x;
    for (const child of node[2]) {
      const w = child[1] * scale;
      if (w >= MIN_PX) { box(child, cx, w, level); walk(child, cx, level + 1); }
      cx += w;
    }
  }
  walk(focus, 0, path.length);
  graph.appendChild(frag);
  graph.style.height = depth * ROW + "px";
  highlight();
}
function zoom(node) {
  const trail = [];
  (function find(n) {
    trail.push(n);
    if (n === node) return true;
    for (const c of n[2]) if (find(c)) return true;
    trail.pop(); return false;
  })(data.root);
  focus = node; path = trail; draw();
}
function highlight() {
  let re = null;
  try { re = search.value ? new RegExp(search.value) : null; } catch (e) { re = null; }
  let matched = 0;
  (function count(n, counted) {
    const hit = re && re.test(n[0]);
    if (hit && !counted) matched += n[1];
    for (const c of n[2]) count(c, counted || hit);
  })(data.root, false);
  for (const div of graph.children) div.classList.toggle("hit", !!(re && re.test(div.node[0])));
  status.textContent = `${total} ${data.unit}` + (re ? `, matched ${pct(matched)}` : "") +
    (data.diff ? " (red: more than before, blue: less)" : "");
}
search.oninput = highlight;
document.getElementById("reset").onclick = () => { focus = data.root; path = [data.root]; draw(); };
window.onresize = draw;
draw();
</script></body></html>
"""
