"""Flow: benchmarks, logged as one MLflow run.

- steps: training-step time of every variant (`variants`: softmax and linear by default; the linear forms
  alone too) at several sequence lengths, in one process, interleaved so machine noise hits them alike;
- ddp: training throughput of one process vs `torchrun` DDP processes on this machine;
- tracking: MLflow's share of a training run's wall time (no-op vs SQLite vs an HTTP server);
- sweep: trials per minute of a `picollm sweep` study with 1 and 2 workers, and the per-trial overhead;
- breakdown: where a whole `picollm train` process's wall time goes (its logged `time/*` metrics), and
  its wall time side by side with the pinned reference training loop (picollm.bench_reference);
- generation: decode ms per token of every variant vs context, fast path vs the general cached forward.

Every timing keeps its repeats (picollm.runtime.noise); the steps and generation sections and the machine's
load average around the whole bench go through the noise rules, whose warnings open bench.md."""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from picollm.compare.efficiency import time_train_steps
from picollm.config import (
    BenchConfig,
    BenchRunsConfig,
    BenchSweepConfig,
    ServerConfig,
    TrainRunConfig,
    load_config,
)
from picollm.config.bench import BenchGenerationConfig
from picollm.errors import PicollmError
from picollm.model import decoding
from picollm.model.mixers import REFERENCE_PAIR
from picollm.model.mixers import feature_maps as fm
from picollm.model.mixers import linear as la
from picollm.model.positions import alibi_slopes
from picollm.model.transformer import Transformer
from picollm.runtime.hardware import torch_threads
from picollm.runtime.noise import RULES, Load, Timing, load_average, time_repeats
from picollm.runtime.timing import PHASES
from picollm.tracking import runs, server
from picollm.tracking import store as tracking
from picollm.training import run as train_run

log = logging.getLogger(__name__)


def naive_cumulative(fq, fk, v, log_decay, eps):
    """The reference implementation's form: a (B, H, N, d, d) cumulative state (decay omitted)."""
    state = torch.cumsum(fk.unsqueeze(-1) * v.float().unsqueeze(-2), dim=2)
    z = torch.cumsum(fk, dim=2)
    num = torch.einsum("bhnd,bhnde->bhne", fq, state)
    return num / ((fq * z).sum(-1, keepdim=True) + eps)


@dataclass
class BenchOutcome:
    run_id: str
    results: dict[str, float]
    report: list[str]  # markdown tables, also logged as bench.md
    warnings: list[str]  # the noise rules' warnings (picollm.runtime.noise), also at the top of the report


