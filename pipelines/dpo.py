"""Flow: stories -> preference pairs -> SFT reference (nested run) -> DPO policy, all tracked in MLflow.

Data, pairs and a named reference are loaded and checked before the MLflow run starts, so bad input
leaves no run behind. The parent run holds the DPO metrics, sample generations and the policy
(registered as tracking.registered_model, default picollm-dpo); the nested run holds the SFT
(registered as tracking.sft_registered_model, default picollm-sft).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlflow
import torch

from picollm.config import GPT2_VOCAB, DPORunConfig, flatten
from picollm.data.splits import PaddedSplit, pad_sequences
from picollm.dpo.losses import batch_logps, collate, dpo_loss, response_logps, sequence_logps
from picollm.dpo.metrics import PairScores, gain_metrics, gain_table, scores_metrics
from picollm.dpo.pairs import PreferenceData, PreferencePair, build_preference_data
from picollm.dpo.trainer import DPOTrainer, PairSet, compute_reference_logps, lm_metrics
from picollm.errors import PicollmError
from picollm.model.transformer import Transformer
from picollm.runtime.hardware import measure_matmul_peak, resolve_device, torch_threads
from picollm.tracking import registry, runs
from picollm.tracking.runs import SINGLE_VALUE_STEP, RunLog, Session, unique_name
from picollm.training.progress import FlowProgress, as_progress
from picollm.training.run import MlflowCallbacks
from picollm.training.trainer import NullCallbacks, TrainCallbacks, Trainer, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class DPOOutcome:
    run_id: str
    sft_run_id: str | None
    reference: str  # the registered SFT version, or dpo.reference as given
    model_uri: str | None
    registered_version: str | None
    sft_version: str | None
    metrics: dict[str, float]  # the kept policy's test/ metrics (best_val/: on val, without evaluate_test)
    schemes: list[str] = field(default_factory=list)
    steps: int = 0
    samples: dict[str, list[str]] = field(default_factory=dict)
    split: str = "test"  # the split of `table` and `scores`: test, or val when dpo.evaluate_test is false
    table: dict[str, list] = field(default_factory=dict)  # gain_table of the kept policy on `split`
    scores: PairScores | None = None  # per pair, on `split`
    val_table: dict[str, list] = field(default_factory=dict)  # gain_table of the kept policy on val
    history: list[dict[str, float]] = field(default_factory=list)  # the val metrics of every evaluation
    step0_loss: float = math.nan
    seconds: dict[str, float] = field(default_factory=dict)  # sft, reference_logps, dpo, total
    policy: Transformer | None = None  # the kept policy


def tokenizer_of(cfg: DPORunConfig) -> str:
    """How the logged model reads prompts: GPT-2 BPE text, or integers for the synthetic source."""
    return "integers" if cfg.data.source == "synthetic" else "gpt2"


def data_params(stats: dict[str, float]) -> dict[str, int | float]:
    """Data statistics as run params (counts as integers): facts about the inputs, not measurements."""
    return {k: int(v) if float(v).is_integer() else round(float(v), 3) for k, v in stats.items()}


def _padded(seqs: list[list[int]], pad_id: int) -> PaddedSplit:
    return PaddedSplit(pad_sequences(seqs, pad_id), torch.tensor([len(s) for s in seqs]), pad_id)


def _load_reference(cfg: DPORunConfig) -> Transformer:
    """The named reference, checked against data.vocab before any data is read."""
    assert cfg.dpo.reference is not None
    model = registry.resolve(cfg.dpo.reference).load()
    compact = getattr(model, "text_vocab", None) is not None
    if cfg.data.source != "synthetic" and not compact and model.cfg.vocab_size != GPT2_VOCAB:
        raise PicollmError(
            f"dpo.reference {cfg.dpo.reference!r} is not a text model (a vocabulary of {model.cfg.vocab_size} ids, "
            f"neither GPT-2's {GPT2_VOCAB} nor a compact story vocabulary): data.source {cfg.data.source} needs a "
            "text reference (e.g. picollm-sft) or none; an integer-sequence model goes with data.source synthetic"
        )
    if cfg.data.source != "synthetic" and compact != (cfg.data.vocab == "compact"):
        has = "a compact vocabulary" if compact else "the full GPT-2 vocabulary"
        raise PicollmError(
            f"dpo.reference {cfg.dpo.reference!r} has {has}: set data.vocab {'compact' if compact else 'gpt2'}"
        )
    return model


def _check_reference(cfg: DPORunConfig, model: Transformer, data: PreferenceData) -> None:
    if model.cfg.vocab_size != data.vocab_size or model.pad_id != data.pad_id:
        raise PicollmError(
            f"dpo.reference {cfg.dpo.reference!r} has vocabulary {model.cfg.vocab_size} (pad {model.pad_id}), "
            f"but data.source {cfg.data.source} needs {data.vocab_size} (pad {data.pad_id})"
        )
    if model.cfg.pos_encoding == "learned" and cfg.data.seq_max_len > model.cfg.max_seq_len:
        raise PicollmError(f"data.seq_max_len exceeds the reference's max_seq_len ({model.cfg.max_seq_len})")


def _train_sft(
    s: Session, cfg: DPORunConfig, data: PreferenceData, run_name: str, ui: TrainCallbacks
) -> tuple[Transformer, str, str | None, str | None]:
    """SFT of the reference on the training prompts + chosen continuations, in a nested run.
    Returns (model, run id, model uri, registered version)."""
    train_split = _padded(data.sft_sequences("train"), data.pad_id)
    val_split = _padded(data.sft_sequences("val"), data.pad_id)
    torch.manual_seed(cfg.sft.seed)
    model = Transformer(cfg.model)
    peak = cfg.sft.peak_flops or measure_matmul_peak(s.device)
    trainer = Trainer(model, cfg.sft, s.device, flops_per_token=6 * model.matmul_params(), peak_flops=peak)
    params = {
        **flatten({"model": cfg.model.model_dump(mode="json")}),
        **flatten({"train": cfg.sft.model_dump(mode="json")}),
        "model.num_params": model.num_params(),
        "data.source": cfg.data.source,
        **{k: v for k, v in data_params(data.stats()).items() if k.startswith("data.vocab_size")},
    }
    with s.run(f"{run_name}-sft", params=params, tags={"picollm.flow": "sft"}, nested=True) as run:
        evaluate = lambda m: lm_metrics(m, val_split, "val", cfg.sft.eval_batch_size)  # noqa: E731
        result = trainer.fit(train_split, evaluate, MlflowCallbacks(run, ui, checkpoints=False))
        trainer.model.text_vocab = data.vocab  # None for GPT-2 ids; logged with the model (vocab.json)
        test_split = _padded(data.sft_sequences("test"), data.pad_id)
        test = lm_metrics(trainer.model, test_split, "test", cfg.sft.eval_batch_size)
        run.log_metrics({**test, "train/epochs_run": float(result.epochs_run)}, step=SINGLE_VALUE_STEP)
        uri = version = None
        if cfg.tracking.log_model:  # the test metrics linked to the logged model
            name, tok = cfg.tracking.sft_registered_model, tokenizer_of(cfg)
            uri, version = run.log_model(trainer.model.cpu(), name, tokenizer=tok, link=[*test, "val/loss"])
    return trainer.model, run.run_id, uri, version


@torch.no_grad()
def generate_samples(
    reference: Transformer, policy: Transformer, data: PreferenceData, n: int, max_new_tokens: int
) -> dict[str, list[str]]:
    """Greedy continuations of the first n test prompts by reference and policy, with the true one."""
    examples = data.examples["test"][:n]
    if not examples:
        return {}
    prompts = pad_sequences([ex.prompt for ex in examples], data.pad_id, side="left").to(reference.device)
    width = prompts.shape[1]
    if reference.cfg.pos_encoding == "learned":
        max_new_tokens = max(1, min(max_new_tokens, reference.cfg.max_seq_len - width))
    out = {"prompt": [data.decode(ex.prompt) for ex in examples], "chosen": [data.decode(ex.chosen) for ex in examples]}
    for name, model in (("reference", reference), ("policy", policy)):
        gen = model.generate(prompts, max_new_tokens)[:, width:]
        out[name] = [data.decode(row) for row in gen.tolist()]
    return out


def _samples_markdown(samples: dict[str, list[str]]) -> str:
    lines = ["# Sample continuations (greedy)", ""]
    for i, prompt in enumerate(samples.get("prompt", [])):
        lines += [f"## {i + 1}", "", f"**prompt:** {prompt}", ""]
        lines += [f"- **{k}:** {samples[k][i]}" for k in ("chosen", "reference", "policy")]
        lines.append("")
    return "\n".join(lines)


def run(
    cfg: DPORunConfig,
    ui: TrainCallbacks | None = None,
    echo: Callable[[str], None] | None = None,
) -> DPOOutcome:
    """The whole flow. `ui` receives the SFT trainer's callbacks; `echo` the progress lines of the reference
    log-probs and of every DPO evaluation. Inside an open MLflow run (a study) the DPO run is nested in it."""
    t_start = time.perf_counter()
    # The phases on the command's bar (the CLI's reporter), or lines: SFT, reference log-probs, DPO.
    say = as_progress(echo or log.info)
    with runs.session("dpo", cfg.tracking, device=cfg.sft.device, num_threads=cfg.sft.num_threads) as s:
        # Everything that can fail on the user's input happens before the run starts.
        reference = _load_reference(cfg) if cfg.dpo.reference else None
        data = build_preference_data(cfg.data, cfg.dpo, getattr(reference, "text_vocab", None))
        if reference is not None:
            _check_reference(cfg, reference, data)
        if cfg.model.vocab_size is None:  # a compact vocabulary: its size is known now
            cfg = cfg.model_copy(deep=True)
            cfg.model.vocab_size = data.vocab_size
        schemes = list(cfg.dpo.corruptions)
        base_name = f"dpo-{cfg.data.source}-{'+'.join(schemes)}-{cfg.dpo.loss_type}"
        run_name = cfg.tracking.run_name or unique_name(base_name)
        nested = mlflow.active_run() is not None
        with s.run(run_name, config=cfg, params=data_params(data.stats()), nested=nested) as run:
            t0 = time.perf_counter()
            sft_run_id = sft_version = None
            say.plan(3 if reference is None else 2, "phases")
            if reference is None:
                say.part("SFT")
                reference, sft_run_id, sft_uri, sft_version = _train_sft(s, cfg, data, run_name, ui or NullCallbacks())
                sft = cfg.tracking.sft_registered_model
                ref_name = f"{sft}/{sft_version}" if sft_version else sft_uri or f"runs:/{sft_run_id}"
                run.set_tags({"sft_run_id": sft_run_id})
            else:
                ref_name = cfg.dpo.reference or ""
            run.set_tags({"reference": ref_name})
            timings = {"sft": time.perf_counter() - t0}
            out = _optimise(s, run, cfg, data, reference, timings, say)
            out.seconds = timings | {"total": time.perf_counter() - t_start}
            run.log_metrics(out.metrics, SINGLE_VALUE_STEP, flush=True)  # one value each: bar charts
            # Bookkeeping as params: MLflow orders chart sections by key, and sys/ or time/ would come before test/
            run.log_params({f"dpo.seconds.{k}": round(v, 1) for k, v in out.seconds.items()})
            out.run_id, out.sft_run_id, out.reference, out.sft_version = run.run_id, sft_run_id, ref_name, sft_version
            out.schemes, policy = schemes, out.policy
            assert policy is not None

            if cfg.dpo.evaluate_test:  # the test prompts stay unseen in a selection run
                out.samples = generate_samples(reference, policy, data, cfg.dpo.num_samples, cfg.dpo.sample_tokens)
            if out.samples:
                run.log_table(out.samples, "samples/generations.json")
                run.log_text(_samples_markdown(out.samples), "samples/generations.md")
            _log_report(run, cfg, data, out)
            policy.text_vocab = data.vocab  # logged with the model (vocab.json)
            if cfg.tracking.log_model:  # the headline metrics linked to the logged model
                keys = list(out.metrics)
                name, tok = cfg.tracking.registered_model, tokenizer_of(cfg)
                out.model_uri, out.registered_version = run.log_model(policy.cpu(), name, tokenizer=tok, link=keys)
    return out


def _reference_progress(echo: Callable[[str], None], split: str, every_s: float = 10.0) -> Callable[[int, int], None]:
    """A heartbeat for the reference log-probs: one line at most every `every_s` seconds, and at the end."""
    t0 = last = time.perf_counter()

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if done == total or now - last >= every_s:
            last = now
            echo(f"reference log-probs  {split:<5} {done:>6,}/{total:,} pairs  {now - t0:5.0f} s")

    return progress


def _optimise(
    s: Session,
    run: RunLog,
    cfg: DPORunConfig,
    data: PreferenceData,
    reference: Transformer,
    timings: dict[str, float],
    say: FlowProgress,
) -> DPOOutcome:
    """Reference log-probs once, then DPO of a copy of the reference; the kept policy scored on test (on val
    only, with dpo.evaluate_test false)."""
    reference = reference.to(s.device).eval().requires_grad_(False)
    splits = ["train", "val", "test"] if cfg.dpo.evaluate_test else ["train", "val"]
    sets = {name: PairSet(data.pairs[name], data.pad_id) for name in splits}
    t0 = time.perf_counter()
    precision = resolve_precision(cfg.dpo.precision, s.device)  # reference and policy alike: step-0 loss ln 2
    say.part("reference log-probs")
    for name, pairs in sets.items():  # once: the reference is frozen
        progress = _reference_progress(say, name)
        compute_reference_logps(reference, pairs, cfg.dpo.eval_batch_size, s.device, precision, progress)
    timings["reference_logps"] = time.perf_counter() - t0

    torch.manual_seed(cfg.dpo.seed)
    policy = copy.deepcopy(reference).requires_grad_(True).train()
    trainer = DPOTrainer(policy, cfg.dpo, s.device)

    def on_eval(step: int, m: dict[str, float]) -> None:
        run.log_metrics(m, step, flush=True)
        say(
            f"dpo step {step:>4}/{cfg.dpo.max_steps}  val/loss {m['val/loss']:.4f}  "
            f"val/accuracy {m['val/accuracy']:.3f} (reference {m['val/reference_accuracy']:.3f})"
        )

    def on_log(step: int, m: dict[str, float]) -> None:
        run.log_metrics(m, step)
        say.on_step(step, None)

    say.part("DPO")
    say.on_train_start(cfg.dpo.max_steps, cfg.dpo.max_steps, 0)
    result = trainer.fit(sets["train"], sets["val"], on_log=on_log, on_eval=on_eval)
    val_scores = trainer.score(sets["val"])  # the kept (best) policy
    val_table = gain_table(val_scores, seed=cfg.dpo.seed)
    run.log_table(val_table, "val/per_scheme.json")
    split = "test" if cfg.dpo.evaluate_test else "val"
    # val/ at step 0 is the reference's evaluation: the kept policy's val scores get their own prefix
    prefix = "test" if cfg.dpo.evaluate_test else "best_val"
    scores = trainer.score(sets["test"]) if cfg.dpo.evaluate_test else val_scores
    table = gain_table(scores, seed=cfg.dpo.seed) if cfg.dpo.evaluate_test else val_table
    if cfg.dpo.evaluate_test:
        run.log_table(table, "test/per_scheme.json")
    run.log_table(_pair_columns(scores), f"{split}/pairs.json")  # per pair: what a study's statistics need
    run.log_params(  # bookkeeping: params, so the run's first charts are its accuracies
        {
            "dpo.steps_run": result.steps,
            "dpo.best_step": result.best_step or 0,
            "dpo.stopped_early": result.stopped_early,
            "dpo.step0_loss": round(result.step0_loss, 6),
        }
    )
    metrics = {
        **scores_metrics(prefix, scores),
        **gain_metrics(prefix, table),
    }
    timings["dpo"] = result.seconds
    return DPOOutcome(
        run_id="",
        sft_run_id=None,
        reference="",
        model_uri=None,
        registered_version=None,
        sft_version=None,
        metrics=metrics,
        steps=result.steps,
        split=split,
        table=table,
        scores=scores,
        val_table=val_table,
        history=result.history,
        step0_loss=result.step0_loss,
        policy=policy,
    )


def _pair_columns(scores: PairScores) -> dict[str, list]:
    """Story id, scheme and both models' verdicts for every pair (the input of picollm.dpo.stats)."""
    ref = scores.reference_correct
    assert ref is not None and scores.uids is not None
    return {
        "story": list(scores.uids),
        "scheme": list(scores.schemes),
        "reference_correct": [bool(x) for x in ref],
        "policy_correct": [bool(x) for x in scores.policy_correct],
    }


