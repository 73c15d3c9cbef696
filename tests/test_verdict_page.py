"""The verdict-first page (picollm.compare.verdict_page): the primaries in words, the forest plot, and
`picollm compare --from-runs` rebuilding the same page from a parent's child runs."""

from __future__ import annotations

import base64
import html
import re

import mlflow
import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from picollm.compare import verdict_page as vp
from picollm.compare.recall_study import ANSWER_METRIC, declared_contrasts
from picollm.config import CompareConfig, load_config

from .test_compare import TINY_COMPARE, Compared, compared, in_compared  # noqa: F401, F811 (the tiny comparison)


def _runs(base: str, variant: str, shift: float, n: int = 5) -> vp.Runs:
    """Seeded runs where `variant`'s test loss is `shift` lower than `base`'s, seed by seed, with noise."""
    rng = np.random.default_rng(0)
    loss = 1.0 + rng.normal(0, 0.05, n)
    acc = 0.8 + rng.normal(0, 0.01, n)
    noise = rng.normal(0, 0.002, n)
    a = [{"eval/test/loss": float(x), "eval/test/accuracy": float(y)} for x, y in zip(loss, acc, strict=True)]
    b = [
        {"eval/test/loss": float(x - shift + e), "eval/test/accuracy": float(y + e), "eval/test/accuracy/fam": 0.5}
        for x, y, e in zip(loss, acc, noise, strict=True)
    ]
    for r in a:
        r["eval/test/accuracy/fam"] = 0.5
    return {base: a, variant: b}


def test_sentences_and_forest_on_synthetic_runs():
    cfg = load_config(CompareConfig, TINY_COMPARE)
    base, variant = cfg.compare.names
    runs = _runs(base, variant, shift=0.05)
    page, fig = vp.verdict_page(cfg, runs, paired=True, parent_run_id="abc")
    rows = vp.contrasts(cfg, runs, paired=True)
    primaries = [c for c in rows if c.role == "primary"]
    assert [c.key for c in primaries] == cfg.compare.primaries
    loss = primaries[0]
    # the interval is the paired t interval (scipy), the seeds' dots are the paired differences
    d = [b["eval/test/loss"] - a["eval/test/loss"] for a, b in zip(runs[base], runs[variant], strict=True)]
    low, high = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
    assert (loss.diff.low, loss.diff.high) == pytest.approx((low, high))
    assert loss.seeds == pytest.approx(d)
    assert f"{variant} has lower test loss (NLL) than {base}: {np.mean(d):+.3f}" in page
    assert f"**{variant} better" in page
    assert "family" in {c.role for c in rows} and vp.families(runs) == ["fam"]  # the per-family row
    # one y tick per contrast; the margin band and the zero line are drawn
    ax = fig.axes[0]
    assert len(ax.get_yticks()) == len(rows)
    html = vp.page_html(page, fig)
    assert html.count("data:image/png;base64,") == 1 and vp.FIGURE not in html  # self-contained


def test_equal_runs_are_not_called_better():
    cfg = load_config(CompareConfig, TINY_COMPARE)
    base, variant = cfg.compare.names
    page, _ = vp.verdict_page(cfg, _runs(base, variant, shift=0.0), paired=True)
    assert f"{variant} better" not in page and f"{base} better" not in page
    assert f"test loss (NLL), {variant} − {base}:" in page  # named plainly, no "has lower"


def _primary_lines(page: str) -> list[str]:
    return [line for line in page.splitlines() if line.startswith("- ") and "Holm" in line]


@pytest.mark.slow
def test_compare_logs_the_page_and_from_runs_rebuilds_it(in_compared: Compared):  # noqa: F811
    from pipelines.cli import app
    from pipelines.compare import from_runs

    out = in_compared.outcome
    primaries = load_config(CompareConfig, TINY_COMPARE).compare.primaries
    logged = html.unescape(mlflow.artifacts.load_text(f"runs:/{out.parent_run_id}/verdict.html"))
    figure = re.search(r'src="data:image/png;base64,([^"]+)"', logged)
    assert figure is not None and base64.b64decode(figure[1]).startswith(b"\x89PNG")
    assert len(re.findall(r"<li>.*Holm p", logged)) == len(primaries)

    # the page from the children's logged metrics, without training: the same sentences as the run's own
    page, path = from_runs(out.parent_run_id)
    assert path == "verdict.html" and len(_primary_lines(page)) == len(primaries)
    for line in _primary_lines(page):
        words, verdict = line[2:].split(" — ")
        assert f"<li>{words} — <strong>{verdict.strip('*')}</strong></li>" in logged
    result = CliRunner().invoke(app, ["compare", "--from-runs", out.parent_run_id])
    assert result.exit_code == 0, result.output
    assert re.search(r"^verdict http\S+/artifacts/verdict\.html", result.output, re.M)
    every = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(every) == 5  # no new run: the page went onto the existing parent


def test_from_runs_bad_run_id_exits_2_with_one_line(migrated_store):
    from pipelines.cli import app

    result = CliRunner().invoke(app, ["compare", "--from-runs", "0123456789abcdef0123456789abcdef"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--from-runs" in lines[0] and "Traceback" not in result.output


def test_from_runs_refuses_a_run_that_is_not_a_compare_parent(migrated_store):
    from pipelines.cli import app

    with mlflow.start_run() as run:
        pass
    result = CliRunner().invoke(app, ["compare", "--from-runs", run.info.run_id])
    assert result.exit_code == 2 and "not a compare parent" in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_recall_study_primaries_are_its_declared_contrasts():
    overrides = ["data.seq_types=[counting, mqar]", "data.vocab_size=48", "data.max_len=20", "compare.recall_pairs=[2]"]
    cfg = load_config(CompareConfig, TINY_COMPARE, overrides)
    base, variant = cfg.compare.names
    cfg.compare.contrasts = [(base, variant)]  # base - variant, as configs/recall.yaml declares it
    rng = np.random.default_rng(1)
    answers = 0.9 + rng.normal(0, 0.01, 4)
    runs = {
        base: [{ANSWER_METRIC: float(x), "recall/pairs2/accuracy": float(x)} for x in answers],
        variant: [{ANSWER_METRIC: float(x - 0.3 + e)} for x, e in zip(answers, rng.normal(0, 0.01, 4), strict=True)],
    }
    page, _ = vp.verdict_page(cfg, runs, paired=True)
    rows = vp.contrasts(cfg, runs, paired=True)
    (first,) = [c for c in rows if c.role == "primary"]
    ((a, b, d, _),) = declared_contrasts(cfg, {v: [r[ANSWER_METRIC] for r in rs] for v, rs in runs.items()}, True)
    assert (first.variant, first.baseline, first.diff.mean) == (a, b, pytest.approx(d.mean)) and d.mean > 0
    paired = zip(runs[base], runs[variant], strict=True)
    assert first.seeds == pytest.approx([x[ANSWER_METRIC] - y[ANSWER_METRIC] for x, y in paired])
    assert f"{base} has higher test answer accuracy (trained mixture) than {variant}" in page
    assert f"**{base} better" in page
