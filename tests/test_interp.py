"""picollm.interp on models whose answer is known by construction: a hand-set previous-token head
is found by the detector and carries the patched logit difference; a planted linear feature is
probed; the logit lens of the last layer is the model's output; the HTML view is self-contained."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from picollm.config import DataConfig, ModelConfig
from picollm.data.generators import generator_at
from picollm.interp import head_detector as hd
from picollm.interp import html_view, logit_lens, patching, probes, prompts
from picollm.interp.prompts import PromptPairs
from picollm.model.transformer import Transformer
from tests.test_model import make_model

V, P = 8, 8  # vocabulary (7 values + pad) and positions of the hand-set model
TOK, POS, COPY = 0, V, 2 * V  # residual layout: token one-hot | position one-hot | copied token


def planted_model(attention: str = "softmax") -> Transformer:
    """One layer, two heads. Head 0 attends from position t to t - 1 (queries and keys read the
    position one-hot; the key of position s points at s + 1) and copies that token into the COPY
    dims; the head reads COPY, so the model predicts the previous token. Head 1 and the MLP are
    zero: they carry nothing."""
    cfg = ModelConfig(
        attention=attention, pos_encoding="learned", d_model=3 * V, n_layers=1, n_heads=2, vocab_size=V, max_seq_len=P
    )
    model = Transformer(cfg)
    d, dh = cfg.d_model, cfg.d_head
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.zero_()
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        model.embed.weight[torch.arange(V), TOK + torch.arange(V)] = 1.0
        model.pos_embed.weight[torch.arange(P), POS + torch.arange(P)] = 1.0
        w = model.blocks[0].attn.qkv.weight  # rows: q (heads), k (heads), v (heads)
        scale = 3.0
        for t in range(P):
            w[t, POS + t] = scale  # q_t = e_t
            if t + 1 < dh:
                w[d + t + 1, POS + t] = scale  # k_s = e_{s+1}
        for j in range(V):
            w[2 * d + j, TOK + j] = 1.0  # head 0's value: the token one-hot
            model.blocks[0].attn.out.weight[COPY + j, j] = 1.0
            model.head.weight[j, COPY + j] = 10.0
    return model.eval()


def copy_pairs(n: int = 16, length: int = 6, seed: int = 0) -> PromptPairs:
    """Random prompts, and the same with the token before the last one changed: the answer of a
    previous-token copier moves with it."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, V - 1, (n, length), generator=g)
    corrupted = clean.clone()
    corrupted[:, -2] = (clean[:, -2] + torch.randint(1, V - 1, (n,), generator=g)) % (V - 1)
    return PromptPairs(clean, corrupted, clean[:, -2:-1], corrupted[:, -2:-1])


def random_model(attention: str, seed: int = 0) -> Transformer:
    return make_model(attention, chunk=64, seed=seed)  # one chunk: the quadratic forms


# --------------------------------------------------------------------------------------------------
# Head detector