def run(cfg: BenchConfig, progress: Callable[[str], None] = lambda msg: None) -> BenchOutcome:
    """Measure the configured sections, then log everything as one run in the bench experiment (the
    whole-run sections train in their own temporary stores, so nothing of theirs enters yours)."""
    with runs.session("bench", cfg.tracking, num_threads=cfg.num_threads) as s:
        threads = torch.get_num_threads()
        load_start = load_average()
        results: dict[str, float] = {}
        report: list[str] = []
        warnings: list[str] = []
        by_length: dict[int, dict[str, float]] = {}
        if "steps" in cfg.sections:
            progress(f"steps: training steps of {', '.join(v.name for v in cfg.variants)} at each length")
            by_length, noisy = time_steps(cfg)
            warnings += noisy
            for n, row in by_length.items():
                results.update({f"{k}@{n}": v for k, v in row.items()})
            report += steps_table(cfg, results)
        train_cfg = load_config(TrainRunConfig, cfg.runs.config, cfg.runs.overrides) if _needs_runs(cfg) else None
        if "ddp" in cfg.sections:
            progress(f"ddp: {cfg.runs.config} on 1 process vs {cfg.runs.nproc} torchrun processes")
            ddp = time_ddp(cfg.runs, train_cfg)
            results.update(ddp)
            report += ddp_table(cfg.runs, ddp)
        if "tracking" in cfg.sections:
            progress(f"tracking: {cfg.runs.config} with no tracking, SQLite and an HTTP server")
            with torch_threads(None):  # the timed runs apply their own train.num_threads
                overhead = time_tracking(cfg.runs, train_cfg, progress)
            results.update(overhead)
            report += tracking_table(overhead)
        if "sweep" in cfg.sections:
            progress(f"sweep: {cfg.sweep.config}, {cfg.sweep.trials} trials with {cfg.sweep.workers} worker(s)")
            with torch_threads(None):
                sweeps = time_sweep(cfg.sweep)
            results.update(sweeps)
            report += sweep_table(cfg.sweep, sweeps)
        if "breakdown" in cfg.sections:
            progress(
                f"breakdown: whole `picollm train {cfg.runs.config}` processes and the reference loop, alternating"
            )
            with torch_threads(None):
                split = time_breakdown(cfg.runs, progress)
            results.update(split)
            report += breakdown_table(cfg.runs, split)
        gen_rows: dict[int, dict[str, float]] = {}
        if "generation" in cfg.sections:
            progress("generation: ms per token, fast path vs cached forward, at each context")
            gen_rows, noisy = time_generation(cfg)
            warnings += noisy
            report += generation_table(cfg.generation, gen_rows, [v.name for v in cfg.variants])

        load = Load.since(load_start)
        warnings = [w for w in [RULES.load(load)] if w] + warnings
        report = noise_section(load, warnings) + report
        params = {"torch_threads": threads, "bench.reported": "min of repeats", "bench.noisy": bool(warnings)}
        with s.run(cfg.tracking.run_name or "bench", config=cfg, params=params | load.params("bench")) as tracked:
            # `/` is the metric hierarchy in every flow (the result keys keep their dotted names for the report)
            for n, row in by_length.items():
                tracked.log_metrics({metric_key(k): v for k, v in row.items()}, step=n)
            for c, row in gen_rows.items():  # step = context length
                tracked.log_metrics({metric_key(k): v for k, v in row.items()}, step=c)
            tracked.log_metrics({metric_key(k): v for k, v in results.items() if "@" not in k})
            tracked.log_text("\n".join(report) + "\n", "bench.md")
    return BenchOutcome(tracked.run_id, results, report, warnings)


def noise_section(load: Load, warnings: list[str]) -> list[str]:
    """bench.md's first lines: the load the timings were taken under and the noise rules' warnings."""
    lines = [f"Timings: the min of their repeats (interference only adds time), max beside it; {load.text()}.", ""]
    if warnings:
        lines += ["**Noisy timings: do not read them as costs.**", "", *(f"- warning: {w}" for w in warnings), ""]
    return lines


def metric_key(name: str) -> str:
    """`tracking.sqlite.overhead_pct` -> `tracking/sqlite/overhead_pct`."""
    return name.replace(".", "/")


def _needs_runs(cfg: BenchConfig) -> bool:
    return bool({"ddp", "tracking"} & set(cfg.sections))


def _models(cfg: BenchConfig, max_seq_len: int) -> dict[str, Transformer]:
    """A fresh model per variant (the same seed), learned positions widened to `max_seq_len`."""
    models = {}
    for v in cfg.variants:
        torch.manual_seed(0)
        models[v.name] = Transformer(cfg.variant_model(v, max_seq_len=max(max_seq_len, cfg.model.max_seq_len)))
    return models


