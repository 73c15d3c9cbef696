"""A self-contained interactive HTML page of one model: a playground that runs the model in the page on any
prompt (picollm/interp/playground.py), attention of every layer and head on chosen examples (hover a token to
see where it attends, CircuitsVis-style) and the MLP neurons' family means.

One file, no network: the CSS and script are inline and the data is embedded JSON, so it opens from
MLflow's artifact viewer or from disk. Nothing in it may reference another resource; `external_refs`
is the check (used by the tests).
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field

import torch

from picollm.interp.playground import Playground, script

_EXTERNAL = re.compile(r"https?:|//cdn|(?:src|href)\s*=\s*[\"']?(?!#)[^\"'\s>]", re.IGNORECASE)


def external_refs(text: str) -> list[str]:
    """Every match of a URL scheme, a CDN reference or a src/href to anything but an in-page anchor."""
    return [m.group(0) for m in _EXTERNAL.finditer(text)]


@dataclass
class Example:
    family: str
    tokens: list[int]
    pattern: torch.Tensor  # (L, H, n, n)


@dataclass
class NeuronRow:
    layer: int
    neuron: int
    means: list[float]  # per family
    si: float
    preferred: str


@dataclass
class ViewData:
    title: str
    attention: str
    pattern_label: str  # what the heads' matrices are (the mixer's `pattern_label`)
    families: list[str]
    examples: list[Example]
    neurons: list[NeuronRow] = field(default_factory=list)
    playground: Playground | None = None  # None: no playground section


def _payload(d: ViewData) -> str:
    data = {
        "title": d.title,
        "attention": d.attention,
        "families": d.families,
        "examples": [
            {
                "family": e.family,
                "tokens": [int(t) for t in e.tokens],
                "pattern": [
                    [[[round(float(v), 4) for v in row] for row in head] for head in layer] for layer in e.pattern
                ],
            }
            for e in d.examples
        ],
        "neurons": [
            {
                "layer": r.layer,
                "neuron": r.neuron,
                "means": [round(float(m), 4) for m in r.means],
                "si": round(float(r.si), 4),
                "pref": r.preferred,
            }
            for r in d.neurons
        ],
    }
    # "</" inside a script element would end it early
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 6px} h3{font-size:14px;margin:14px 0 4px}
.note{color:#666;font-size:13px;margin:2px 0 10px}
.controls{display:flex;gap:14px;align-items:center;flex-wrap:wrap;margin:6px 0}
select,input{font-size:13px}
.tokens{display:flex;flex-wrap:wrap;gap:3px;margin:10px 0}
.tok{min-width:30px;padding:4px 3px;border:1px solid #bbb;border-radius:3px;text-align:center;
 font-family:monospace;font-size:14px;cursor:pointer;position:relative}
.tok .w{display:block;font-size:9px;color:#555;height:11px}
.tok.q{outline:2px solid #d62728}
table.grid{border-collapse:collapse;font-family:monospace;font-size:11px}
table.grid td,table.grid th{border:1px solid #eee;padding:2px 4px;text-align:center;min-width:22px}
table.grid th{background:#f6f6f6;font-weight:600}
.row-sel{background:#fff4d6}
#neurons td.lbl{text-align:left;white-space:nowrap}
#pg-prompt{width:min(760px,95%);font-family:monospace;font-size:14px;padding:4px}
.pg-cols{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
.pg-cols>div{min-width:300px}
.pg-bar{display:flex;align-items:center;gap:6px;font-family:monospace;font-size:12px;margin:2px 0}
.pg-lbl{width:70px;text-align:right} .pg-val{width:50px;color:#555}
.pg-track{display:inline-block;width:180px;height:12px;background:#f1f1f1}
.pg-fill{display:block;height:12px;background:#1f77b4}
#pg-heads{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0}
.pg-head{border:1px solid #ddd;padding:3px;cursor:pointer} .pg-head.sel{border-color:#d62728}
.pg-head canvas{display:block;image-rendering:pixelated}
.pg-cap{font-size:11px;color:#444;margin-bottom:2px}
#pg-lens td.lbl{text-align:left;white-space:nowrap}
"""

