"""picollm analyze: head scores, selectivity and eta squared on hand-built numbers, the linear pattern,
mean ablation, and the flow end to end (tags, artifacts, metrics, errors) on a tiny trained model."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from picollm.config import ModelConfig
from picollm.data.splits import PaddedSplit, pad_sequences
from picollm.interp import analysis as an
from picollm.model.transformer import Transformer
from picollm.training.evaluation import evaluate

from .conftest import point_mlflow

REPO = Path(__file__).resolve().parents[1]
VOCAB = 32


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from picollm.tracking import store as tracking

    yield point_mlflow(monkeypatch, tmp_path)
    tracking._initialised.clear()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """configs/tiny.yaml trained for one epoch and registered as picollm-tiny v1 (champion)."""
    from picollm.config import TrainRunConfig, load_config
    from picollm.tracking import store as tracking
    from pipelines.train import run

    directory = tmp_path_factory.mktemp("analysis_store")
    with pytest.MonkeyPatch.context() as mp:
        point_mlflow(mp, directory)
        out = run(load_config(TrainRunConfig, REPO / "configs" / "tiny.yaml", ["train.epochs=1"]))
        tracking._initialised.clear()
    return directory, out.run_id


def make_model(attention: str = "linear", seed: int = 0) -> Transformer:
    cfg = ModelConfig(attention=attention, d_model=16, n_heads=2, n_layers=2, vocab_size=VOCAB, linear_chunk_size=4)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # weights large enough that every component visibly matters
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.4)
    return model.eval()


def ragged_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 5, 7, 9, 6, 8]
    seqs = [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in lengths]
    return pad_sequences(seqs, VOCAB - 1), torch.tensor(lengths), torch.tensor([0, 0, 1, 1, 2, 2])


# --------------------------------------------------------------------------------------------------
# Attention scores on hand-built patterns


def hand_patterns(n: int = 6) -> torch.Tensor:
    """(1, 2, n, n): head 0 attends only to the previous token (the first query to itself),
    head 1 spreads uniformly over the allowed keys 0..q."""
    prev = torch.zeros(n, n)
    prev[0, 0] = 1.0
    prev[torch.arange(1, n), torch.arange(n - 1)] = 1.0
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    return torch.stack([prev, uniform])[None]


def test_previous_token_and_uniform_patterns_score_as_worked_out_by_hand():
    s = an.head_scores(hand_patterns(6), torch.tensor([6]), max_k=4)
    # previous-token head: all weight one step back, no spread; key 0 only when q = 1 (1 of 5 queries)
    assert float(s["prev_token"][0]) == pytest.approx(1.0)
    assert float(s["k_back_1"][0]) == pytest.approx(1.0)
    assert float(s["entropy"][0]) == pytest.approx(0.0, abs=1e-9)
    assert float(s["k_back_2"][0]) == pytest.approx(0.0)
    assert float(s["pos0"][0]) == pytest.approx(1 / 5)
    # uniform head: maximal entropy; weight 1/(q+1) on every key, averaged over q = 1..5 (k-back over q >= k)
    assert float(s["entropy"][1]) == pytest.approx(1.0, abs=1e-6)
    assert float(s["prev_token"][1]) == pytest.approx(sum(1 / (q + 1) for q in range(1, 6)) / 5)
    assert float(s["k_back_3"][1]) == pytest.approx(sum(1 / (q + 1) for q in range(3, 6)) / 3)
    assert float(s["pos0"][1]) == pytest.approx(sum(1 / (q + 1) for q in range(1, 6)) / 5)


def test_head_scores_ignore_padded_queries():
    """Rows past a sequence's length (padding) carry junk and must not count."""
    n = 6
    pattern = hand_patterns(n).repeat(2, 1, 1, 1)
    pattern[1, :, 3:] = 1.0 / n  # sequence 1 has length 3: rows 3.. are padding
    s = an.head_scores(pattern, torch.tensor([6, 3]))
    assert float(s["prev_token"][0]) == pytest.approx(1.0)
    assert float(s["entropy"][0]) == pytest.approx(0.0, abs=1e-9)
    assert float(s["entropy"][1]) == pytest.approx(1.0, abs=1e-6)
    # pos0 of the prev head: q = 1 in both sequences out of 5 + 2 real queries with q >= 1
    assert float(s["pos0"][0]) == pytest.approx(2 / 7)


def test_mean_pattern_averages_only_sequences_that_reach_the_query():
    pattern = torch.zeros(2, 1, 4, 4)
    pattern[0, 0, 2, 0] = 1.0
    pattern[1, 0, 2, 0] = 0.0
    pattern[0, 0, 3, 3] = 1.0
    pattern[1, 0, 3, 3] = 7.0  # junk: sequence 1 stops at length 3
    mean = an.mean_pattern(pattern, torch.tensor([4, 3]), positions=4)
    assert float(mean[0, 2, 0]) == pytest.approx(0.5)
    assert float(mean[0, 3, 3]) == pytest.approx(1.0)
    assert math.isnan(float(an.mean_pattern(pattern, torch.tensor([3, 3]), 4)[0, 3, 3]))