def time_steps(cfg: BenchConfig) -> tuple[dict[int, dict[str, float]], list[str]]:
    """Per length: training-step time of every variant (same process, same inputs, interleaved: the
    comparison's own timer; min of the repeats, and their max), its ratio to the first variant's and, with
    `kernels`, the linear-attention forms alone; and the noise rules' warnings on the step times."""
    models = _models(cfg, max(cfg.lengths) + 1)
    base, *others = list(models)
    timings = time_train_steps(models, cfg.lengths, cfg.tokens_per_step, cfg.warmup_steps, cfg.timed_steps)
    step_ms = {att: {n: t.value for n, t in per.items()} for att, per in timings.items()}
    out: dict[int, dict[str, float]] = {}
    for n in cfg.lengths:
        batch = max(1, cfg.tokens_per_step // n)
        row = {f"step_ms.{att}": step_ms[att][n] for att in models}
        row |= {f"step_ms.{att}_max": timings[att][n].max for att in models}
        row |= {f"tokens_per_s.{att}": batch * n / step_ms[att][n] * 1000 for att in models}
        row |= {f"ratio.{v}_over_{base}": row[f"step_ms.{v}"] / row[f"step_ms.{base}"] for v in others}
        if cfg.kernels:
            row |= _time_kernels(cfg, n, batch)
        out[n] = row
        log.info("N=%d %s", n, row)
    warnings = []
    for att, per in timings.items():
        label = f"{att} training step (by N)"
        warnings += [w for w in (RULES.spread(label, per, " ms"), RULES.curve(label, step_ms[att], " ms")) if w]
    return out, warnings


def _time_kernels(cfg: BenchConfig, n: int, batch: int) -> dict[str, float]:
    """Forward + backward of each linear-attention form alone at length n (the ALiBi decay as a constant gate)."""
    h, dh = cfg.model.n_heads, cfg.model.d_head
    ld = -alibi_slopes(h, cfg.model.alibi_exponent)
    lg = ld.view(1, h, 1).expand(batch, h, n)
    forms = {
        "quadratic": lambda q, k, v: la.quadratic(q, k, v, lg, 1e-6),
        "chunkwise": lambda q, k, v: la.chunkwise(q, k, v, lg, 1e-6, cfg.model.linear_chunk_size),
        "naive_cumulative": lambda q, k, v: naive_cumulative(q, k, v, ld, 1e-6),
    }
    row = {}
    for form, fn in forms.items():
        q, k, v = (torch.randn(batch, h, n, dh, requires_grad=True) for _ in range(3))

        def kernel(fn=fn, q=q, k=k, v=v) -> None:
            fn(fm.feature_map(q), fm.feature_map(k), v).sum().backward()

        t = time_repeats(kernel, 1, cfg.timed_steps)
        row[f"kernel_ms.{form}"], row[f"kernel_ms.{form}_max"] = t.value, t.max
    return row


def steps_table(cfg: BenchConfig, results: dict[str, float]) -> list[str]:
    base, *others = [v.name for v in cfg.variants]
    header = ["N", "batch", *(f"{v} ms/step" for v in (base, *others)), *(f"{v}/{base}" for v in others)]
    lines = [
        f"Training step: min – max of {cfg.timed_steps} repeat(s) after {cfg.warmup_steps} warmup; ratios of the mins",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for n in cfg.lengths:
        cells = [str(n), str(max(1, cfg.tokens_per_step // n))]
        cells += [f"{results[f'step_ms.{v}@{n}']:.1f} – {results[f'step_ms.{v}_max@{n}']:.1f}" for v in (base, *others)]
        cells += [f"{results[f'ratio.{v}_over_{base}@{n}']:.2f}" for v in others]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


# --------------------------------------------------------------------------------------------------
# Whole training runs: DDP speedup, tracking overhead


def _train_cli(
    runs: BenchRunsConfig,
    uri: str,
    nproc: int,
    *extra: str,
    env_extra: dict[str, str] | None = None,
    log_model: bool = False,
) -> tuple[float, dict[str, float]]:
    """Wall time of `picollm train` on `nproc` processes (torchrun when > 1) and the run's metrics."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = cmd if nproc > 1 else [sys.executable]
    cmd += ["-m", "pipelines.cli", "train", str(runs.config)]
    for item in [*runs.overrides, *(() if log_model else ("tracking.log_model=false",)), *extra]:
        cmd += ["--set", item]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **(env_extra or {})}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        log.debug("bench: stderr of the failed run:\n%s", res.stderr)
        raise PicollmError(f"bench: {' '.join(cmd[-6:])} exited {res.returncode}: {_why(res.stderr)}")
    client = MlflowClient(uri)
    [r] = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], order_by=["attributes.start_time DESC"], max_results=1
    )
    return wall, r.data.metrics


def _why(stderr: str) -> str:
    """The line of a failed run's stderr that says why: the CLI's `error:` line, else the last exception
    line (torchrun ends with a banner of '=' that says nothing), else the last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip().strip("=-*")]
    for wanted in (lambda ln: ln.startswith("error:"), lambda ln: "Error" in ln or "Exception" in ln):
        hits = [ln for ln in lines if wanted(ln)]
        if hits:
            return hits[-1]
    return lines[-1] if lines else "(no output)"


def time_ddp(runs: BenchRunsConfig, train_cfg: TrainRunConfig | None) -> dict[str, float]:
    """Training throughput (tokens/s over the epochs, evaluation excluded) of one process with all
    cores, one process with one thread, and `nproc` DDP processes with one thread each."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        tracking.init_tracking(uri)  # created once, before the concurrent ranks start
        variants = {
            "single": (1, ()),
            "single_1thread": (1, ("train.num_threads=1",)),
            f"ddp{runs.nproc}": (runs.nproc, ()),
        }
        for name, (nproc, extra) in variants.items():
            wall, metrics = _train_cli(runs, uri, nproc, *extra)
            out[f"ddp.{name}.wall_s"] = wall
            out[f"ddp.{name}.tokens_per_s"] = metrics["throughput/tokens_per_s_mean"]
            out[f"ddp.{name}.test_accuracy"] = metrics["test/accuracy"]
    ddp = out[f"ddp.ddp{runs.nproc}.tokens_per_s"]
    out["ddp.speedup_vs_single"] = ddp / out["ddp.single.tokens_per_s"]
    out["ddp.speedup_vs_single_1thread"] = ddp / out["ddp.single_1thread.tokens_per_s"]
    return out


def ddp_table(runs: BenchRunsConfig, r: dict[str, float]) -> list[str]:
    lines = ["| training | tokens/s | wall s (with imports) | test accuracy |", "|---|---|---|---|"]
    for name, label in (
        ("single", "1 process, default threads"),
        ("single_1thread", "1 process, 1 thread"),
        (f"ddp{runs.nproc}", f"{runs.nproc} DDP processes (gloo), 1 thread each"),
    ):
        lines.append(
            f"| {label} | {r[f'ddp.{name}.tokens_per_s']:,.0f} | {r[f'ddp.{name}.wall_s']:.1f} | "
            f"{r[f'ddp.{name}.test_accuracy']:.4f} |"
        )
    lines.append(
        f"\nDDP speedup: {r['ddp.speedup_vs_single']:.2f}x over one process, "
        f"{r['ddp.speedup_vs_single_1thread']:.2f}x over one single-threaded process."
    )
    return [*lines, ""]


QUIET_URLS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def time_tracking(
    runs: BenchRunsConfig, train_cfg: TrainRunConfig | None, progress: Callable[[str], None]
) -> dict[str, float]:
    """Wall time of one training run in this process (imports excluded): without MLflow, logging to
    SQLite, and logging to a PostgreSQL-backed mlflow server over HTTP. Same seed, so same work; the
    best of `runs.repeats` interleaved repeats of each."""
    assert train_cfg is not None
    # A pinned peak skips the per-run matmul probe, which is not tracking work.
    cfg = train_cfg.model_copy(deep=True)
    cfg.train.peak_flops = cfg.train.peak_flops or 1e11
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="picollm-bench-") as tmp:
        os.chmod(tmp, 0o711)  # PostgreSQL runs as `postgres` when we are root: it must reach state_dir
        stores = {"sqlite": f"sqlite:///{tmp}/mlflow.db"}
        server_cfg = None
        if runs.http_server:
            server_cfg = ServerConfig(port=_free_port(), postgres_port=_free_port(), state_dir=Path(tmp) / "server")
            try:
                stores["http"] = server.start(server_cfg)["url"]
            except PicollmError as e:
                progress(f"tracking: no HTTP server ({e}); timing SQLite only")
                server_cfg = None
        # MLflow prints "View run <url>" for every run on a server: this temporary one has no UI to visit.
        quiet_before = os.environ.get(QUIET_URLS)
        os.environ[QUIET_URLS] = "true"
        try:
            for uri in stores.values():
                tracking.init_tracking(uri)  # store creation and migrations are a one-off, not per run
            # Interleaved repeats, best of each: load from other processes hits every variant alike,
            # and the first run's one-off warm-up is not charged to whichever variant comes first.
            walls: dict[str, list[float]] = {name: [] for name in ("none", *stores)}
            for _ in range(runs.repeats):
                walls["none"].append(_timed(lambda: train_run.train_untracked(cfg)))
                for name, uri in stores.items():
                    cfg.tracking.uri = uri
                    walls[name].append(_timed(lambda: _train_tracked(cfg)))
            out.update({f"tracking.{name}.wall_s": min(w) for name, w in walls.items()})
        finally:
            if quiet_before is None:
                os.environ.pop(QUIET_URLS, None)
            else:
                os.environ[QUIET_URLS] = quiet_before
            if server_cfg is not None:
                server.stop(server_cfg)
    base = out["tracking.none.wall_s"]
    for name in stores:
        out[f"tracking.{name}.overhead_pct"] = (
            100 * (out[f"tracking.{name}.wall_s"] - base) / out[f"tracking.{name}.wall_s"]
        )
    return out


def tracking_table(r: dict[str, float]) -> list[str]:
    lines = ["| tracking | wall s | MLflow share of wall |", "|---|---|---|"]
    lines.append(f"| none (no-op) | {r['tracking.none.wall_s']:.1f} | - |")
    for name in ("sqlite", "http"):
        if f"tracking.{name}.wall_s" in r:
            lines.append(
                f"| {name} | {r[f'tracking.{name}.wall_s']:.1f} | {r[f'tracking.{name}.overhead_pct']:.1f} % |"
            )
    return [*lines, ""]


def time_sweep(sc: BenchSweepConfig) -> dict[str, float]:
    """A whole `picollm sweep` study per worker count, each in fresh stores: wall time (process start
    included), trials per minute, and the per-trial overhead: a trial's wall time (Optuna's start and end)
    minus its training epochs (`throughput/epoch_seconds` of its run), median over the trials."""
    import optuna
    from optuna.trial import TrialState

    out: dict[str, float] = {}
    for w in sc.workers:
        study = f"bench-w{w}"
        with tempfile.TemporaryDirectory(prefix="picollm-bench-sweep-") as tmp:
            uri, storage = f"sqlite:///{tmp}/mlflow.db", f"sqlite:///{tmp}/optuna.db"
            tracking.init_tracking(uri)  # migrated once, before the workers start
            cmd = [sys.executable, "-m", "pipelines.cli", "sweep", str(sc.config), "--trials", str(sc.trials)]
            cmd += ["--workers", str(w), "--storage", storage, "--study", study]
            cmd += [x for item in sc.overrides for x in ("--set", item)]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if res.returncode != 0:
                raise PicollmError(f"bench: sweep with {w} worker(s) exited {res.returncode}: {_why(res.stderr)}")
            trials = optuna.load_study(study_name=study, storage=storage).trials
            finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
            client = MlflowClient(uri)
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.`sweep.study` = '{study}'"
            )
            by_trial = {r.data.tags["sweep.trial"]: r.info.run_id for r in runs if "sweep.trial" in r.data.tags}
            overheads = []
            for t in finished:
                train = sum(
                    m.value for m in client.get_metric_history(by_trial[str(t.number)], "throughput/epoch_seconds")
                )
                overheads.append((t.datetime_complete - t.datetime_start).total_seconds() - train)
        out[f"sweep.w{w}.wall_s"] = wall
        out[f"sweep.w{w}.trials"] = float(len(finished))
        out[f"sweep.w{w}.trials_per_min"] = 60 * len(finished) / wall
        out[f"sweep.w{w}.overhead_s_median"] = statistics.median(overheads)
    return out


def sweep_table(sc: BenchSweepConfig, r: dict[str, float]) -> list[str]:
    lines = [
        "| workers | finished trials | wall s (process start incl.) | trials/min | per-trial overhead s (median) |",
        "|---|---|---|---|---|",
    ]
    for w in sc.workers:
        lines.append(
            f"| {w} | {r[f'sweep.w{w}.trials']:.0f} | {r[f'sweep.w{w}.wall_s']:.1f} | "
            f"{r[f'sweep.w{w}.trials_per_min']:.1f} | {r[f'sweep.w{w}.overhead_s_median']:.2f} |"
        )
    lines.append("\nOverhead = a trial's wall time minus its training epochs: data, evaluation, MLflow, Optuna.")
    return [*lines, ""]


# --------------------------------------------------------------------------------------------------
# Where a training process's time goes, and the reference loop side by side

BREAKDOWN_KEYS = (*PHASES, "other", "total")


def _reference_cli(config: Path, epochs: int) -> tuple[float, dict[str, float]]:
    """Wall time of a whole `python -m picollm.bench_reference` process and what it reports."""
    cmd = [sys.executable, "-m", "picollm.training.reference_loop", str(config), "--epochs", str(epochs)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise PicollmError(f"bench: the reference loop exited {res.returncode}: {_why(res.stderr)}")
    return wall, json.loads(res.stdout.strip().splitlines()[-1])


def _spread(name: str, values: list[float]) -> dict[str, float]:
    """The median and range of whole-process repeats (a breakdown's phases are medians: mins of phases
    would not add up to one run)."""
    t = Timing.of(values)
    return {name: t.median, f"{name}_min": t.min, f"{name}_max": t.max}


def time_breakdown(rc: BenchRunsConfig, progress: Callable[[str], None]) -> dict[str, float]:
    """`runs.breakdown_repeats` whole `picollm train` processes (the model logged as `make train-linear`
    does, unless `runs.log_model` is false), each followed by a reference-loop process: medians and
    spread of the wall time and of the logged time/* phases. The runs share a fresh cache directory, so
    the first is the cold one (data, ceilings and matmul peak computed) and is reported apart; the
    medians are over the rest (all of them when there is one repeat)."""
    out: dict[str, float] = {}
    walls: list[float] = []
    phases: dict[str, list[float]] = {k: [] for k in BREAKDOWN_KEYS}
    ratios: list[float] = []
    refs: list[tuple[float, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="picollm-bench-breakdown-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        tracking.init_tracking(uri)  # store creation is a one-off, not per run
        env = {"PICOLLM_CACHE_DIR": f"{tmp}/cache"}
        for i in range(rc.breakdown_repeats):
            wall, metrics = _train_cli(rc, uri, 1, env_extra=env, log_model=rc.log_model)
            progress(f"breakdown: picollm train {i + 1}/{rc.breakdown_repeats}: {wall:.1f} s")
            if i == 0:
                out["breakdown.cold.wall_s"] = wall
                out["breakdown.cold.data_s"] = metrics["time/data_s"]
                out["breakdown.cold.setup_s"] = metrics["time/setup_s"]
            if i > 0 or rc.breakdown_repeats == 1:
                walls.append(wall)
                for k in BREAKDOWN_KEYS:
                    phases[k].append(metrics[f"time/{k}_s"])
                out["breakdown.test_accuracy"] = metrics["test/accuracy"]
            if rc.reference_epochs:
                ref_wall, ref = _reference_cli(rc.config, rc.reference_epochs)
                progress(f"breakdown: reference loop {i + 1}/{rc.breakdown_repeats}: {ref_wall:.1f} s")
                refs.append((ref_wall, ref))
                if i > 0 or rc.breakdown_repeats == 1:
                    ratios.append(ref_wall / wall)
    out |= _spread("breakdown.wall_s", walls)
    for k, vals in phases.items():
        out |= _spread(f"breakdown.{k}_s", vals)
    out |= _spread("breakdown.wall_over_train", [w / t for w, t in zip(walls, phases["train"], strict=True)])
    if refs:
        out |= _spread("reference.wall_s", [w for w, _ in refs])
        out |= _spread("reference.train_s", [r["train_s"] for _, r in refs])
        out["reference.test_accuracy"] = statistics.median(r["test_accuracy"] for _, r in refs)
        out["reference.epochs"] = float(rc.reference_epochs)
        out |= _spread("ratio.reference_over_picollm", ratios)
    return out


def breakdown_table(rc: BenchRunsConfig, r: dict[str, float]) -> list[str]:
    def cell(name: str) -> str:
        return f"{r[name]:.2f} [{r[name + '_min']:.2f}-{r[name + '_max']:.2f}]"

    n = max(1, rc.breakdown_repeats - 1)
    lines = [
        f"`picollm train {rc.config}` as a whole process: median (min-max) of {n} warm run(s), seconds",
        "",
        "| phase | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {cell(f'breakdown.{k}_s')} |" for k in BREAKDOWN_KEYS]
    lines.append(f"| wall (process, from outside) | {cell('breakdown.wall_s')} |")
    lines.append(f"| wall / train | {cell('breakdown.wall_over_train')} |")
    lines.append(
        f"\nCold run (empty cache: data, ceilings and matmul peak computed): {r['breakdown.cold.wall_s']:.2f} s wall, "
        f"data {r['breakdown.cold.data_s']:.2f} s, setup {r['breakdown.cold.setup_s']:.2f} s."
    )
    if "reference.wall_s" in r:
        lines += [
            "",
            "| side by side (whole processes, alternating) | wall s | test accuracy |",
            "|---|---|---|",
            f"| picollm train | {cell('breakdown.wall_s')} | {r['breakdown.test_accuracy']:.4f} |",
            f"| reference loop, {r['reference.epochs']:.0f} epochs (picollm.bench_reference) | "
            f"{cell('reference.wall_s')} | {r['reference.test_accuracy']:.4f} |",
            f"\nReference / picollm wall time: {cell('ratio.reference_over_picollm')}x.",
        ]
    return [*lines, ""]


# --------------------------------------------------------------------------------------------------
# Generation: decode ms per token


def time_generation(cfg: BenchConfig) -> tuple[dict[int, dict[str, float]], list[str]]:
    """({context: {`gen_ms.<variant>.<path>.b<batch>`: ms per decode step, the min of the repeats, with
    `..._median`/`_max`, and `gen_speedup.<variant>.b<batch>` = cached / fast (mins)}}, the noise rules'
    warnings): every variant, fast path and cached forward, interleaved per context, `repeats` times (fresh
    caches each; each repeat the median of its steps). Batches above 1 only at contexts up to 1024: the
    cached forward's prefill builds a (B, H, N, N) bias."""
    g: BenchGenerationConfig = cfg.generation
    longest = max(g.contexts) + g.new_tokens + 8
    models = _models(cfg, longest)
    samples: dict[tuple[int, str], list[float]] = {}
    for _ in range(g.repeats):
        for c in g.contexts:
            for b in g.batch_sizes:
                if b > 1 and c > 1024:
                    continue
                for att, m in models.items():
                    for path in ("cached", "fast"):
                        ms = decoding.ms_per_token(m, c, g.new_tokens, fast=path == "fast", batch=b)
                        samples.setdefault((c, f"gen_ms.{att}.{path}.b{b}"), []).append(ms)
    out: dict[int, dict[str, float]] = {c: {} for c in g.contexts}
    timings: dict[str, dict[int, Timing]] = {}
    for (c, name), vals in samples.items():
        t = timings.setdefault(name, {})[c] = Timing.of(vals)
        out[c] |= {name: t.value, f"{name}_median": t.median, f"{name}_max": t.max}
    for c, row in out.items():
        for att in models:
            for b in g.batch_sizes:
                if f"gen_ms.{att}.fast.b{b}" in row:
                    row[f"gen_speedup.{att}.b{b}"] = row[f"gen_ms.{att}.cached.b{b}"] / row[f"gen_ms.{att}.fast.b{b}"]
        log.info("generation context %d: %s", c, row)
    warnings = []
    for name, per in timings.items():  # a decode step after a longer context cannot be cheaper
        label = f"{name.removeprefix('gen_ms.')} decode step (by context)"
        values = {c: t.value for c, t in per.items()}
        warnings += [w for w in (RULES.spread(label, per, " ms"), RULES.curve(label, values, " ms")) if w]
    return out, warnings


def generation_table(
    g: BenchGenerationConfig, rows: dict[int, dict[str, float]], variants: list[str] | None = None
) -> list[str]:
    names = variants or list(REFERENCE_PAIR)
    lines: list[str] = []
    for b in g.batch_sizes:
        header = ["context", *(f"{a} {p}" for a in names for p in ("cached", "fast")), *(f"{a} gain" for a in names)]
        lines += [
            f"Decode ms per step at batch {b}: min – max of {g.repeats} repeat(s), each a median of {g.new_tokens} "
            "steps; gains are ratios of the mins",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for c, r in rows.items():
            if f"gen_ms.{names[-1]}.fast.b{b}" not in r:
                continue
            cells = [
                f"{r[k]:.3f} – {r[k + '_max']:.3f}"
                for k in (f"gen_ms.{a}.{p}.b{b}" for a in names for p in ("cached", "fast"))
            ]
            sp = [f"{r[f'gen_speedup.{a}.b{b}']:.1f}x" for a in names]
            lines.append(f"| {c} | {' | '.join(cells)} | {' | '.join(sp)} |")
        lines.append("")
    return lines


def _train_tracked(cfg: TrainRunConfig) -> None:
    """What `picollm train` runs, in this process."""
    with runs.session("train", cfg.tracking, device=cfg.train.device, num_threads=cfg.train.num_threads) as s:
        train_run.train(s, cfg)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