def _log_report(run: RunLog, cfg: DPORunConfig, data: PreferenceData, out: DPOOutcome) -> None:
    """The figure (chosen vs rejected log-probs over the steps; accuracy per scheme before and after) and
    report.md / report.html (the html self-contained: MLflow's artifact viewer renders it)."""
    from picollm.dpo import report
    from picollm.tracking.pages import report_html

    run.log_figure(report.dpo_figure(out.history, out.table, out.split, cfg.dpo.loss_type), report.FIGURE)
    names = {"sft": "SFT", "reference_logps": "reference log-probs", "dpo": "DPO", "total": "total"}
    seconds = {names[k]: v for k, v in out.seconds.items()}
    setup = report.setup_lines(cfg, data.stats(), out.reference, out.steps)
    md = report.render(setup, out.table, out.split, cfg.dpo.loss_type, out.step0_loss, seconds, out.samples)
    run.log_text(md, "report.md")
    run.log_text(report_html(md, run.figure_files, title=f"picollm dpo: {run.run_id}"), "report.html")


# --------------------------------------------------------------------------------------------------
# Benchmark


def bench_step(cfg: DPORunConfig, warmup_steps: int = 2, timed_steps: int = 5) -> dict[str, float]:
    """Median time of one DPO step (reference log-probs precomputed, chosen+rejected in one forward)
    against naive steps that re-run the reference every step: `naive` in one concatenated pass,
    `naive_separate` with separate chosen and rejected passes for policy and reference; and
    `full_logits`, our step with the output head on every position instead of response positions only.

    Uses random tokens shaped like the config's data (batch dpo.batch_size pairs, prompt seq_max_len/4,
    responses seq_max_len/2), so it needs no data set. Variants are interleaved to share CPU noise.
    """
    with torch_threads(cfg.sft.num_threads):
        return _bench_step(cfg, resolve_device(cfg.sft.device), warmup_steps, timed_steps)