def test_planted_previous_token_head_is_detected():
    model = planted_model()
    plain = prompts.random_tokens(8, P, V - 1, seed=0)
    scores = hd.detect_heads(model, plain, prompts.repeated_tokens(8, P // 2, V - 1), max_k=3)
    assert float(scores["previous_token"][0, 0]) > 0.9
    assert float(scores["previous_token"][0, 1]) < 0.5  # the zero head spreads uniformly
    assert float(scores["k_back_2"][0, 0]) < 0.1
    # key 0 only as the previous token of query 1: one of the P - 1 scored rows
    assert float(scores["first_token"][0, 0]) == pytest.approx(1 / (P - 1), abs=0.02)


def test_detection_scores_by_hand():
    n = 5
    prev = torch.diag(torch.ones(n - 1), -1)
    prev[0, 0] = 1.0
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    pattern = torch.stack([prev, uniform])[None]  # (1, 2, n, n)
    s = hd.detection_score(pattern, hd.k_back_pattern(n, 1))
    assert s.tolist() == pytest.approx([1.0, sum(1 / (q + 1) for q in range(1, n)) / (n - 1)])
    assert hd.detection_score(pattern, hd.first_token_pattern(n))[0] == pytest.approx(1 / (n - 1))
    tokens = torch.tensor([[3, 4, 5, 3, 4, 5]])
    ind = hd.induction_pattern(tokens)[0]
    assert torch.nonzero(ind).tolist() == [[3, 1], [4, 2], [5, 3]]  # the token after each earlier copy
    assert torch.nonzero(hd.duplicate_pattern(tokens)[0]).tolist() == [[3, 0], [4, 1], [5, 2]]


# --------------------------------------------------------------------------------------------------
# Patching


def test_patching_the_planted_head_recovers_the_logit_difference():
    model = planted_model()
    res = patching.patch_all(model, copy_pairs())
    assert res.clean_ld > 1.0 > res.corrupted_ld
    rec = dict(zip(res.components, res.component_recovered.tolist(), strict=True))
    assert rec["L0H0"] > 0.8
    assert abs(rec["L0H1"]) < 0.05 and abs(rec["L0 mlp"]) < 0.05
    # the residual: the changed token (position T-2) carries it into layer 0, the last position out of it
    t = res.resid.shape[1]
    assert float(res.resid[0, t - 2]) > 0.8 and abs(float(res.resid[0, t - 1])) < 0.05


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_patching_the_final_residual_recovers_exactly_one_and_nothing_zero(attention):
    model = random_model(attention)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 31, (6, 7), generator=g)
    corrupted = torch.randint(0, 31, (6, 7), generator=g)
    pairs = PromptPairs(clean, corrupted, torch.randint(0, 31, (6, 1), generator=g), torch.randint(0, 31, (6, 1)))
    p = patching.Patcher(model, pairs)
    assert p.recovered([]) == pytest.approx(0.0, abs=1e-6)
    res = patching.patch_all(model, pairs)
    assert res.resid_sites == ["L0 pre", "L1 pre", "final"]
    assert float(res.resid[-1, -1]) == pytest.approx(1.0, abs=1e-5)
    assert res.resid[-1, :-1].abs().max() < 1e-5  # other positions never reach the last logits
    assert float(res.resid[0, :].abs().sum()) > 0  # earlier sites did change something
    # the batched per-position patch equals patching one position on its own
    name, pos = patching.resid_sites(2)[1][1], 3
    clean = p.cache[name]

    def one(x, hook):
        x = x.clone()
        x[:, pos] = clean[:, pos]
        return x

    assert float(p.positions(name)[pos]) == pytest.approx(p.recovered([(name, one)]), abs=1e-5)


def test_family_pairs_change_the_answer_only_through_the_rule():
    cfg = DataConfig(vocab_size=32)
    m = cfg.modulus
    for family in ("counting", "arithmetic", "geometric", "alternating", "random_walk"):
        gens = [generator_at(family, i, cfg) for i in range(0, 40, 3)]
        pairs = prompts.patching_pairs(family, gens, 8, cfg, n=6, seed=0)
        assert pairs is not None and len(pairs) == 6 and pairs.clean.shape == (6, 8)
        for a, b in zip(pairs.clean_answers.tolist(), pairs.corrupted_answers.tolist(), strict=True):
            assert set(a) != set(b)
        if family == "alternating":  # a and b swapped: next token is the other value
            assert torch.equal(pairs.clean[:, 0], pairs.corrupted[:, 1])
        if family == "arithmetic":  # same start, other step; the answer continues the rule
            assert torch.equal(pairs.clean[:, 0], pairs.corrupted[:, 0])
            d = (pairs.clean[:, 1] - pairs.clean[:, 0]) % m
            assert torch.equal(pairs.clean_answers[:, 0], (pairs.clean[:, -1] + d) % m)
        if family == "random_walk":  # only the last token differs
            assert torch.equal(pairs.clean[:, :-1], pairs.corrupted[:, :-1])
            assert not torch.equal(pairs.clean[:, -1], pairs.corrupted[:, -1])


# --------------------------------------------------------------------------------------------------
# Logit lens and probes


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_logit_lens_of_the_last_layer_is_the_model_output(attention):
    model = random_model(attention)
    tokens = torch.randint(0, 31, (4, 9), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(tokens)
    sites = logit_lens.lens_sites(2)
    assert [s for s, _ in sites] == ["embed", "L0", "L1"]
    assert torch.allclose(logit_lens.decode(model, cache[sites[-1][1]]), logits, atol=1e-6)
    assert not torch.allclose(logit_lens.decode(model, cache[sites[0][1]]), logits, atol=1e-3)
    res = logit_lens.logit_lens(model, tokens, torch.tensor([0, 0, 1, 1]), ["a", "b"], batch_size=3)
    targets = tokens[:, 1:]
    acc = float((logits[:, :-1].argmax(-1) == targets).float().mean())
    assert float(res.accuracy[-1, -1]) == pytest.approx(acc)
    assert res.accuracy.shape == res.loss.shape == (3, 3)


@pytest.mark.parametrize("kind", ["ridge", "logistic"])
def test_probe_finds_a_planted_linear_feature_and_not_noise(kind):
    g = torch.Generator().manual_seed(0)
    n, d, k = 600, 32, 5
    labels = torch.randint(0, k, (n,), generator=g)
    directions = torch.randn(k, d, generator=g)
    x = torch.randn(n, d, generator=g) + 1.5 * directions[labels]
    groups = torch.arange(n) // 6  # six "positions" per "sequence"
    train = probes.group_split(groups, 0.5, seed=0)
    assert not set(groups[train].tolist()) & set(groups[~train].tolist())
    res = probes.fit_probe(x, labels, train, kind=kind, steps=200)
    assert res.test_accuracy > 0.95 and res.n_classes == k
    noise = probes.fit_probe(x, torch.randint(0, k, (n,), generator=g), train, kind=kind, steps=200)
    assert noise.test_accuracy < 0.4


# --------------------------------------------------------------------------------------------------
# Interactive HTML view


def view_html() -> str:
    model = planted_model()
    tokens = torch.tensor([[1, 5, 2, 6, 3, 0]])
    pattern = hd.head_patterns(model, tokens)[0]
    rows = [html_view.NeuronRow(0, i, [0.1 * i, 0.2, -0.1], 0.5, "a") for i in range(4)]
    data = html_view.ViewData(
        "planted </script> model",
        "softmax",
        "softmax weights",
        ["a", "b", "c"],
        [html_view.Example("a", tokens[0].tolist(), pattern)],
        rows,
    )
    return html_view.render(data)


def test_html_view_is_self_contained():
    page = view_html()
    assert html_view.external_refs(page) == []
    assert page.count("</script>") == 2  # the title's "</script>" is escaped inside the JSON
    assert '"pattern":[[[[1.0' in page  # the embedded data holds the head's pattern
    bad = page.replace("<style>", '<link href="x.css"><style>')
    assert html_view.external_refs(bad) and html_view.external_refs("<script src='https://cdn.x/y.js'>")


CHROMIUM = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")
def test_html_view_renders_in_headless_chromium(tmp_path: Path):
    page = tmp_path / "attention.html"
    page.write_text(view_html())
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    # the script ran: it filled the token strip, the every-head table and the neuron table
    assert dom.count('class="tok"') == 5 and dom.count('class="tok q"') == 1  # last token hovered first
    assert "L0H1" in dom and "L0 N3" in dom


# --------------------------------------------------------------------------------------------------
# `picollm analyze` end to end, on a linear and a softmax model


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/tiny.yaml trained for one epoch as linear (picollm-tiny) and softmax (picollm-tiny-softmax)."""
    from picollm.config import TrainRunConfig, load_config
    from picollm.tracking import store as tracking
    from pipelines.train import run

    from .conftest import point_mlflow

    directory = tmp_path_factory.mktemp("interp_store")
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    with pytest.MonkeyPatch.context() as mp:
        point_mlflow(mp, directory)
        run(load_config(TrainRunConfig, tiny, ["train.epochs=1"]))
        tracking._initialised.clear()
        sets = ["train.epochs=1", "model.attention=softmax", "tracking.registered_model=picollm-tiny-softmax"]
        run(load_config(TrainRunConfig, tiny, sets))
        tracking._initialised.clear()
    return directory


NEW = ["patching", "logit_lens", "probes", "heads", "interactive"]
FAST = ["n_per_family=6", "patching_pairs=4", "patching_length=5", "detector_sequences=4", "detector_length=8"]


@pytest.mark.parametrize("name", ["picollm-tiny", "picollm-tiny-softmax"])
def test_analyze_logs_the_interpretability_sections(name, tiny_pair, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    from picollm.tracking import store as tracking
    from pipelines import analyze

    from .conftest import point_mlflow

    point_mlflow(monkeypatch, tiny_pair)
    cfg = analyze.load_config(f"{name}@champion", None, FAST, ",".join(NEW))
    out = analyze.run(cfg)
    tracking._initialised.clear()
    client = MlflowClient()
    run = client.get_run(out.run_id)
    assert run.data.tags["model.attention"] == ("softmax" if name.endswith("softmax") else "linear")
    metrics = run.data.metrics
    # tiny.yaml: 1 layer, 2 heads, every family
    for key in (
        "patching/L0H1/arithmetic",
        "patching/L0/mlp/alternating",
        "patching/L0/attn/counting",
        "patching/L0/resid_pre_last/random_walk",
        "patching/clean_ld/geometric",
        "logit_lens/embed/accuracy/counting",
        "logit_lens/L0/loss/all",
        "probe/L0/value/accuracy",
        "probe/random/L0/family/accuracy",
        "probe/embed/step/accuracy",
        "probe/L0/ratio/accuracy",
        "heads/L0H0/previous_token",
        "heads/L0H1/induction",
        "heads/L0H1/first_token",
        "heads/max/k_back_2",
    ):
        assert key in metrics, key
    # the last lens site is the model itself: its accuracy is the model's next-token accuracy
    assert 0 <= metrics["logit_lens/L0/accuracy/all"] <= 1
    assert len(metrics) < 400
    assert not any(k.startswith(("embeddings/", "ablation/")) for k in metrics)  # only the sections asked for
    logged = {
        a.path
        for d in ("patching", "logit_lens", "probes", "heads", "interactive")
        for a in client.list_artifacts(out.run_id, d)
    }
    for path in (
        "patching/components.json",
        "patching/resid.json",
        "patching/components.png",
        "patching/resid_1.png",
        "patching/resid_2.png",  # five families: four panels, then one
        "logit_lens/logit_lens.json",
        "logit_lens/logit_lens.png",
        "probes/probes.json",
        "probes/probes_1.png",
        "heads/heads.json",
        "heads/detectors.png",
        "interactive/attention.html",
    ):
        assert path in logged, path
    page = Path(client.download_artifacts(out.run_id, "interactive/attention.html", str(tmp_path))).read_text()
    assert html_view.external_refs(page) == []
    assert page.count('"family":"') == 5  # one example per family
    table = json.loads(Path(client.download_artifacts(out.run_id, "patching/resid.json", str(tmp_path))).read_text())
    assert len(table["data"]) == 5 * 2 * 5  # families x (L0 pre, final) x positions
