"""Computations behind `picollm compare`: intervals and tests over seeds, evaluation with calibration
and accuracy by position, length generalisation, efficiency measurements, figures and the report.

Everything here takes plain models, splits and numbers; the flow (pipelines/compare.py) owns MLflow.

Length generalisation. Sequences of exactly f x data.max_len tokens are drawn from the training
generators (same families, parameters and start values). Values are residues modulo M, so a long
sequence wraps around instead of leaving the value range; `coverage` checks this on the data
actually drawn (fraction of values and of (x_t, x_t+1) transitions that also occur in training).
A target counts as *beyond* the training length when its position is >= data.max_len, i.e. a
position at which the model never had to predict during training.

Peak memory. Each (model, length) configuration runs one training step in a fresh Python process
(`memory_worker`). Its peak resident set size is the kernel's per-process high-water mark: VmHWM in
/proc/self/status (getrusage's ru_maxrss where there is no /proc; not on Linux, because a child
started by fork + exec inherits the parent's peak in ru_maxrss). On Linux the high-water mark is
first reset to the current RSS (/proc/self/clear_refs), so `step_mb` is the memory the step itself
added on top of the model, optimizer and inputs (first step: includes AdamW's state).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import math
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402
from torch import nn  # noqa: E402

from picollm.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from picollm.data import (  # noqa: E402
    IGNORE_INDEX,
    PaddedSplit,
    SequenceSplit,
    ceiling_per_position,
    family_capacity,
    generate_sequence,
    inputs_and_targets,
)
from picollm.errors import PicollmError  # noqa: E402
from picollm.evaluation import accuracy_metrics, predict_split  # noqa: E402
from picollm.hardware import median_ms
from picollm.model import LayerCache, Transformer  # noqa: E402
from picollm.training import lm_loss, make_optimizer  # noqa: E402

log = logging.getLogger(__name__)

MODELS = ("softmax", "linear")
COLORS = {"softmax": "tab:blue", "linear": "tab:orange"}


# --------------------------------------------------------------------------------------------------
# Intervals and tests (Student t by hand: scipy is not a dependency)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes 6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


@functools.lru_cache(maxsize=256)  # called per metric and per position with a handful of (p, df)
def t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t (bisection on the CDF; 1e-12 accurate, plenty for intervals)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while 1.0 - t_sf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1.0 - t_sf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """Mean of per-run values with a two-sided confidence interval (NaN bounds when n < 2)."""

    mean: float
    low: float
    high: float
    std: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high


def mean_ci(
    values: Sequence[float], confidence: float = 0.95, method: str = "t", n_boot: int = 10000, seed: int = 0
) -> Interval:
    """t interval mean +- t_{(1+c)/2, n-1} s / sqrt(n), or a percentile bootstrap of the mean."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, math.nan, n)
    std = float(x.std(ddof=1))
    if method == "t":
        h = t_ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
        return Interval(mean, mean - h, mean + h, std, n)
    if method != "bootstrap":
        raise ValueError(f"unknown interval method {method!r}")
    means = x[np.random.default_rng(seed).integers(0, n, size=(n_boot, n))].mean(1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(mean, float(low), float(high), std, n)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's unequal-variance t-test; NaN with fewer than 2 values a side."""
    x = np.asarray([v for v in a if math.isfinite(v)], dtype=float)
    y = np.asarray([v for v in b if math.isfinite(v)], dtype=float)
    if len(x) < 2 or len(y) < 2:
        return math.nan
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    diff = float(y.mean() - x.mean())
    if vx + vy == 0:  # every seed gave the same value on both sides
        return 1.0 if diff == 0 else 0.0
    t = diff / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    return min(1.0, 2.0 * t_sf(abs(t), df))


# --------------------------------------------------------------------------------------------------
# Evaluation: the metrics of picollm.evaluation plus calibration and accuracy by position


@torch.no_grad()
def predict(model: nn.Module, split: PaddedSplit, batch_size: int = 256) -> tuple[torch.Tensor, ...]:
    """Per-target (N, Lmax-1) correctness, NLL and confidence (max probability).

    Batches exactly like evaluation.predict_split (it is that function), so loss and accuracy equal what the
    training flow logged for the same model and split."""
    _, correct, nll, conf = predict_split(model, split, batch_size, with_confidence=True)
    return correct, nll, conf


def valid_targets(split: PaddedSplit) -> torch.Tensor:
    return inputs_and_targets(split.tokens, split.pad_id)[1] != IGNORE_INDEX


def expected_calibration_error(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 10) -> float:
    """sum_b |B_b|/N |accuracy(B_b) - confidence(B_b)| over equal-width confidence bins."""
    conf, hit = conf.flatten().double(), correct.flatten().double()
    if not len(conf):
        return math.nan
    b = (conf * n_bins).long().clamp(0, n_bins - 1)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add(0, b, hit)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add(0, b, conf)
    return float((acc_sum - conf_sum).abs().sum() / len(conf))


def accuracy_by_position(split: PaddedSplit, correct: torch.Tensor) -> np.ndarray:
    """Accuracy of the targets at sequence positions 1..Lmax-1 (index i = position i+1); NaN where none."""
    valid = valid_targets(split)
    den = valid.sum(0).double()
    acc = (correct & valid).sum(0).double() / den.clamp(min=1)
    return torch.where(den > 0, acc, torch.full_like(acc, math.nan)).numpy()


def restrict_targets(split: PaddedSplit, keep: torch.Tensor) -> PaddedSplit:
    """The split with every target outside `keep` (N, Lmax-1) turned into padding. accuracy_metrics
    reads only the targets from `tokens`, so predictions made on the full split can be re-aggregated
    over a subset of positions with the same definitions."""
    tokens = split.tokens.clone()
    tokens[:, 1:][~keep] = split.pad_id
    return dataclasses.replace(split, tokens=tokens)


def evaluate_model(
    model: nn.Module, splits: dict[str, PaddedSplit], batch_size: int = 256, n_bins: int = 10
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """`eval/{split}/...`: loss, accuracy (overall, per family, predictable positions, vs ceiling),
    ECE and mean confidence; plus accuracy by position per split."""
    metrics: dict[str, float] = {}
    curves: dict[str, np.ndarray] = {}
    for name, split in splits.items():
        correct, nll, conf = predict(model, split, batch_size)
        prefix = f"eval/{name}"
        metrics.update(accuracy_metrics(split, correct, nll, prefix))
        valid = valid_targets(split)
        metrics[f"{prefix}/ece"] = expected_calibration_error(conf[valid], correct[valid], n_bins)
        metrics[f"{prefix}/confidence"] = float(conf[valid].mean())
        curves[f"{prefix}/accuracy_by_position"] = accuracy_by_position(split, correct)
    return metrics, curves


# --------------------------------------------------------------------------------------------------
# Length generalisation


def long_sequences(cfg: DataConfig, length: int, n_per_family: int, exclude: set[bytes] | None = None) -> SequenceSplit:
    """`n_per_family` sequences of exactly `length` tokens per family, from the training generators,
    distinct from each other and from `exclude` (the training data's contents), with Bayes ceilings."""
    rng = np.random.default_rng([cfg.seed, 7919, length])  # own stream: independent of the splits
    fixed = cfg.model_copy(update={"min_len": length, "max_len": length})
    seen = set(exclude or ())
    out = SequenceSplit(f"len{length}", [], [], [])
    for fam in cfg.seq_types:
        cap = family_capacity(fam, fixed)
        n = int(min(n_per_family, cap))
        if n < n_per_family:
            log.warning("family %s has only %d distinct sequences of length %d", fam, n, length)
        got = attempts = 0
        while got < n and attempts < 50 * n + 1000:
            attempts += 1
            seq = generate_sequence(fam, length, cfg, rng).astype(np.int64)
            if seq.tobytes() in seen:
                continue
            seen.add(seq.tobytes())
            out.sequences.append(seq)
            out.families.append(fam)
            out.ceilings.append(ceiling_per_position(seq, fam, cfg))
            got += 1
    if not out.sequences:
        raise PicollmError(f"no new sequences of length {length} could be drawn; widen the data parameters")
    return out


def coverage(train: SequenceSplit, split: SequenceSplit, modulus: int) -> dict[str, float]:
    """Fraction of the split's values, and of its (x_t, x_t+1) transitions (overall and per family),
    that occur anywhere in the training split."""

    def pairs(seqs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([s[:-1] * (modulus + 1) + s[1:] for s in seqs if len(s) > 1] or [np.zeros(0, int)])

    seen = pairs(train.sequences)
    out = {
        "value_coverage": float(np.isin(np.concatenate(split.sequences), np.concatenate(train.sequences)).mean()),
        "transition_coverage": float(np.isin(pairs(split.sequences), seen).mean()),
    }
    for fam in dict.fromkeys(split.families):
        mine = pairs([s for s, f in zip(split.sequences, split.families, strict=True) if f == fam])
        if len(mine):
            out[f"transition_coverage/{fam}"] = float(np.isin(mine, seen).mean())
    return out


def length_generalisation(
    model: nn.Module, long: dict[int, PaddedSplit], train_len: int, batch_size: int = 256
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """`lengen/x{f}/...` on every length factor f: all targets, and `lengen/x{f}/beyond/...` on the
    targets at positions >= train_len only (none at f = 1); accuracy by position per factor."""
    metrics: dict[str, float] = {}
    curves: dict[str, np.ndarray] = {}
    for factor, split in long.items():
        correct, nll, _ = predict(model, split, batch_size)
        prefix = f"lengen/x{factor}"
        metrics.update(accuracy_metrics(split, correct, nll, prefix))
        positions = torch.arange(1, split.tokens.shape[1])  # position of each target in its sequence
        beyond = (positions >= train_len)[None, :].expand_as(correct)
        if bool((beyond & valid_targets(split)).any()):
            metrics.update(accuracy_metrics(restrict_targets(split, beyond), correct, nll, f"{prefix}/beyond"))
        curves[f"{prefix}/accuracy_by_position"] = accuracy_by_position(split, correct)
    return metrics, curves


# --------------------------------------------------------------------------------------------------
# Efficiency


@dataclass
class Efficiency:
    lengths: list[int]
    batches: dict[int, int]
    contexts: list[int]
    threads: int
    step_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    memory: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    gen_ms_per_token: dict[str, dict[int, float]] = field(default_factory=dict)
    prefill_ms: dict[str, dict[int, float]] = field(default_factory=dict)

    def metrics(self) -> dict[tuple[str, int], float]:
        """{(metric name, step = length): value} for MLflow."""
        out: dict[tuple[str, int], float] = {}
        for att in self.step_ms:
            for n, ms in self.step_ms[att].items():
                out[(f"efficiency/{att}/step_ms", n)] = ms
                out[(f"efficiency/{att}/tokens_per_s", n)] = self.batches[n] * n / ms * 1000
            for n, mem in self.memory.get(att, {}).items():
                out[(f"efficiency/{att}/step_mb", n)] = mem["step_mb"]
                out[(f"efficiency/{att}/peak_rss_mb", n)] = mem["peak_rss_mb"]
            for n, ms in self.gen_ms_per_token.get(att, {}).items():
                out[(f"efficiency/{att}/gen_ms_per_token", n)] = ms
                out[(f"efficiency/{att}/prefill_ms", n)] = self.prefill_ms[att][n]
        return out


def efficiency_models(configs: dict[str, ModelConfig], longest: int) -> dict[str, Transformer]:
    """Freshly initialised copies of the compared architectures (timing does not depend on the
    weights); a learned positional table is widened to the longest measured sequence."""
    out = {}
    for att, mc in configs.items():
        torch.manual_seed(0)
        out[att] = Transformer(mc.model_copy(update={"max_seq_len": max(mc.max_seq_len, longest + 1)}))
    return out


def time_train_steps(
    models: dict[str, Transformer], lengths: list[int], tokens_per_step: int, warmup: int, timed: int
) -> dict[str, dict[int, float]]:
    """Median ms per training step (forward, backward, AdamW), the models interleaved per length on
    the same inputs so machine noise hits both alike."""
    out: dict[str, dict[int, float]] = {att: {} for att in models}
    opts = {att: make_optimizer(m, TrainConfig()) for att, m in models.items()}
    for n in lengths:
        vocab = next(iter(models.values())).cfg.vocab_size or 2
        tokens = torch.randint(0, vocab - 1, (max(1, tokens_per_step // n), n + 1))
        for att, m in models.items():
            m.train()

            def step(m: Transformer = m, opt: torch.optim.Optimizer = opts[att], tokens: torch.Tensor = tokens) -> None:
                loss, _ = lm_loss(m, tokens, m.pad_id)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            out[att][n] = median_ms(step, warmup, timed)
            log.info("train step %s N=%d: %.1f ms", att, n, out[att][n])
    return out


@torch.no_grad()
def decode_timing(model: Transformer, prompt: torch.Tensor, new_tokens: int, warmup: int = 2) -> tuple[float, float]:
    """(prefill ms, median ms per generated token) of greedy decoding after `prompt` (1, C).

    The loop of Transformer.generate, timed step by step: the KV cache (softmax) grows with the
    context, the recurrent state (linear) does not."""
    model.eval()
    caches = [LayerCache() for _ in model.blocks]
    key_mask = torch.ones_like(prompt, dtype=torch.bool)
    t0 = time.perf_counter()
    logits = model(prompt, key_mask=key_mask, caches=caches)[:, -1]
    prefill = (time.perf_counter() - t0) * 1000
    times = []
    for i in range(warmup + new_tokens):
        nxt = logits.argmax(-1)
        key_mask = torch.cat([key_mask, torch.ones_like(nxt[:, None], dtype=torch.bool)], dim=1)
        t0 = time.perf_counter()
        logits = model(nxt[:, None], key_mask=key_mask, caches=caches)[:, -1]
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return prefill, statistics.median(times) * 1000


def time_generation(
    models: dict[str, Transformer], contexts: list[int], new_tokens: int
) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """({att: {context: prefill ms}}, {att: {context: ms per token}}), interleaved per context."""
    prefill: dict[str, dict[int, float]] = {att: {} for att in models}
    per_token: dict[str, dict[int, float]] = {att: {} for att in models}
    for c in contexts:
        vocab = next(iter(models.values())).cfg.vocab_size or 2
        prompt = torch.randint(0, vocab - 1, (1, c))
        for att, m in models.items():
            prefill[att][c], per_token[att][c] = decode_timing(m, prompt, new_tokens)
            log.info("generation %s context %d: %.2f ms/token", att, c, per_token[att][c])
    return prefill, per_token


def _proc_status_mb(name: str) -> float | None:
    """VmRSS (current) or VmHWM (peak) of this process in MiB, from /proc/self/status (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{name}:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError):
        pass
    return None


def _peak_rss_mb() -> float:
    # VmHWM rather than ru_maxrss where there is one: a child started by fork/vfork + exec inherits the
    # parent's peak in ru_maxrss (the kernel keeps it in signal->maxrss), which hides the child's own peak.
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def memory_worker(payload: str) -> None:
    """Entry point of the measuring subprocess: one training step, peak RSS as JSON on stdout."""
    p = json.loads(payload)
    torch.set_num_threads(int(p["threads"]))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.model_validate(p["model"]))
    opt = make_optimizer(model, TrainConfig())
    tokens = torch.randint(0, model.cfg.vocab_size - 1, (p["batch"], p["length"] + 1))
    gc.collect()
    reset = False
    try:  # "5" resets the peak RSS to the current RSS (Linux >= 4.0): the import's peak drops out
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        pass
    before = _proc_status_mb("VmRSS")
    loss, _ = lm_loss(model, tokens, model.pad_id)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    peak = _peak_rss_mb()
    step = peak - before if before is not None and reset else math.nan
    # The parent process reads this JSON line from the worker's stdout (an IPC channel, not UI output).
    sys.stdout.write(json.dumps({"peak_rss_mb": peak, "before_mb": before, "step_mb": step, "reset": reset}) + "\n")


def measure_step_memory(model_cfg: ModelConfig, length: int, batch: int, timeout: float = 900) -> dict[str, float]:
    """Peak memory of one training step in a fresh process (see the module docstring); NaN on failure."""
    payload = json.dumps(
        {
            "model": model_cfg.model_dump(mode="json"),
            "length": length,
            "batch": batch,
            "threads": torch.get_num_threads(),
        }
    )
    code = "import sys; from picollm.compare import memory_worker; memory_worker(sys.argv[1])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    except (subprocess.TimeoutExpired, OSError, ValueError, IndexError) as e:
        why = f"{type(e).__name__}: {e}"
    log.warning("memory measurement of %s attention at length %d failed: %s", model_cfg.attention, length, why[:200])
    return {"peak_rss_mb": math.nan, "before_mb": math.nan, "step_mb": math.nan, "reset": False}


# --------------------------------------------------------------------------------------------------
# Aggregation over seeds


Aggregate = dict[str, dict[str, Interval]]  # model -> metric -> interval over its runs


def aggregate(
    runs: dict[str, list[dict[str, float]]], confidence: float = 0.95, method: str = "t", n_boot: int = 10000
) -> Aggregate:
    out: Aggregate = {}
    for att, per_run in runs.items():
        keys = sorted({k for m in per_run for k in m})
        out[att] = {k: mean_ci([m[k] for m in per_run if k in m], confidence, method, n_boot) for k in keys}
    return out


def p_values(runs: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Welch p (softmax vs linear) of every metric both models report."""
    a, b = runs["softmax"], runs["linear"]
    keys = sorted({k for m in a for k in m} & {k for m in b for k in m})
    return {k: welch_p([m[k] for m in a if k in m], [m[k] for m in b if k in m]) for k in keys}


def aggregate_metrics(agg: Aggregate, pvals: dict[str, float]) -> dict[str, float]:
    """Flat MLflow metrics of the parent run: {model}/{metric}/{mean,ci_low,ci_high} and
    diff/{metric}/{mean,welch_p} (diff = linear - softmax)."""
    out: dict[str, float] = {}
    for att, metrics in agg.items():
        for k, iv in metrics.items():
            out |= {f"{att}/{k}/mean": iv.mean, f"{att}/{k}/ci_low": iv.low, f"{att}/{k}/ci_high": iv.high}
    for k, p in pvals.items():
        out[f"diff/{k}/mean"] = agg["linear"][k].mean - agg["softmax"][k].mean
        out[f"diff/{k}/welch_p"] = p
    return {k: v for k, v in out.items() if math.isfinite(v)}


def headline_keys(factors: list[int]) -> list[tuple[str, str, bool]]:
    """(metric, label, higher is better) of the summary table."""
    rows = [
        ("eval/test/loss", "test loss (NLL)", False),
        ("eval/test/accuracy", "test accuracy", True),
        ("eval/test/accuracy_predictable", "test acc. (predictable pos.)", True),
        ("eval/test/accuracy_vs_ceiling", "test acc. / Bayes ceiling", True),
        ("eval/test/ece", "test ECE", False),
    ]
    for f in sorted(factors):
        if f > 1:
            rows.append((f"lengen/x{f}/beyond/accuracy", f"acc. beyond train length, {f}x", True))
    return rows


def fmt_interval(iv: Interval | None, digits: int = 3) -> str:
    if iv is None or not math.isfinite(iv.mean):
        return "-"
    if not math.isfinite(iv.low):
        return f"{iv.mean:.{digits}f}"
    if abs(iv.mean - (iv.low + iv.high) / 2) < 1e-9 * max(1.0, abs(iv.mean)):
        return f"{iv.mean:.{digits}f} ± {iv.half_width:.{digits}f}"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def verdict(a: Interval | None, b: Interval | None, p: float, alpha: float, higher_better: bool) -> str:
    """Plain words: `within noise` unless Welch's test rejects equal means at level alpha."""
    if a is None or b is None or not math.isfinite(p):
        return "n/a (fewer than 2 runs a side)"
    if p > alpha:
        return "within noise"
    better = "linear" if (b.mean > a.mean) == higher_better else "softmax"
    return f"{better} better"


def summary_rows(
    agg: Aggregate, pvals: dict[str, float], keys: list[tuple[str, str, bool]], alpha: float
) -> list[dict[str, str]]:
    rows = []
    for key, label, higher in keys:
        a, b = agg["softmax"].get(key), agg["linear"].get(key)
        if a is None and b is None:
            continue
        p = pvals.get(key, math.nan)
        diff = b.mean - a.mean if a is not None and b is not None else math.nan
        rows.append(
            {
                "metric": label,
                "softmax": fmt_interval(a),
                "linear": fmt_interval(b),
                "diff": f"{diff:+.3f}" if math.isfinite(diff) else "-",
                "welch_p": f"{p:.3f}" if math.isfinite(p) else "-",
                "cis_overlap": ("yes" if a.overlaps(b) else "no")
                if a is not None and b is not None and math.isfinite(a.low) and math.isfinite(b.low)
                else "-",
                "verdict": verdict(a, b, p, alpha, higher),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------
# Figures


def close(fig: Figure) -> None:
    plt.close(fig)


def band(curves: list[np.ndarray], confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise mean and t interval of equal-length curves (NaN-padded); no band for one curve."""
    width = max(len(c) for c in curves)
    x = np.full((len(curves), width), np.nan)
    for i, c in enumerate(curves):
        x[i, : len(c)] = c
    n = np.isfinite(x).sum(0)
    with _quiet():
        mean = np.nanmean(x, 0)
        sd = np.nanstd(x, 0, ddof=1) if len(curves) > 1 else np.full(width, np.nan)
    q = np.array([t_ppf(0.5 + confidence / 2, k - 1) if k > 1 else np.nan for k in n])
    h = q * sd / np.sqrt(np.maximum(n, 1))
    return mean, mean - h, mean + h


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's warnings about all-NaN columns (positions that no run reaches)."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def loss_curves(histories: dict[str, list[list[dict[str, float]]]]) -> Figure:
    """Train and validation loss per epoch: mean over seeds, shaded from the min to the max seed."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("train/loss", "val/loss"), strict=True):
        for att, runs in histories.items():
            runs = [[h[key] for h in hist if key in h] for hist in runs]
            runs = [r for r in runs if r]
            if not runs:
                continue
            width = max(len(r) for r in runs)
            x = np.full((len(runs), width), np.nan)
            for i, r in enumerate(runs):
                x[i, : len(r)] = r
            epochs = np.arange(1, width + 1)
            with _quiet():
                ax.plot(epochs, np.nanmean(x, 0), marker="o", color=COLORS[att], label=f"{att} (n={len(runs)})")
                ax.fill_between(epochs, np.nanmin(x, 0), np.nanmax(x, 0), color=COLORS[att], alpha=0.25)
        ax.set(xlabel="epoch", ylabel="cross-entropy", title=f"{key} (mean, shaded min-max over seeds)", yscale="log")
        ax.legend()
    fig.tight_layout()
    return fig


def family_accuracy_ci(agg: Aggregate, families: list[str], prefix: str = "eval/test") -> Figure:
    """Accuracy per family (and overall) of both models with CI error bars; the Bayes ceiling as a tick."""
    groups = [*families, "all"]
    fig, ax = plt.subplots(figsize=(1.5 * len(groups) + 3, 4.2))
    xs = np.arange(len(groups))
    for j, att in enumerate(MODELS):
        ivs = [agg[att].get(f"{prefix}/accuracy" + ("" if g == "all" else f"/{g}")) for g in groups]
        mean = np.array([iv.mean if iv else np.nan for iv in ivs])
        err = np.array(
            [[iv.mean - iv.low, iv.high - iv.mean] if iv and math.isfinite(iv.low) else [0, 0] for iv in ivs]
        ).T
        ax.bar(xs + (j - 0.5) * 0.38, mean, width=0.38, yerr=err, capsize=4, color=COLORS[att], label=att)
    ceil = [agg["softmax"].get(f"{prefix}/ceiling" + ("" if g == "all" else f"/{g}")) for g in groups]
    ax.scatter(
        xs, [c.mean if c else np.nan for c in ceil], marker="_", s=900, color="black", zorder=3, label="Bayes ceiling"
    )
    ax.set_xticks(xs, groups, rotation=15)
    split = prefix.split("/")[-1]
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title=f"{split} accuracy per family (mean, CI over seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def position_accuracy(
    curves: dict[str, list[np.ndarray]],
    confidence: float,
    train_len: int | None = None,
    title: str = "test accuracy by position",
) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 4))
    _plot_positions(ax, curves, confidence, train_len)
    ax.set(title=title)
    fig.tight_layout()
    return fig


def _plot_positions(ax, curves: dict[str, list[np.ndarray]], confidence: float, train_len: int | None) -> None:
    for att, runs in curves.items():
        mean, low, high = band(runs, confidence)
        pos = np.arange(1, len(mean) + 1)
        ax.plot(pos, mean, color=COLORS[att], label=att)
        ax.fill_between(pos, np.clip(low, 0, 1), np.clip(high, 0, 1), color=COLORS[att], alpha=0.25)
    if train_len is not None:
        ax.axvline(train_len - 0.5, ls="--", color="grey", label=f"training length ({train_len})")
    ax.set(xlabel="position of the predicted token", ylabel="accuracy", ylim=(-0.02, 1.02))
    ax.legend(loc="lower left")


def length_curves(
    agg: Aggregate,
    factors: list[int],
    train_len: int,
    families: list[str],
    position_curves: dict[str, list[np.ndarray]],
    confidence: float,
) -> Figure:
    """Accuracy vs evaluated length (all targets solid, targets beyond the training length dashed),
    overall and per family, the training length marked; last panel: accuracy by position at the
    longest length."""
    groups = ["all", *families]
    ncols = 4
    nrows = math.ceil((len(groups) + 1) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    flat = axes.flatten()
    lengths = [f * train_len for f in sorted(factors)]
    for ax, g in zip(flat, groups, strict=False):
        sfx = "" if g == "all" else f"/{g}"
        for att in MODELS:
            for kind, ls in (("", "-"), ("/beyond", "--")):
                ivs = [agg[att].get(f"lengen/x{f}{kind}/accuracy{sfx}") for f in sorted(factors)]
                pts = [(n, iv) for n, iv in zip(lengths, ivs, strict=True) if iv is not None]
                if not pts:
                    continue
                xs = [n for n, _ in pts]
                mean = np.array([iv.mean for _, iv in pts])
                err = np.array(
                    [[iv.mean - iv.low, iv.high - iv.mean] if math.isfinite(iv.low) else [0, 0] for _, iv in pts]
                ).T
                ax.errorbar(
                    xs,
                    mean,
                    yerr=err,
                    ls=ls,
                    marker="o",
                    capsize=3,
                    color=COLORS[att],
                    label=f"{att}{' beyond' if kind else ''}",
                )
        ceil = [agg["softmax"].get(f"lengen/x{f}/beyond/ceiling{sfx}") for f in sorted(factors)]
        pts = [(n, c.mean) for n, c in zip(lengths, ceil, strict=True) if c is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), ls=":", color="black", label="ceiling beyond")
        ax.axvline(train_len, ls="--", color="grey", label="training length")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured lengths
        ax.set(xlabel="sequence length", ylabel="accuracy", ylim=(-0.02, 1.05), title=g)
    flat[0].legend(fontsize=7, loc="lower left")
    big = max(factors)
    _plot_positions(flat[len(groups)], position_curves, confidence, train_len)
    flat[len(groups)].set_title(f"accuracy by position at {big}x ({big * train_len} tokens)")
    for ax in flat[len(groups) + 1 :]:
        ax.set_visible(False)
    fig.suptitle("length generalisation (mean, CI over seeds)")
    fig.tight_layout()
    return fig


def efficiency_figure(eff: Efficiency) -> Figure:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for att in eff.step_ms:
        kw = {"marker": "o", "color": COLORS[att], "label": att}
        axes[0].plot(eff.lengths, [eff.step_ms[att][n] for n in eff.lengths], **kw)
        if eff.memory.get(att):
            axes[1].plot(eff.lengths, [eff.memory[att][n]["step_mb"] for n in eff.lengths], **kw)
        if eff.gen_ms_per_token.get(att):
            axes[2].plot(eff.contexts, [eff.gen_ms_per_token[att][c] for c in eff.contexts], **kw)
    axes[0].set(title="training step time (median)", xlabel="sequence length", ylabel="ms / step")
    axes[1].set(
        title="training step peak memory (fresh process, RSS)",
        xlabel="sequence length",
        ylabel="MB above model + inputs",
    )
    axes[2].set(title="generation time per token (batch 1)", xlabel="context length", ylabel="ms / token")
    for ax, xs in zip(axes, (eff.lengths, eff.lengths, eff.contexts), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured lengths
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:  # e.g. efficiency.memory: false
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", color="grey")
    fig.text(0.01, 0.01, f"batch = tokens_per_step // length: {eff.batches}; torch threads {eff.threads}", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def attention_figures(
    models: dict[str, Transformer], split: PaddedSplit, family: str, positions: int, batch_size: int = 256
) -> dict[str, Figure]:
    """One figure per model on the same sequences of `family` (the same example sequence on top),
    drawn by picollm.analysis_plots.attention_figure, whose colour scale is fixed to [0, 1] for every
    panel, so the two models' heatmaps share one scale."""
    from picollm import analysis as an
    from picollm import analysis_plots as ap

    assert split.family_ids is not None
    idx = torch.nonzero(split.family_ids == split.family_names.index(family)).flatten()
    lengths = split.lengths[idx]
    long_enough = torch.nonzero(lengths >= positions).flatten()
    ex = int(long_enough[0]) if len(long_enough) else int(lengths.argmax())
    pe = min(positions, int(lengths[ex]))
    tokens = split.tokens[idx]
    out = {}
    for att, model in models.items():
        names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
        cache = an.run_cached(model, tokens, names, batch_size)
        pat = torch.stack([cache[n] for n in names], 1)  # (B, L, H, N, N)
        mean = torch.stack([an.mean_pattern(pat[:, layer], lengths, positions) for layer in range(len(names))])
        out[att] = ap.attention_figure(
            family, pat[ex, :, :, :pe, :pe], tokens[ex, :pe].tolist(), mean, len(idx), model.cfg.attention
        )
    return out


def embedding_figures(models: dict[str, Transformer], seed: int = 0) -> tuple[dict[str, Figure], dict[str, dict]]:
    """Embedding PCA of each model beside a random init of its config (picollm.analysis_plots)."""
    from picollm import analysis as an
    from picollm import analysis_plots as ap

    figs, metrics = {}, {}
    for att, model in models.items():
        trained = an.analyse_embeddings(an.number_embeddings(model), an.number_tokens(model))
        torch.manual_seed(seed)
        random = Transformer(model.cfg)
        rnd = an.analyse_embeddings(an.number_embeddings(random), an.number_tokens(random))
        figs[att] = ap.embeddings_figure(trained, rnd, f"{att} attention")
        metrics[att] = trained.metrics
    return figs, metrics


# --------------------------------------------------------------------------------------------------
# Report


@dataclass
class ReportInput:
    title: str
    mode: str  # "train" or "registry"
    parent_run_id: str
    seconds: float
    setup: list[str]  # bullet lines
    runs: dict[str, list[str]]  # model -> labels of its runs (seeds or references)
    families: list[str]
    factors: list[int]
    train_len: int
    agg: Aggregate
    pvals: dict[str, float]
    rows: list[dict[str, str]]
    alpha: float
    ci_text: str
    coverage: dict[str, dict[str, float]]  # "test split" and "<f>x" -> coverage()
    efficiency: Efficiency | None
    figures: list[tuple[str, str]]  # (caption, artifact path)
    extra: list[str] = field(default_factory=list)  # extra markdown sections


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


ROW_COLUMNS = [
    ("metric", "metric"),
    ("softmax", "softmax"),
    ("linear", "linear"),
    ("diff", "linear − softmax"),
    ("welch_p", "Welch p"),
    ("cis_overlap", "CIs overlap"),
    ("verdict", "verdict"),
]


def _cmp_row(r: ReportInput, key: str, label: str) -> list[str] | None:
    a, b = r.agg["softmax"].get(key), r.agg["linear"].get(key)
    if a is None and b is None:
        return None
    p = r.pvals.get(key, math.nan)
    return [label, fmt_interval(a), fmt_interval(b), f"{p:.3f}" if math.isfinite(p) else "-"]


def _noise_line(r: ReportInput, items: list[tuple[str, str]]) -> list[str]:
    """A sentence naming the table's differences with Welch p <= alpha; all others are within noise."""
    tested = [(key, label, r.pvals[key]) for key, label in items if math.isfinite(r.pvals.get(key, math.nan))]
    if not tested:
        return ["", "No test: fewer than 2 runs a side."]
    real = []
    for key, label, p in tested:
        higher = r.agg["linear"][key].mean > r.agg["softmax"][key].mean
        if p <= r.alpha:
            real.append(f"{label} (linear {'higher' if higher else 'lower'}, p = {p:.3f})")
    if not real:
        return ["", f"Every difference in this table is within noise (Welch p > {r.alpha})."]
    return ["", f"Real differences (p ≤ {r.alpha}): {'; '.join(real)}. Everything else in this table is within noise."]


SPLIT_METRICS = [
    ("loss", "loss"),
    ("accuracy", "accuracy"),
    ("accuracy_predictable", "acc. predictable"),
    ("accuracy_vs_ceiling", "acc. / ceiling"),
    ("ece", "ECE"),
    ("confidence", "mean confidence"),
]


def render_report(r: ReportInput) -> str:
    n = {att: len(labels) for att, labels in r.runs.items()}
    lines = [
        f"# {r.title}",
        "",
        f"Parent run `{r.parent_run_id}` · mode: **{r.mode}** · wall time {r.seconds:.0f} s · "
        f"runs: softmax n={n['softmax']}, linear n={n['linear']}",
        "",
        "## Setup",
        "",
        *[f"- {s}" for s in r.setup],
        "",
        "## Headline",
        "",
        f"Mean over runs ± {r.ci_text}. Difference = linear − softmax; Welch's unequal-variance t-test, "
        f"a difference is called real when p ≤ {r.alpha}.",
        "",
    ]
    lines += md_table([h for _, h in ROW_COLUMNS], [[row[k] for k, _ in ROW_COLUMNS] for row in r.rows])
    noise = [row["metric"] for row in r.rows if row["verdict"] == "within noise"]
    real = [f"{row['metric']} ({row['verdict']})" for row in r.rows if row["verdict"].endswith("better")]
    lines += [
        "",
        f"**Within noise** (p > {r.alpha}): {', '.join(noise) if noise else 'none'}.",
        "",
        f"**Real differences** (p ≤ {r.alpha}): {', '.join(real) if real else 'none'}.",
    ]
    if any(row["verdict"].startswith("n/a") for row in r.rows):
        lines += [
            "",
            "With one run per model there is no interval and no test: every difference is of unknown significance.",
        ]

    lines += ["", "## Every split", ""]
    table = []
    items = [
        (f"eval/{split}/{m}", f"{split} {label}") for split in ("train", "val", "test") for m, label in SPLIT_METRICS
    ]
    for key, label in items:
        row = _cmp_row(r, key, label)
        if row:
            table.append(row)
    lines += md_table(["metric", "softmax", "linear", "Welch p"], table)
    lines += _noise_line(r, items)

    lines += ["", "## Per family (test)", ""]
    table = []
    for fam in r.families:
        row = _cmp_row(r, f"eval/test/accuracy/{fam}", fam)
        if row:
            ceil = r.agg["softmax"].get(f"eval/test/ceiling/{fam}")
            acc_c = [fmt_interval(r.agg[att].get(f"eval/test/accuracy_vs_ceiling/{fam}")) for att in MODELS]
            table.append([*row[:3], f"{ceil.mean:.3f}" if ceil else "-", *acc_c, row[3]])
    lines += md_table(
        [
            "family",
            "softmax acc.",
            "linear acc.",
            "ceiling",
            "softmax acc./ceiling",
            "linear acc./ceiling",
            "Welch p (acc.)",
        ],
        table,
    )
    lines += _noise_line(r, [(f"eval/test/accuracy/{fam}", fam) for fam in r.families])

    lines += [
        "",
        "## Length generalisation",
        "",
        f"Sequences of exactly f × {r.train_len} tokens (f = {', '.join(map(str, sorted(r.factors)))}) are "
        "drawn from the training generators with the training parameters and start values, content-disjoint "
        "from the training data. Values are residues modulo M, so long sequences wrap around rather than "
        "reaching values outside the trained range; the coverage table below checks this on the sequences "
        "actually drawn (fraction of their values, and of their x_t → x_t+1 transitions, that also occur in "
        f"the training split). *Beyond* = targets at (0-based) positions ≥ {r.train_len}, where the model "
        "never had to predict in training. The ceiling is the Bayes-optimal accuracy on the same targets.",
        "",
    ]
    table = []
    for f in sorted(r.factors):
        cells = [f"{f}× ({f * r.train_len})"]
        for key in ("accuracy", "beyond/accuracy"):
            cells += [fmt_interval(r.agg[att].get(f"lengen/x{f}/{key}")) for att in MODELS]
            p = r.pvals.get(f"lengen/x{f}/{key}", math.nan)
            cells.append(f"{p:.3f}" if math.isfinite(p) else "-")
        c = r.agg["softmax"].get(f"lengen/x{f}/beyond/ceiling")
        cells.append(f"{c.mean:.3f}" if c else "-")
        table.append(cells)
    lines += md_table(
        [
            "length",
            "softmax acc.",
            "linear acc.",
            "p",
            "softmax acc. beyond",
            "linear acc. beyond",
            "p beyond",
            "ceiling beyond",
        ],
        table,
    )
    lines += _noise_line(
        r,
        [(f"lengen/x{f}/accuracy", f"accuracy at {f}×") for f in sorted(r.factors)]
        + [(f"lengen/x{f}/beyond/accuracy", f"accuracy beyond at {f}×") for f in sorted(r.factors)],
    )
    lines += [
        "",
        "Coverage by the training split (the ordinary test split for reference). Alternating pairs "
        "(a, b) come from M·(M−1) combinations, so most are new in any split: that family tests the "
        "copy rule, not memorised transitions.",
        "",
    ]
    cov_fams = [f for f in r.families if any(f"transition_coverage/{f}" in c for c in r.coverage.values())]
    cov_keys = ["value_coverage", "transition_coverage", *(f"transition_coverage/{f}" for f in cov_fams)]
    lines += md_table(
        ["sequences", "values", "transitions", *(f"transitions: {f}" for f in cov_fams)],
        [[name, *(f"{c.get(k, math.nan):.3f}" for k in cov_keys)] for name, c in r.coverage.items()],
    )
    big = max(r.factors)
    if big > 1:
        lines += ["", f"Per family, targets beyond the training length at {big}× ({big * r.train_len} tokens):", ""]
        table = []
        for fam in r.families:
            row = _cmp_row(r, f"lengen/x{big}/beyond/accuracy/{fam}", fam)
            if row:
                c = r.agg["softmax"].get(f"lengen/x{big}/beyond/ceiling/{fam}")
                table.append([*row[:3], f"{c.mean:.3f}" if c else "-", row[3]])
        lines += md_table(["family", "softmax", "linear", "ceiling", "Welch p"], table)
        lines += _noise_line(r, [(f"lengen/x{big}/beyond/accuracy/{fam}", fam) for fam in r.families])

    if r.efficiency is not None:
        e = r.efficiency
        lines += [
            "",
            "## Efficiency",
            "",
            f"Both models (fresh weights, same architecture as compared) measured side by side in one process, "
            f"interleaved per length, on the CPU with {e.threads} torch thread(s); times are medians. "
            "Training step = forward + backward + AdamW on a batch of max(1, tokens_per_step // N) sequences. "
            "Peak memory: one training step per (model, length) in a fresh Python process; its peak RSS "
            "is the kernel high-water mark VmHWM (/proc/self/status; ru_maxrss is not used on Linux because "
            "a child inherits its parent's peak there), reset to the current RSS just before the step "
            "(/proc/self/clear_refs), so 'step MB' is what the (first) step adds on top of model, optimizer "
            "and inputs. Generation: greedy decoding at batch 1 after a prompt of C tokens; softmax keeps a KV "
            "cache, linear attention a fixed-size recurrent state.",
            "",
        ]
        table = []
        for n_ in e.lengths:
            cells = [str(n_), str(e.batches[n_])]
            cells += [f"{e.step_ms[att][n_]:.1f}" for att in MODELS]
            cells.append(f"{e.step_ms['linear'][n_] / e.step_ms['softmax'][n_]:.2f}")
            for key in ("step_mb", "peak_rss_mb"):
                cells += [f"{e.memory[att][n_][key]:.0f}" if e.memory.get(att) else "-" for att in MODELS]
            table.append(cells)
        lines += md_table(
            [
                "N",
                "batch",
                "softmax ms/step",
                "linear ms/step",
                "linear/softmax",
                "softmax step MB",
                "linear step MB",
                "softmax peak RSS MB",
                "linear peak RSS MB",
            ],
            table,
        )
        lines += [""]
        table = [
            [
                str(c),
                *(f"{e.prefill_ms[att][c]:.1f}" for att in MODELS),
                *(f"{e.gen_ms_per_token[att][c]:.2f}" for att in MODELS),
            ]
            for c in e.contexts
        ]
        lines += md_table(
            ["context", "softmax prefill ms", "linear prefill ms", "softmax ms/token", "linear ms/token"], table
        )

    for section in r.extra:
        lines += ["", section]
    lines += ["", "## Figures", ""]
    for caption, path in r.figures:
        lines += [f"### {caption}", "", f"![{caption}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"