def _bench_step(cfg: DPORunConfig, device: torch.device, warmup_steps: int, timed_steps: int) -> dict[str, float]:
    # Long, but reads better whole: the four step variants are meant to be compared side by side.
    torch.manual_seed(cfg.dpo.seed)
    vocab = cfg.model.vocab_size or GPT2_VOCAB  # compact: the model's size once set (else GPT-2's, an upper bound)
    pad = vocab - 1
    n_prompt, n_resp = max(1, cfg.data.seq_max_len // 4), max(2, cfg.data.seq_max_len // 2)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, pad, (n,), generator=g).tolist()  # noqa: E731
    pairs = [
        PreferencePair(i, "random_tokens", rand(n_prompt), rand(n_resp), rand(n_resp))
        for i in range(cfg.dpo.batch_size)
    ]
    batch = collate(pairs, pad).to(device)
    reference = Transformer(cfg.model).to(device).eval().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True).train()
    opt = DPOTrainer(policy, cfg.dpo, device).optimizer
    with torch.no_grad():
        ref_c, ref_r = batch_logps(reference, batch)
    chosen_only = collate([PreferencePair(p.uid, p.scheme, p.prompt, p.chosen, p.chosen) for p in pairs], pad)
    rejected_only = collate([PreferencePair(p.uid, p.scheme, p.prompt, p.rejected, p.rejected) for p in pairs], pad)
    half = lambda b: (b.tokens[: b.n_pairs].to(device), b.response_mask[: b.n_pairs].to(device))  # noqa: E731

    def update(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> None:
        losses, _, _ = dpo_loss(pc, pr, rc, rr, cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing)
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        opt.step()

    def ours() -> None:
        update(*batch_logps(policy, batch), ref_c, ref_r)

    def naive() -> None:
        with torch.no_grad():
            rc, rr = batch_logps(reference, batch)
        update(*batch_logps(policy, batch), rc, rr)

    def naive_separate() -> None:
        (tc, mc), (tr, mr) = half(chosen_only), half(rejected_only)
        with torch.no_grad():
            rc, rr = response_logps(reference, tc, mc), response_logps(reference, tr, mr)
        update(response_logps(policy, tc, mc), response_logps(policy, tr, mr), rc, rr)

    def full_logits() -> None:  # ours, but the head scores every position (prompt and padding too)
        logps = sequence_logps(policy(batch.tokens), batch.tokens, batch.response_mask)
        update(logps[: batch.n_pairs], logps[batch.n_pairs :], ref_c, ref_r)

    variants = {"dpo": ours, "naive": naive, "naive_separate": naive_separate, "full_logits": full_logits}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup_steps + timed_steps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup_steps:
                times[name].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    out = {f"dpo_bench.{k}_step_ms": v for k, v in ms.items()}
    out["dpo_bench.ratio.naive_over_dpo"] = ms["naive"] / ms["dpo"]
    out["dpo_bench.ratio.naive_separate_over_dpo"] = ms["naive_separate"] / ms["dpo"]
    out["dpo_bench.ratio.full_logits_over_dpo"] = ms["full_logits"] / ms["dpo"]
    out["dpo_bench.batch_pairs"] = float(cfg.dpo.batch_size)
    out["dpo_bench.seq_len"] = float(n_prompt + n_resp)
    log.info("DPO step benchmark: %s", json.dumps({k: round(v, 2) for k, v in out.items()}))
    return out
