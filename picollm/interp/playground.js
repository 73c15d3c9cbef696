/* picollm's playground: the model's forward pass in the page (inlined by picollm/interp/playground.py).
 * It mirrors picollm/model/transformer.py and the mixers that declare a `js_kernel` (softmax: softmax
 * attention with the ALiBi bias and an optional window; kernel: linear attention with elu+1 or relu features,
 * a constant decay, the denominator or the per-head RMSNorm), every position at once, in float64 from the
 * float32 weights. "#selftest=1,2,3;4,5" in the URL writes every prompt's logits (N x vocab) and patterns
 * (L x H x N x N) as JSON into #playground-selftest (tests/test_playground.py compares them with PyTorch's). */
(function () {
  "use strict";
  var node = document.getElementById("playground-data");
  if (!node) { return; }
  var P = JSON.parse(node.textContent), C = P.cfg, M = C.mixer;
  var d = C.d_model, H = C.n_heads, dh = C.d_head, V = C.vocab_size;

  function decode(b64) {
    var s = b64.replace(/-/g, "+").replace(/_/g, "/");
    while (s.length % 4) { s += "="; }
    var bin = atob(s), n = bin.length, buf = new ArrayBuffer(n), u8 = new Uint8Array(buf), i;
    for (i = 0; i < n; i++) { u8[i] = bin.charCodeAt(i); }
    var view = new DataView(buf), out = new Float64Array(n / 4);
    for (i = 0; i < n / 4; i++) { out[i] = view.getFloat32(4 * i, true); }
    return out;
  }
  var W = {};
  Object.keys(P.w).forEach(function (k) { W[k] = decode(P.w[k][1]); });
  var HEAD = C.tied ? W["embed.weight"] : W["head.weight"];

  // -- the maths -------------------------------------------------------------------------------------
  function zeros(n, m) { var r = []; for (var i = 0; i < n; i++) { r.push(new Float64Array(m)); } return r; }
  /* x (N rows of `inp`) @ w^T + b, w (out, inp) row-major as torch's nn.Linear. */
  function linear(x, w, b, out) {
    var inp = x[0].length, y = zeros(x.length, out);
    for (var i = 0; i < x.length; i++) {
      var xi = x[i], yi = y[i];
      for (var o = 0; o < out; o++) {
        var s = b ? b[o] : 0, off = o * inp;
        for (var k = 0; k < inp; k++) { s += xi[k] * w[off + k]; }
        yi[o] = s;
      }
    }
    return y;
  }
  function layerNorm(x, w, b) {
    return x.map(function (r) {
      var n = r.length, mu = 0, v = 0, i, y = new Float64Array(n);
      for (i = 0; i < n; i++) { mu += r[i]; }
      mu /= n;
      for (i = 0; i < n; i++) { v += (r[i] - mu) * (r[i] - mu); }
      var inv = 1 / Math.sqrt(v / n + C.ln_eps);
      for (i = 0; i < n; i++) { y[i] = (r[i] - mu) * inv * w[i] + b[i]; }
      return y;
    });
  }
  /* erf to float64 accuracy: its Maclaurin series below 3, the continued fraction of erfc above. */
  function erf(x) {
    var a = Math.abs(x), s;
    if (a < 3) {
      var term = a, sum = a, n = 0;
      while (Math.abs(term) > 1e-17 * Math.abs(sum)) { n++; term *= -a * a / n; sum += term / (2 * n + 1); }
      s = 2 / Math.sqrt(Math.PI) * sum;
    } else {
      var f = 0;
      for (var k = 60; k >= 1; k--) { f = k / 2 / (a + f); }
      s = 1 - Math.exp(-a * a) / Math.sqrt(Math.PI) / (a + f);
    }
    return x < 0 ? -s : s;
  }
  function gelu(x) { return 0.5 * x * (1 + erf(x / Math.SQRT2)); }
  function phi(x) {
    if (M.feature_map === "relu") { return x > 0 ? x : 0; }
    return x > 0 ? x + 1 : Math.exp(x);  // elu(x) + 1
  }
  /* 0.02 * sinusoidal(pos) as positions.py computes it in float32 */
  function sinusoid(pos) {
    var half = Math.floor(d / 2), e = new Float64Array(d), f32 = Math.fround;
    for (var j = 0; j < half; j++) {
      var fr = f32(Math.exp(f32(f32(-Math.log(10000) * j) / half))), ang = f32(pos * fr);
      e[j] = f32(0.02 * f32(Math.sin(ang)));
      e[half + j] = f32(0.02 * f32(Math.cos(ang)));
    }
    return e;
  }

  /* The mixer of one layer: h (N, d) normalised input -> head outputs z (N, H * dh) and the patterns A[h][i][j]. */
  function mix(l, h, mask) {
    var n = h.length, pre = "blocks." + l + ".attn.", i, j, e, hd;
    if (M.short_conv) {  // h + sum_i w[:, i] * h_{t-i} over masked inputs (short_conv.py)
      var cw = W[pre + "conv.weight"], kw = M.short_conv;
      h = h.map(function (r, t) {
        var y = Float64Array.from(r);
        for (var c = 0; c < d; c++) {
          for (var s = 0; s < kw && s <= t; s++) { if (mask[t - s]) { y[c] += cw[c * kw + s] * h[t - s][c]; } }
        }
        return y;
      });
    }
    var qkv = linear(h, W[pre + "qkv.weight"], null, 3 * H * dh), z = zeros(n, H * dh), pats = [];
    for (hd = 0; hd < H; hd++) {
      var q = [], k = [], v = [], A = zeros(n, n), slope = P.slopes[hd];
      for (i = 0; i < n; i++) {
        q.push(qkv[i].subarray(hd * dh, (hd + 1) * dh));
        k.push(qkv[i].subarray((H + hd) * dh, (H + hd + 1) * dh));
        v.push(qkv[i].subarray((2 * H + hd) * dh, (2 * H + hd + 1) * dh));
      }
      if (M.kernel === "softmax") {
        for (i = 0; i < n; i++) {
          var mx = -Infinity, tot = 0;
          for (j = 0; j <= i; j++) {
            A[i][j] = -Infinity;
            if (!(mask[j] || j === i) || (M.window !== null && i - j >= M.window)) { continue; }
            var sc = 0;
            for (e = 0; e < dh; e++) { sc += q[i][e] * k[j][e]; }
            A[i][j] = sc / Math.sqrt(dh) - slope * (i - j);
            mx = Math.max(mx, A[i][j]);
          }
          for (j = 0; j <= i; j++) { A[i][j] = Math.exp(A[i][j] - mx); tot += A[i][j]; }
          for (j = 0; j <= i; j++) { A[i][j] /= tot; }
        }
      } else {  // kernel: (phi(q_i).phi(k_j)) g^(i-j), normalised by the row sum or by the output's RMS
        var fq = q.map(function (r) { return r.map(phi); });
        var fk = k.map(function (r, t) { return r.map(function (x) { return mask[t] ? phi(x) : 0; }); });
        for (i = 0; i < n; i++) {
          var rs = 0;
          for (j = 0; j <= i; j++) {
            var dot = 0;
            for (e = 0; e < dh; e++) { dot += fq[i][e] * fk[j][e]; }
            A[i][j] = dot * Math.exp(-slope * (i - j));
            rs += A[i][j];
          }
          if (M.normalizer === "denominator") { for (j = 0; j <= i; j++) { A[i][j] /= rs + M.eps; } }
        }
      }
      for (i = 0; i < n; i++) {
        var y = new Float64Array(dh);
        for (j = 0; j <= i; j++) { for (e = 0; e < dh; e++) { y[e] += A[i][j] * v[j][e]; } }
        if (M.kernel !== "softmax" && M.normalizer !== "denominator") {  // RMSNorm per head, folded into A's row
          var ms = 0;
          for (e = 0; e < dh; e++) { ms += y[e] * y[e]; }
          var r = 1 / Math.sqrt(ms / dh + M.eps);
          for (e = 0; e < dh; e++) { y[e] *= r; }
          for (j = 0; j <= i; j++) { A[i][j] *= r; }
        }
        z[i].set(y, hd * dh);
      }
      pats.push(A);
    }
    return { z: z, patterns: pats };
  }

  function unembed(row) { return linear(layerNorm([row], W["ln_final.weight"], W["ln_final.bias"]), HEAD, null, V)[0]; }

  /* tokens -> logits (N, V), patterns [L][H] (N, N), residual stream sites (embed, L0, ...), MLP posts [L] (N, m). */
  function forward(tokens) {
    var n = tokens.length, mask = tokens.map(function (t) { return t !== C.pad_id; }), seen = 0;
    var x = tokens.map(function (t, i) {
      var r = Float64Array.from(W["embed.weight"].subarray(t * d, (t + 1) * d));
      seen += mask[i] ? 1 : 0;
      var pos = Math.max(0, seen - 1);  // real tokens only: padding does not shift positions
      if (C.pos_encoding === "learned") {
        for (var c = 0; c < d; c++) { r[c] += W["pos_embed.weight"][pos * d + c]; }
      } else if (C.pos_encoding === "sinusoidal") {
        var s = sinusoid(pos);
        for (var c2 = 0; c2 < d; c2++) { r[c2] += s[c2]; }
      }
      return r;
    });
    var sites = [x], patterns = [], posts = [];
    for (var l = 0; l < C.n_layers; l++) {
      var pre = "blocks." + l + ".";
      var m = mix(l, layerNorm(x, W[pre + "ln1.weight"], W[pre + "ln1.bias"]), mask);
      var att = linear(m.z, W[pre + "attn.out.weight"], null, d);
      x = x.map(function (r, i) { return r.map(function (v, c) { return v + att[i][c]; }); });
      var hid = linear(layerNorm(x, W[pre + "ln2.weight"], W[pre + "ln2.bias"]), W[pre + "mlp.fc.weight"],
        W[pre + "mlp.fc.bias"], C.d_mlp).map(function (r) { return r.map(gelu); });
      var mo = linear(hid, W[pre + "mlp.proj.weight"], W[pre + "mlp.proj.bias"], d);
      x = x.map(function (r, i) { return r.map(function (v, c) { return v + mo[i][c]; }); });
      sites.push(x); patterns.push(m.patterns); posts.push(hid);
    }
    return { logits: x.map(unembed), patterns: patterns, sites: sites, posts: posts };
  }

  // -- self-test: "#selftest=1,2,3;4,5" -----------------------------------------------------------------
  var hash = decodeURIComponent(window.location.hash || "");
  if (hash.indexOf("#selftest=") === 0) {
    var out = hash.slice(10).split(";").map(function (p) {
      var toks = p.split(",").map(function (t) { return parseInt(t, 10); });
      var res = forward(toks), rows = function (m) { return m.map(function (r) { return Array.from(r); }); };
      return { logits: rows(res.logits), patterns: res.patterns.map(function (l) { return l.map(rows); }) };
    });
    var pre = document.createElement("pre");
    pre.id = "playground-selftest";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }

  // -- the view ---------------------------------------------------------------------------------------
  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function softmax(r) {
    var mx = -Infinity, s = 0, i, p = new Float64Array(r.length);
    for (i = 0; i < r.length; i++) { mx = Math.max(mx, r[i]); }
    for (i = 0; i < r.length; i++) { p[i] = Math.exp(r[i] - mx); s += p[i]; }
    for (i = 0; i < r.length; i++) { p[i] /= s; }
    return p;
  }
  function topk(r, k) {
    var idx = [];
    for (var i = 0; i < r.length; i++) { idx.push(i); }
    idx.sort(function (a, b) { return r[b] - r[a]; });
    return idx.slice(0, k);
  }
  function parse(text) {
    var parts = text.split(/[\s,]+/).filter(function (s) { return s.length; }), toks = [];
    for (var i = 0; i < parts.length; i++) {
      if (!/^\d+$/.test(parts[i]) || parseInt(parts[i], 10) >= V) {
        return "not a token id: " + parts[i] + " (ids are 0 to " + (V - 1) + ")";
      }
      toks.push(parseInt(parts[i], 10));
    }
    if (!toks.length) { return "type at least one token id"; }
    if (toks.length > C.max_positions) { return "at most " + C.max_positions + " tokens"; }
    return toks;
  }
  var sel = { layer: 0, head: 0 }, last = null;

  function bars(box, rows) {  // rows: [label, value in 0..1, text]
    box.innerHTML = "";
    rows.forEach(function (r) {
      var line = el("div", "pg-bar"), fill = el("span", "pg-fill");
      fill.style.width = (100 * Math.max(0, Math.min(1, r[1]))).toFixed(1) + "%";
      line.appendChild(el("span", "pg-lbl", r[0]));
      var track = el("span", "pg-track");
      track.appendChild(fill);
      line.appendChild(track);
      line.appendChild(el("span", "pg-val", r[2]));
      box.appendChild(line);
    });
  }

  /* Shade of |A[i][j]| relative to its row's largest: long rows of small weights stay visible. */
  function rowMax(r, i) {
    var mx = 0;
    for (var j = 0; j <= i; j++) { mx = Math.max(mx, Math.abs(r[j])); }
    return mx || 1;
  }
  function heat(A, n, px) {
    var cv = el("canvas"), g;
    cv.width = cv.height = n * px;
    g = cv.getContext("2d");
    for (var i = 0; i < n; i++) {
      var mx = rowMax(A[i], i);
      for (var j = 0; j <= i; j++) {
        g.fillStyle = "rgba(31,119,180," + Math.min(1, Math.abs(A[i][j]) / mx).toFixed(3) + ")";
        g.fillRect(j * px, i * px, px, px);
      }
    }
    return cv;
  }

  function drawHeads(res, toks) {
    var box = $("pg-heads"), n = toks.length, px = Math.max(2, Math.min(10, Math.floor(120 / n)));
    box.innerHTML = "";
    res.patterns.forEach(function (layer, l) {
      layer.forEach(function (A, h) {
        var cell = el("div", l === sel.layer && h === sel.head ? "pg-head sel" : "pg-head");
        cell.appendChild(el("div", "pg-cap", "L" + l + " H" + h));
        cell.appendChild(heat(A, n, px));
        cell.addEventListener("click", function () { sel = { layer: l, head: h }; drawHeads(res, toks); });
        box.appendChild(cell);
      });
    });
    var A = res.patterns[sel.layer][sel.head], tb = $("pg-pattern"), hr = el("tr");
    tb.innerHTML = "";
    hr.appendChild(el("th", "", "query \\ key"));
    toks.forEach(function (t, j) { hr.appendChild(el("th", "", j + ":" + t)); });
    tb.appendChild(hr);
    toks.forEach(function (t, i) {
      var tr = el("tr"), mx = rowMax(A[i], i);
      tr.appendChild(el("th", "", i + ":" + t));
      toks.forEach(function (u, j) {
        var td = el("td", "", j <= i ? A[i][j].toFixed(2) : "");
        if (j <= i) {
          var a = Math.abs(A[i][j]) / mx;
          td.style.background = "rgba(31,119,180," + a.toFixed(3) + ")";
          if (a > 0.6) { td.style.color = "#fff"; }
        }
        tr.appendChild(td);
      });
      tb.appendChild(tr);
    });
    $("pg-headinfo").textContent = "layer " + sel.layer + " head " + sel.head + ": " + C.pattern_label +
      " (row: query position, column: key position; shade relative to the row's largest weight)";
  }

  function drawLens(res) {
    var tb = $("pg-lens"), hr = el("tr"), final = topk(res.logits[res.logits.length - 1], 1)[0];
    tb.innerHTML = "";
    ["site", "top-1", "top-5 (probability)", "p(" + final + ")"].forEach(function (h) { hr.appendChild(el("th", "", h)); });
    tb.appendChild(hr);
    res.sites.forEach(function (x, s) {
      var p = softmax(unembed(x[x.length - 1])), top = topk(p, 5), tr = el("tr");
      tr.appendChild(el("td", "lbl", s === 0 ? "embed" : "after L" + (s - 1)));
      tr.appendChild(el("td", "", String(top[0])));
      tr.appendChild(el("td", "lbl", top.map(function (t) { return t + " (" + p[t].toFixed(2) + ")"; }).join("  ")));
      var td = el("td", "", p[final].toFixed(3));
      td.style.background = "rgba(44,160,44," + p[final].toFixed(3) + ")";
      tr.appendChild(td);
      tb.appendChild(tr);
    });
  }

  function drawNeurons(res) {
    var all = [];
    res.posts.forEach(function (hid, l) {
      var r = hid[hid.length - 1];
      for (var i = 0; i < r.length; i++) { all.push([l, i, r[i]]); }
    });
    all.sort(function (a, b) { return b[2] - a[2]; });
    var top = all.slice(0, 10), mx = top.length ? Math.max(top[0][2], 1e-9) : 1;
    bars($("pg-neurons"), top.map(function (t) { return ["L" + t[0] + " N" + t[1], t[2] / mx, t[2].toFixed(3)]; }));
  }

  function run() {
    var toks = parse($("pg-prompt").value);
    if (typeof toks === "string") { $("pg-status").textContent = toks; return; }
    var res = forward(toks), p = softmax(res.logits[toks.length - 1]);
    last = res;
    $("pg-status").textContent = toks.length + " tokens; next token after position " + (toks.length - 1) +
      " (token " + toks[toks.length - 1] + ")";
    bars($("pg-next"), topk(p, 10).map(function (t) { return [String(t), p[t], p[t].toFixed(3)]; }));
    drawHeads(res, toks);
    drawLens(res);
    drawNeurons(res);
  }
  $("pg-prompt").value = (P.default_prompt.length ? P.default_prompt : [0, 1, 2, 3]).join(" ");
  $("pg-prompt").addEventListener("input", run);
  run();
  window.picollmPlayground = { forward: forward, last: function () { return last; } };
})();
