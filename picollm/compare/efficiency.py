"""Efficiency of the compared architectures: training-step time, per-step peak memory and generation
time, measured on freshly initialised models (timing does not depend on the weights).

Step time. `time_train_steps` is the one training-step timer of picollm (`picollm compare` and the
bench flow): `timed` repeats after `warmup`, the models interleaved per length on the same inputs so
machine noise hits them alike. Every timing keeps its repeats (picollm.runtime.noise.Timing: the minimum is
the reported value, the maximum beside it) and the load average around it (`Efficiency.load`);
`Efficiency.warnings` applies the noise rules of picollm.runtime.noise.

Peak memory. Each (model, length) configuration runs one training step in a fresh Python process
(`memory_worker`). Its peak resident set size is the kernel's per-process high-water mark: VmHWM in
/proc/self/status (getrusage's ru_maxrss where there is no /proc; not on Linux, because a child
started by fork + exec inherits the parent's peak in ru_maxrss). On Linux the high-water mark is
first reset to the current RSS (/proc/self/clear_refs), so `step_mb` is the memory the step itself
added on top of the model, optimizer and inputs (first step: includes AdamW's state).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from picollm.config import ModelConfig, TrainConfig
from picollm.model.decoding import Decoder
from picollm.model.transformer import Transformer
from picollm.runtime.noise import RULES, Load, NoiseRules, Timing, time_repeats
from picollm.training.adamw import AdamW
from picollm.training.optim import make_optimizer
from picollm.training.trainer import lm_loss

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Efficiency:
    """The efficiency sweep: per model, {sequence length: timing} for training, {context: timing} for
    generation (each timing keeps its repeats; its `value`, the minimum, is the reported figure)."""

    lengths: list[int]
    batches: dict[int, int]
    contexts: list[int]
    threads: int
    step: dict[str, dict[int, Timing]] = field(default_factory=dict)  # ms per training step
    memory: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    gen: dict[str, dict[int, Timing]] = field(default_factory=dict)  # ms per generated token
    prefill: dict[str, dict[int, Timing]] = field(default_factory=dict)  # ms per prompt
    state_floats: dict[str, dict[int, float]] = field(default_factory=dict)  # per layer, after N tokens
    load: Load | None = None  # the machine's load around the timings

    def warnings(self, rules: NoiseRules = RULES) -> list[str]:
        """Every noise warning of the sweep (the rules of picollm.runtime.noise): the load, then per
        variant the spread of each measure's repeats and each curve that falls with length."""
        out = [w for w in [rules.load(self.load)] if self.load is not None and w]
        measures = (
            ("training step", "N", self.step, " ms"),
            ("generation per token", "context", self.gen, " ms"),
            ("prefill", "context", self.prefill, " ms"),
        )
        for att in self.step | self.gen:
            for what, axis, timings, unit in measures:
                per = timings.get(att, {})
                label = f"{att} {what} (by {axis})"
                values = {n: t.value for n, t in per.items()}
                out += [w for w in (rules.spread(label, per, unit), rules.curve(label, values, unit)) if w]
        return out

    def params(self) -> dict[str, float | int | str]:
        """What the timings were taken under, as MLflow params `efficiency.*`."""
        out: dict[str, float | int | str] = {
            "efficiency.reported": "min of repeats",
            "efficiency.noisy": bool(self.warnings()),
        }
        for key, timings in (("step", self.step), ("gen", self.gen), ("prefill", self.prefill)):
            counts = {t.n for per in timings.values() for t in per.values()}
            if counts:
                out[f"efficiency.repeats.{key}"] = min(counts)
        return out | (self.load.params("efficiency") if self.load else {})

    def metrics(self, compact: bool = False) -> dict[tuple[str, int], float]:
        """{(metric name, step = length): value} for MLflow: `scaling/<measure>/<variant>` (the reported
        min), so every variant's curve of a measure shares a chart section, and the slowest repeat as
        `scaling/<measure>_max/<variant>`. `compact` (many variants): step time, step memory, generation
        time and state size only."""
        out: dict[tuple[str, int], float] = {}
        for att in self.step:
            for n, t in self.step[att].items():
                out[(f"scaling/step_ms/{att}", n)] = t.value
                if not compact:
                    out[(f"scaling/step_ms_max/{att}", n)] = t.max
                    out[(f"scaling/tokens_per_s/{att}", n)] = self.batches[n] * n / t.value * 1000
            for n, mem in self.memory.get(att, {}).items():
                out[(f"scaling/step_mb/{att}", n)] = mem["step_mb"]
                if not compact:
                    out[(f"scaling/peak_rss_mb/{att}", n)] = mem["peak_rss_mb"]
            for n, t in self.gen.get(att, {}).items():
                out[(f"scaling/gen_ms_per_token/{att}", n)] = t.value
                if not compact:
                    out[(f"scaling/gen_ms_per_token_max/{att}", n)] = t.max
                    out[(f"scaling/prefill_ms/{att}", n)] = self.prefill[att][n].value
            for n, floats in self.state_floats.get(att, {}).items():
                out[(f"scaling/state_floats/{att}", n)] = floats
        return out