_JS = r"""
(function () {
  var D = JSON.parse(document.getElementById("picollm-data").textContent);
  var ex = 0, layer = 0, head = 0, query = null;
  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function shade(rgb, w) { return "rgba(" + rgb + "," + Math.max(0, Math.min(1, w)).toFixed(3) + ")"; }
  function options(sel, values, labels) {
    sel.innerHTML = "";
    values.forEach(function (v, i) { var o = el("option", "", labels[i]); o.value = v; sel.appendChild(o); });
  }
  function example() { return D.examples[ex]; }
  function nLayers() { return D.examples.length ? example().pattern.length : 0; }
  function nHeads() { return nLayers() ? example().pattern[0].length : 0; }
  function range(n) { var r = []; for (var i = 0; i < n; i++) { r.push(i); } return r; }

  function fillHeads() {
    options($("layer"), range(nLayers()), range(nLayers()).map(function (i) { return "layer " + i; }));
    options($("head"), range(nHeads()), range(nHeads()).map(function (j) { return "head " + j; }));
    $("layer").value = layer;
    $("head").value = head;
  }

  /* The selected head: hovering token q colours every key k <= q by the weight q puts on it. */
  function drawTokens() {
    var box = $("tokens");
    box.innerHTML = "";
    if (!D.examples.length) { return; }
    var e = example(), P = e.pattern[layer][head];
    e.tokens.forEach(function (t, k) {
      var d = el("div", k === query ? "tok q" : "tok"), w = el("span", "w", "");
      d.appendChild(w);
      d.appendChild(el("span", "", String(t)));
      if (query !== null && k <= query) {
        d.style.background = shade("31,119,180", P[query][k]);
        w.textContent = P[query][k].toFixed(2);
      }
      d.addEventListener("mouseenter", function () { query = k; drawTokens(); drawAll(); });
      box.appendChild(d);
    });
    $("qinfo").textContent = query === null ? "hover a token" :
      "query position " + query + " (token " + e.tokens[query] + "), layer " + layer + " head " + head;
  }

  /* Every head at once, for the hovered query: one row per head, one column per key. */
  function drawAll() {
    var tb = $("allheads");
    tb.innerHTML = "";
    if (!D.examples.length) { return; }
    var e = example(), q = query === null ? e.tokens.length - 1 : query, hr = el("tr");
    hr.appendChild(el("th", "", "head / key"));
    e.tokens.forEach(function (t, k) { hr.appendChild(el("th", "", k + ":" + t)); });
    tb.appendChild(hr);
    range(nLayers()).forEach(function (i) {
      range(nHeads()).forEach(function (j) {
        var tr = el("tr", i === layer && j === head ? "row-sel" : "");
        tr.appendChild(el("th", "", "L" + i + "H" + j));
        e.tokens.forEach(function (t, k) {
          var v = k <= q ? e.pattern[i][j][q][k] : null, td = el("td", "", v === null ? "" : v.toFixed(2));
          if (v !== null) { td.style.background = shade("31,119,180", v); if (v > 0.6) { td.style.color = "#fff"; } }
          tr.appendChild(td);
        });
        tr.addEventListener("click", function () {
          layer = i; head = j; $("layer").value = i; $("head").value = j; drawTokens(); drawAll();
        });
        tb.appendChild(tr);
      });
    });
    $("allinfo").textContent = "attention from query position " + q + " (token " + e.tokens[q] +
      ") in every head; click a row to select that head above";
  }

  /* Neurons, most selective first; each row coloured from its lowest to its highest family mean. */
  function drawNeurons() {
    var tb = $("neurons"), lf = $("nlayer").value, lim = parseInt($("nlimit").value, 10) || 40;
    tb.innerHTML = "";
    var rows = D.neurons.filter(function (r) { return lf === "all" || String(r.layer) === lf; });
    rows.sort(function (a, b) { return b.si - a.si; });
    rows = rows.slice(0, lim);
    var hr = el("tr");
    ["neuron", "SI", "preferred"].concat(D.families).forEach(function (h) { hr.appendChild(el("th", "", h)); });
    tb.appendChild(hr);
    rows.forEach(function (r) {
      var tr = el("tr");
      tr.appendChild(el("td", "lbl", "L" + r.layer + " N" + r.neuron));
      tr.appendChild(el("td", "", r.si.toFixed(2)));
      tr.appendChild(el("td", "", r.pref));
      var lo = Math.min.apply(null, r.means), hi = Math.max.apply(null, r.means);
      r.means.forEach(function (m) {
        var td = el("td", "", m.toFixed(3)), a = hi > lo ? (m - lo) / (hi - lo) : 0;
        td.style.background = shade("214,39,40", a);
        if (a > 0.6) { td.style.color = "#fff"; }
        tr.appendChild(td);
      });
      tb.appendChild(tr);
    });
    $("ninfo").textContent = rows.length + " of " + D.neurons.length + " neurons shown";
  }

  var layers = [];
  D.neurons.forEach(function (r) { if (layers.indexOf(r.layer) < 0) { layers.push(r.layer); } });
  var layerNames = layers.map(function (l) { return "layer " + l; });
  options($("nlayer"), ["all"].concat(layers), ["all layers"].concat(layerNames));
  options($("ex"), range(D.examples.length), D.examples.map(function (e) {
    return e.family + " (" + e.tokens.length + " tokens)";
  }));
  $("ex").addEventListener("change", function () {
    ex = parseInt($("ex").value, 10);
    query = example().tokens.length - 1;
    layer = Math.min(layer, nLayers() - 1);
    head = Math.min(head, nHeads() - 1);
    fillHeads(); drawTokens(); drawAll();
  });
  $("layer").addEventListener("change", function () {
    layer = parseInt($("layer").value, 10); drawTokens(); drawAll();
  });
  $("head").addEventListener("change", function () {
    head = parseInt($("head").value, 10); drawTokens(); drawAll();
  });
  $("nlayer").addEventListener("change", drawNeurons);
  $("nlimit").addEventListener("input", drawNeurons);
  $("title").textContent = D.title;
  if (D.examples.length) { query = example().tokens.length - 1; }
  fillHeads(); drawTokens(); drawAll(); drawNeurons();
})();
"""


