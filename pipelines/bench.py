"""Flow: time training steps of softmax vs linear attention (and the linear forms alone) at several
sequence lengths, in one process, interleaved so machine noise hits both alike; log to MLflow."""

from __future__ import annotations

import logging

import mlflow
import torch

from picollm import linear_attention as la
from picollm import tracking
from picollm.config import BenchConfig, TrainConfig, flatten
from picollm.hardware import median_ms
from picollm.model import Transformer, alibi_slopes
from picollm.training import lm_loss, make_optimizer

log = logging.getLogger(__name__)


def naive_cumulative(fq, fk, v, log_decay, eps):
    """The reference implementation's form: a (B, H, N, d, d) cumulative state (decay omitted)."""
    state = torch.cumsum(fk.unsqueeze(-1) * v.float().unsqueeze(-2), dim=2)
    z = torch.cumsum(fk, dim=2)
    num = torch.einsum("bhnd,bhnde->bhne", fq, state)
    return num / ((fq * z).sum(-1, keepdim=True) + eps)


def run(cfg: BenchConfig) -> dict[str, float]:
    tracking.init_tracking(cfg.tracking.uri)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    results: dict[str, float] = {}
    run_name = cfg.tracking.run_name or "bench"
    with tracking.tracked_run(cfg.tracking.experiment, run_name, tags={"picollm.flow": "bench"}):
        tracking.log_params(flatten(cfg.model_dump(mode="json")) | {"torch_threads": torch.get_num_threads()})
        models = {}
        for att in ("softmax", "linear"):
            torch.manual_seed(0)
            m = Transformer(cfg.model.model_copy(update={"attention": att, "max_seq_len": max(cfg.lengths) + 1}))
            models[att] = (m, make_optimizer(m, TrainConfig()))
        for n in cfg.lengths:
            batch = max(1, cfg.tokens_per_step // n)
            tokens = torch.randint(0, cfg.model.vocab_size - 1, (batch, n + 1))
            row: dict[str, float] = {}
            for att, (m, opt) in models.items():  # same process, same inputs, back to back

                def step(m=m, opt=opt, tokens=tokens) -> None:
                    loss, _ = lm_loss(m, tokens, m.pad_id)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                ms = median_ms(step, cfg.warmup_steps, cfg.timed_steps)
                row[f"step_ms.{att}"] = ms
                row[f"tokens_per_s.{att}"] = batch * n / ms * 1000
            row["ratio.linear_over_softmax"] = row["step_ms.linear"] / row["step_ms.softmax"]
            if cfg.kernels:
                h, dh = cfg.model.n_heads, cfg.model.d_head
                ld = -alibi_slopes(h, cfg.model.alibi_exponent)
                for form, fn in {
                    "quadratic": lambda q, k, v, ld=ld: la.quadratic(q, k, v, ld, 1e-6),
                    "chunkwise": lambda q, k, v, ld=ld: la.chunkwise(q, k, v, ld, 1e-6, cfg.model.linear_chunk_size),
                    "naive_cumulative": lambda q, k, v, ld=ld: naive_cumulative(q, k, v, ld, 1e-6),
                }.items():
                    q, k, v = (torch.randn(batch, h, n, dh, requires_grad=True) for _ in range(3))

                    def kernel(fn=fn, q=q, k=k, v=v) -> None:
                        fn(la.feature_map(q), la.feature_map(k), v).sum().backward()

                    row[f"kernel_ms.{form}"] = median_ms(kernel, 1, cfg.timed_steps)
            mlflow.log_metrics(row, step=n)
            results.update({f"{k}@{n}": v for k, v in row.items()})
            log.info("N=%d %s", n, row)
        lines = ["| N | batch | softmax ms/step | linear ms/step | linear/softmax |", "|---|---|---|---|---|"]
        for n in cfg.lengths:
            lines.append(
                f"| {n} | {max(1, cfg.tokens_per_step // n)} | {results[f'step_ms.softmax@{n}']:.1f} | "
                f"{results[f'step_ms.linear@{n}']:.1f} | {results[f'ratio.linear_over_softmax@{n}']:.2f} |"
            )
        mlflow.log_text("\n".join(lines) + "\n", "bench.md")
    return results
