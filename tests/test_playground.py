"""The analysis page's playground: its JavaScript forward pass gives the PyTorch model's logits (headless
Chromium), and a model it cannot compute gets one line instead of numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from picollm.interp import head_detector as hd
from picollm.interp import html_view, playground
from picollm.model import mixers
from picollm.model.config import ModelConfig
from picollm.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)
SOFTMAX, LINEAR = mixers.REFERENCE_PAIR


def tiny_model(seed: int = 0, **model: Any) -> Transformer:
    """configs/tiny.yaml's model (with `model` overrides), weights drawn far from their init so that the
    logits, attention and neurons are far from flat: a forward pass that is off shows in the numbers."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg = ModelConfig(**{**raw["model"], "vocab_size": raw["data"]["vocab_size"], **model})
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return m


def page(model: Transformer, prompt: list[int] | None = None) -> str:
    pg = playground.build(model, prompt)
    return html_view.render(html_view.ViewData("playground test", model.cfg.attention, "w", ["a"], [], [], pg))


def prompts(vocab: int, pad: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    rand = [torch.randint(0, vocab - 1, (n,), generator=g).tolist() for n in (1, 7, 12, 20)]
    return [*rand, [3, pad, 5, pad, 9, 2]]  # pad tokens are masked keys and do not count as positions


CASES = {
    # the reference pair under configs/tiny.yaml (ALiBi) and under baseline/linear.yaml's learned positions
    "softmax-alibi": {"attention": SOFTMAX},
    "linear-alibi": {"attention": LINEAR},
    "softmax-learned": {"attention": SOFTMAX, "pos_encoding": "learned", "max_seq_len": 64},
    "linear-learned": {"attention": LINEAR, "pos_encoding": "learned", "max_seq_len": 64},
    # the options the page also computes: two layers, sinusoidal, relu features, RMSNorm, a short convolution
    "linear-variants": {
        "attention": LINEAR,
        "n_layers": 2,
        "pos_encoding": "sinusoidal",
        "feature_map": "relu",
        "normalizer": "rmsnorm",
        "short_conv": 3,
    },
    "softmax-variants": {"attention": SOFTMAX, "n_layers": 2, "pos_encoding": "none", "short_conv": 2},
    "sliding-window": {"attention": "sliding_window", "window": 3},
}


@pytest.fixture(scope="module")
def browser_logits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Transformer, list, list, str]]:
    """Every case's page run in headless Chromium at once (one browser start costs seconds): case -> (model,
    prompts, the page's logits (N, vocab) and patterns (L, H, N, N) of each prompt, the page as rendered)."""
    assert CHROMIUM is not None
    tmp = tmp_path_factory.mktemp("playground")
    runs = {}
    for case, over in CASES.items():
        model = tiny_model(**over)
        cases = prompts(model.cfg.vocab_size, model.cfg.pad_token)
        f = tmp / f"{case}.html"
        f.write_text(page(model))
        url = f.as_uri() + "#selftest=" + ";".join(",".join(map(str, p)) for p in cases)
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp / case}"]
        proc = subprocess.Popen([*cmd, "--dump-dom", url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        runs[case] = (model, cases, proc)
    out = {}
    for case, (model, cases, proc) in runs.items():
        dom, _ = proc.communicate(timeout=120)
        tag = '<pre id="playground-selftest">'
        start = dom.find(tag)
        assert proc.returncode == 0 and start >= 0, f"{case}: the page wrote no logits"
        start += len(tag)
        got = json.loads(dom[start : dom.index("</pre>", start)])
        out[case] = (model, cases, got, dom)
    return out


@pytest.mark.slow  # seven pages in headless Chromium at once: seconds of browser start-up
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: the page's forward pass needs a browser")
@pytest.mark.parametrize("case", list(CASES))
def test_playground_logits_match_pytorch(case: str, browser_logits: dict[str, tuple[Transformer, list, list, str]]):
    model, cases, got, dom = browser_logits[case]
    cfg = model.cfg
    # the view was drawn for the default prompt: next-token and neuron bars, every head, every lens site
    assert dom.count('class="pg-bar"') == 20 and dom.count('class="pg-head') == cfg.n_layers * cfg.n_heads
    assert dom.count(">after L") == cfg.n_layers and "pg-unsupported" not in dom
    assert len(got) == len(cases)
    for p, res in zip(cases, got, strict=True):
        tokens = torch.tensor([p])
        with torch.no_grad():
            ref = model(tokens)[0].double()  # (N, vocab)
        js = torch.tensor(res["logits"], dtype=torch.float64)
        assert js.shape == ref.shape
        assert ref.std() > 0.5  # logits far from flat: a wrong forward pass could not hide in them
        assert (js - ref).abs().max().item() <= 1e-4, (case, p)
        # what the page shows of every head is the mixer's hook_pattern: (L, H, N, N)
        pattern = torch.tensor(res["patterns"], dtype=torch.float64)
        assert (pattern - hd.head_patterns(model, tokens)[0].double()).abs().max().item() <= 1e-4, (case, p)


def test_every_mixer_gets_the_playground_or_one_line_saying_why_not():
    for name in mixers.names():
        html = page(tiny_model(attention=name))
        assert html_view.external_refs(html) == []
        supported = mixers.mixer_class(name).js_forward(ModelConfig(attention=name, vocab_size=32)) is not None
        assert ('id="playground-data"' in html) == supported and ('id="pg-unsupported"' in html) != supported
        if name in mixers.REFERENCE_PAIR:
            assert supported
    taylor = page(tiny_model(attention=LINEAR, feature_map="taylor"))  # an option the page cannot compute
    assert 'id="pg-unsupported"' in taylor and "playground-data" not in taylor


def test_weights_are_embedded_exactly():
    model = tiny_model(attention=LINEAR, pos_encoding="learned")
    data = json.loads(playground.build(model).payload or "")
    state = model.state_dict()
    for name, (shape, text) in data["w"].items():
        want = state[name][: playground.MAX_POSITIONS] if name == "pos_embed.weight" else state[name]
        assert torch.equal(playground.decode(text, shape), want.float()), name
        assert "/" not in text and "=" not in text  # nothing external_refs could read as a reference
    assert set(data["w"]) == set(state)
    assert data["w"]["pos_embed.weight"][0] == [playground.MAX_POSITIONS, model.cfg.d_model]
