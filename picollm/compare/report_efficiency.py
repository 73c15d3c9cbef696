"""The Efficiency section of a comparison's report.md: every timing as min – max of its repeats, the load it
was taken under, and a warning box first when the noise rules (picollm.runtime.noise) flag any of it."""

from __future__ import annotations

import math

from picollm.compare.efficiency import Efficiency
from picollm.runtime.noise import RULES


def efficiency_section(e: Efficiency | None) -> list[str]:
    """Per variant and length: recurrent state, training step time and memory, prefill and decoding time, each
    timing as min – max of its repeats; the load it was taken under; a warning first when the noise rules
    (picollm.runtime.noise) flag any of it."""
    if e is None:
        return []
    warnings = e.warnings()
    lines = ["", "## Efficiency", ""]
    if warnings:
        lines += [
            "> **⚠ Noisy timings: do not read these as the variants' costs.** The noise rules flagged them; rerun "
            "the timings on a quiet machine (`picollm compare configs/compare_timing.yaml` times the default "
            "comparison's models in minutes; docs/commands.md, Timings and their noise).",
            ">",
            *(f"> - {w}" for w in warnings),
            "",
        ]
    repeats = ", ".join(
        f"{what} {min(t.n for per in ts.values() for t in per.values())}"
        for what, ts in (("training step", e.step), ("generation (decode steps)", e.gen), ("prefill", e.prefill))
        if any(ts.values())
    )
    load = f"Measured under a {e.load.text()}" if e.load else "Load average not recorded"
    lines += [
        f"Every variant (fresh weights, same architecture as compared) measured side by side in one process, "
        f"interleaved per length, on the CPU with {e.threads} torch thread(s). Every timing is repeated "
        f"({repeats}) and shown as min – max of its repeats; the min is the reported value (and the ratio's), "
        "because interference only ever adds time, so the fastest repeat is the closest to the work's own cost. "
        f"{load}. Noise rules (picollm.runtime.noise): {RULES.text()}; "
        + (f"{len(warnings)} warning(s) above." if warnings else "none flagged.")
        + " State: the floats one layer keeps to generate the next token after N tokens (a KV cache grows with N; "
        "a recurrent state does not). Training step = forward + backward + AdamW on a batch of "
        "max(1, tokens_per_step // N) sequences. Peak memory: one training step per (variant, length) in a "
        "fresh Python process; its peak RSS is the kernel high-water mark VmHWM (/proc/self/status; ru_maxrss "
        "is not used on Linux because a child inherits its parent's peak there), reset to the current RSS just "
        "before the step (/proc/self/clear_refs), so 'step MB' is what the (first) step adds on top of model, "
        "optimizer and inputs. Generation: greedy decoding at batch 1 after a prompt of N tokens.",
        "",
    ]
    table = []
    sizes = sorted(set(e.lengths) | set(e.contexts))
    base = next(iter(e.step), None)
    for att in e.step:
        for n_ in sizes:
            step = e.step[att].get(n_)
            base_step = e.step[base].get(n_) if base else None
            ratio = step.value / base_step.value if step and base_step else None
            mem = e.memory.get(att, {}).get(n_)
            state = e.state_floats.get(att, {}).get(n_)
            gen = e.gen.get(att, {}).get(n_)
            pre = e.prefill.get(att, {}).get(n_)
            table.append(
                [
                    att,
                    str(n_),
                    str(e.batches[n_]) if n_ in e.batches else "-",
                    f"{state:,.0f}" if state is not None else "-",
                    step.cell(1) if step else "-",
                    _num(ratio, 2),
                    _num(mem["step_mb"], 0) if mem else "-",
                    _num(mem["peak_rss_mb"], 0) if mem else "-",
                    pre.cell(1) if pre else "-",
                    gen.scaled(1000).cell(0) if gen else "-",
                ]
            )
    header = [
        "variant",
        "N",
        "batch",
        "state floats / layer",
        "train ms/step (min – max)",
        f"vs {base} (min)",
        "step MB",
        "peak RSS MB",
        "prefill ms (min – max)",
        "generation µs/token (min – max)",
    ]
    return [
        *lines,
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in table),
    ]


def _num(x: float | None, digits: int) -> str:
    return f"{x:,.{digits}f}" if x is not None and math.isfinite(x) else "-"