def _playground(pg: Playground | None) -> str:
    """The playground section: the controls and its data and script, or the line saying why there is none."""
    if pg is None:
        return ""
    if pg.payload is None:
        return f'<h2>Playground</h2>\n<div class="note" id="pg-unsupported">{html.escape(pg.unsupported or "")}</div>\n'
    return f"""<h2>Playground</h2>
<div class="note">Type token ids (spaces or commas): the model runs in this page on every keystroke, from the
{pg.n_params:,} weights embedded in it (float32), no server.</div>
<input id="pg-prompt" aria-label="prompt token ids"><div class="note" id="pg-status"></div>
<div class="pg-cols"><div><h3>Next token (top 10)</h3><div id="pg-next"></div></div>
<div><h3>Top MLP neurons at the last position</h3><div id="pg-neurons"></div></div></div>
<h3>Mixing weights of every head (click one for its numbers)</h3>
<div id="pg-heads"></div><div class="note" id="pg-headinfo"></div>
<table class="grid" id="pg-pattern"></table>
<h3>Logit lens at the last position</h3>
<div class="note">Each site's residual stream through the final norm and the head.</div>
<table class="grid" id="pg-lens"></table>
<script type="application/json" id="playground-data">{pg.payload}</script>
<script>{script()}</script>
"""


def render(d: ViewData) -> str:
    """The whole page as one string."""
    what = f"{html.escape(d.attention)} attention ({html.escape(d.pattern_label)})"
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(d.title)}</title>
<style>{_CSS}</style></head><body>
<h1 id="title"></h1>
<div class="note">{what}; every number is embedded in this page.</div>
{_playground(d.playground)}<h2>Attention on examples</h2>
<div class="controls"><label>example <select id="ex"></select></label>
<label><select id="layer"></select></label><label><select id="head"></select></label></div>
<div class="note" id="qinfo"></div>
<div class="tokens" id="tokens"></div>
<div class="note" id="allinfo"></div>
<table class="grid" id="allheads"></table>
<h2>MLP neurons: mean activation per family</h2>
<div class="controls"><label><select id="nlayer"></select></label>
<label>rows <input id="nlimit" type="number" min="1" value="40" style="width:60px"></label></div>
<div class="note" id="ninfo"></div>
<table class="grid" id="neurons"></table>
<script type="application/json" id="picollm-data">{_payload(d)}</script>
<script>{_JS}</script>
</body></html>
"""
    return body