def state_sizes(configs: dict[str, ModelConfig], contexts: list[int]) -> dict[str, dict[int, float]]:
    """{variant: {N: floats one layer keeps to generate after N tokens}} (picollm.model.state_floats)."""
    from picollm.model.mixers import state_floats

    return {att: {n: float(state_floats(mc, n)) for n in contexts} for att, mc in configs.items()}


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
) -> dict[str, dict[int, Timing]]:
    """{att: {n: ms, `timed` repeats}} of one training step (lm_loss, zero_grad, backward, AdamW step) on random
    tokens of shape (max(1, tokens_per_step // n), n + 1), after `warmup` untimed steps. The models are
    interleaved per length on the same inputs so machine noise hits both alike; each keeps one optimizer
    (TrainConfig's defaults) across the lengths."""
    out: dict[str, dict[int, Timing]] = {att: {} for att in models}
    opts = {att: make_optimizer(m, TrainConfig()) for att, m in models.items()}
    for n in lengths:
        vocab = next(iter(models.values())).cfg.vocab_size or 2
        tokens = torch.randint(0, vocab - 1, (max(1, tokens_per_step // n), n + 1))
        for att, m in models.items():
            m.train()

            def step(m: Transformer = m, opt: AdamW = opts[att], tokens: torch.Tensor = tokens) -> None:
                loss, _ = lm_loss(m, tokens, m.pad_id)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            t = out[att][n] = time_repeats(step, warmup, timed)
            log.info("train step %s N=%d: %.1f ms (max %.1f)", att, n, t.min, t.max)
    return out


@torch.no_grad()
def decode_timing(
    model: Transformer, prompt: torch.Tensor, new_tokens: int, warmup: int = 8, prefills: int = 3
) -> tuple[Timing, Timing]:
    """(prefill ms, ms per generated token) of greedy decoding after `prompt` (1, C): `prefills` repeats
    of the prefill (a fresh cache each) after an untimed one (a model's first forward pays one-off set-up),
    then `new_tokens` decode steps after the last and `warmup` untimed ones, each step a repeat (after a long
    prompt the first steps are slower for several steps: 0.6 -> 0.22 ms at context 4096 on 2026-12-04).

    The fast path of Transformer.generate (picollm.decoding), timed step by step: a KV cache grows with
    the context, a recurrent state does not."""
    model.eval()
    prefill = []
    for i in range(1 + prefills):
        decoder = Decoder(model, batch=prompt.shape[0], capacity=prompt.shape[1] + warmup + new_tokens)
        t0 = time.perf_counter()
        logits = decoder.prefill(prompt, torch.ones_like(prompt, dtype=torch.bool))
        if i > 0:
            prefill.append((time.perf_counter() - t0) * 1000)
    times = []
    for i in range(warmup + new_tokens):
        nxt = logits.argmax(-1)
        t0 = time.perf_counter()
        logits = decoder.step(nxt)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return Timing.of(prefill), Timing.of(times)


def time_generation(
    models: dict[str, Transformer], contexts: list[int], new_tokens: int
) -> tuple[dict[str, dict[int, Timing]], dict[str, dict[int, Timing]]]:
    """({att: {context: prefill ms}}, {att: {context: ms per token}}), interleaved per context."""
    prefill: dict[str, dict[int, Timing]] = {att: {} for att in models}
    per_token: dict[str, dict[int, Timing]] = {att: {} for att in models}
    for c in contexts:
        vocab = next(iter(models.values())).cfg.vocab_size or 2
        prompt = torch.randint(0, vocab - 1, (1, c))
        for att, m in models.items():
            prefill[att][c], per_token[att][c] = decode_timing(m, prompt, new_tokens)
            t = per_token[att][c]
            log.info("generation %s context %d: %.3f ms/token (max %.3f)", att, c, t.min, t.max)
    return prefill, per_token


# --------------------------------------------------------------------------------------------------
# Peak memory, one training step in a fresh process


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
    code = "import sys; from picollm.compare.efficiency import memory_worker; memory_worker(sys.argv[1])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    except (subprocess.TimeoutExpired, OSError, ValueError, IndexError) as e:
        why = f"{type(e).__name__}: {e}"
    log.warning("memory measurement of %s attention at length %d failed: %s", model_cfg.attention, length, why[:200])
    return {"peak_rss_mb": math.nan, "before_mb": math.nan, "step_mb": math.nan, "reset": False}