# --------------------------------------------------------------------------------------------------
# Neurons: selectivity index and eta squared on known numbers


def test_selectivity_index_by_hand():
    means = torch.tensor([[2.0, 1.0, 3.0], [0.0, 1.0, 1.0]])  # (F=2, W=3)
    # (max - rest) / (max + rest): (2-0)/2 = 1, (1-1)/2 = 0, (3-1)/4 = 0.5
    assert an.selectivity_index(means).tolist() == pytest.approx([1.0, 0.0, 0.5])
    # three families: rest is the mean of the other two: (4 - 1) / (4 + 1)
    assert float(an.selectivity_index(torch.tensor([[1.0], [4.0], [1.0]]))[0]) == pytest.approx(0.6)


def test_eta_squared_by_hand():
    # neuron 0: A = [1, 3], B = [0, 0]: grand 1, between 2*1 + 2*1 = 4, total 0+4+1+1 = 6 -> 2/3
    # neuron 1: constant -> 0 (no variance to explain)
    # neuron 2: A = [2, 4], B = [0, 2]: grand 2, between 2*1 + 2*1 = 4, total 0+4+4+0 = 8 -> 1/2
    acts = torch.tensor([[1.0, 1.0, 2.0], [3.0, 1.0, 4.0], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    fams = torch.tensor([0, 0, 1, 1])
    assert an.eta_squared(acts, fams, 2).tolist() == pytest.approx([2 / 3, 0.0, 0.5])
    assert an.family_means(acts, fams, 2).flatten().tolist() == pytest.approx([2.0, 1.0, 3.0, 0.0, 1.0, 1.0])


def test_neuron_stats_shift_gelu_outputs_and_flag_dead_neurons():
    # neuron 0 sits at GELU's minimum for family A and at +0.17 for B: shifted means 0 and 0.34 -> SI 1
    # neuron 1 never exceeds the threshold -> dead
    acts = torch.tensor([[-0.17, -0.1], [-0.17, 0.0], [0.17, 0.005], [0.17, -0.05]])
    fams = torch.tensor([0, 0, 1, 1])
    st = an.neuron_stats(acts, fams, 2, shift=an.GELU_SHIFT, dead_threshold=0.01)
    assert float(st.si[0]) == pytest.approx(1.0)
    assert st.dead.tolist() == [False, True]
    assert float(an.neuron_stats(acts, fams, 2, shift=None).si[0]) == pytest.approx(1.0)  # minus global min
    assert an.GELU_MIN + an.GELU_SHIFT >= 0
    assert float(torch.nn.functional.gelu(torch.linspace(-4, 0, 4001)).min()) == pytest.approx(an.GELU_MIN, abs=1e-4)


# --------------------------------------------------------------------------------------------------
# Through the model's hooks


def test_linear_pattern_times_v_reproduces_the_head_output():
    model = make_model("linear")
    tokens, lengths, _ = ragged_batch()
    names = [f"blocks.{i}.attn.{h}" for i in range(2) for h in ("hook_pattern", "hook_v", "hook_z")]
    cache = an.run_cached(model, tokens, names, batch_size=4)  # two chunks, concatenated
    for i in range(2):
        pattern, v, z = (cache[f"blocks.{i}.attn.{h}"] for h in ("hook_pattern", "hook_v", "hook_z"))
        assert pattern.shape == (6, 2, 9, 9)
        torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", pattern, v), z, atol=1e-5, rtol=1e-5)
        real = an.query_mask(lengths, 9)
        rows = pattern.sum(-1).permute(0, 2, 1)[real]  # each real query's weights sum to ~1
        torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_family_losses_match_evaluation_and_mean_ablation_moves_them(attention):
    model = make_model(attention)
    tokens, lengths, fams = ragged_batch()
    losses = an.family_losses(model, tokens, fams, 3, batch_size=4)
    split = PaddedSplit(tokens, lengths, VOCAB - 1, fams, None, ["a", "b", "c"])
    ref = evaluate(model, split, "x")
    assert float(losses[-1]) == pytest.approx(ref["x/loss"], rel=1e-5)
    assert float(losses[0]) == pytest.approx(ref["x/loss/a"], rel=1e-5)

    res = an.mean_ablation(model, tokens, fams, 3, batch_size=4)
    assert res.components == ["L0H0", "L0H1", "L1H0", "L1H1", "L0 MLP", "L1 MLP"]
    assert res.delta.shape == (6, 4)
    torch.testing.assert_close(res.clean, losses)
    assert bool((res.delta.abs() > 1e-4).all())  # every replacement went through its hook


def test_number_line_embeddings_are_found_by_pca():
    values = torch.arange(20).float()
    g = torch.Generator().manual_seed(0)
    emb = values[:, None] * torch.randn(1, 8, generator=g) + 0.01 * torch.randn(20, 8, generator=g)
    res = an.analyse_embeddings(emb, values)
    assert res.metrics["pc1_value_corr"] > 0.99
    assert res.metrics["explained_var_top2"] > 0.99
    assert float(res.explained.sum()) == pytest.approx(1.0)
    assert res.cosine.shape == (20, 20)


def test_number_embeddings_come_from_the_embed_hook_without_the_pad():
    model = make_model()
    emb = an.number_embeddings(model)
    assert emb.shape == (VOCAB - 1, 16)
    torch.testing.assert_close(emb, model.embed.weight[: VOCAB - 1].detach())


# --------------------------------------------------------------------------------------------------
# The flow and the CLI


FAST = [
    "n_per_family=4",
    "attention_positions=8",
    "top_neurons=6",
    "patching_pairs=4",
    "patching_length=5",
    "detector_sequences=4",
    "detector_length=8",
]


INTERP_DIRS = ("patching", "logit_lens", "probes", "heads", "interactive")  # tests/test_interp.py checks their contents


def test_analysis_run_is_tagged_with_the_model_version(tiny, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines import analyze

    directory, train_run = tiny
    point_mlflow(monkeypatch, directory)
    cfg = analyze.load_config("picollm-tiny@champion", REPO / "configs" / "analysis.yaml", FAST)
    out = analyze.run(cfg)

    run = MlflowClient().get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert mlflow.get_experiment(run.info.experiment_id).name == "picollm-analysis"
    tags = run.data.tags
    assert tags["model.name"] == "picollm-tiny"
    assert tags["model.version"] == "1"
    assert tags["model.source_run"] == train_run
    assert tags["model.uri"] == "models:/picollm-tiny/1"
    assert tags["data.source"] == f"run {train_run}"  # data regenerated from the training run's config
    metrics = run.data.metrics
    for key in (
        "embeddings/pc1_value_corr",
        "embeddings/explained_var_top2",
        "embeddings/neighbour_cos",
        "embeddings/random/pc1_value_corr",
        "attention/L0H1/entropy",
        "attention/L0H1/prev_token",
        "attention/L0H1/k_back_2",
        "attention/L0H1/pos0",
        "activations/L0/dead_fraction",
        "activations/L0/si_mean",
        "activations/L0/eta2_mean",
        "ablation/L0H0/counting",
        "ablation/L0_MLP/all",
    ):
        assert key in metrics, key
    assert 0 <= metrics["attention/L0H1/entropy"] <= 1 + 1e-6
    logged = {
        a.path
        for d in ("", "embeddings", "attention", "activations", "ablation", *INTERP_DIRS)
        for a in MlflowClient().list_artifacts(out.run_id, d)
    }
    for name in (
        "summary.txt",
        "analysis_config.yaml",
        "data_config.yaml",
        "embeddings/pca.png",
        "embeddings/spectrum.png",
        "attention/head_scores.csv",
        "attention/counting.png",
        "attention/random_walk.png",
        "activations/neurons.csv",
        "activations/selective_neurons.png",
        "ablation/delta_loss.csv",
        "ablation/delta_loss.png",
    ):
        assert name in logged, name
    assert set(out.artifacts) <= logged


def test_cli_analyze_by_run_id_and_section_list(tiny, monkeypatch):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from pipelines.cli import app

    directory, train_run = tiny
    point_mlflow(monkeypatch, directory)
    res = CliRunner().invoke(
        app, ["analyze", train_run, "--what", "ablation", *[a for s in FAST for a in ("--set", s)]]
    )
    assert res.exit_code == 0, res.output
    exp = MlflowClient().get_experiment_by_name("picollm-analysis")
    [run] = MlflowClient().search_runs(
        [exp.experiment_id],
        f"tags.`model.source_run` = '{train_run}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    assert "model.name" not in run.data.tags  # a run reference names no registered model
    assert "ablation/L0H0/all" in run.data.metrics
    assert not any(k.startswith(("embeddings/", "attention/", "activations/")) for k in run.data.metrics)


@pytest.mark.parametrize("ref", ["no-such-model@champion", "picollm-tiny/7", "runs:/0123456789abcdef0123456789abcdef"])
def test_cli_unknown_model_exits_2_and_leaves_no_run(ref, tiny, monkeypatch):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from pipelines.cli import app

    point_mlflow(monkeypatch, tiny[0])  # an existing (already migrated) store: quicker, and it has runs to count

    def n_runs() -> int:
        client = MlflowClient()
        return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))

    before = n_runs()
    res = CliRunner().invoke(app, ["analyze", ref])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in res.output
    assert n_runs() == before


def test_bad_section_is_a_config_error():
    from picollm.errors import ConfigError
    from pipelines import analyze

    with pytest.raises(ConfigError, match="what"):
        analyze.load_config("m", None, [], "embeddings,attn")
    with pytest.raises(ConfigError, match="n_per_family"):
        analyze.load_config("m", None, ["n_per_family=0"])
    cfg = analyze.load_config("m", None, [], " ablation , embeddings")
    assert cfg.what == ["ablation", "embeddings"] and cfg.model == "m"
