"""BENCHMARK ONLY: a pinned copy of the reference implementation's training loop, for `make bench`'s
side-by-side ratio (`reference` section). Not used by any flow; do not "improve" it, or the ratio
stops measuring what it says.

Written from the reference's published description (it is this project's seed workload): causal
linear attention computed naively as a cumulative sum of outer products, a (B, H, N, d, d) tensor of
states `torch.cumsum(k[..., :, None] * v[..., None, :], dim=2)`, then y = phi(q).S / phi(q).cumsum(phi(k)),
phi = elu + 1, no decay; pre-LayerNorm blocks with a GELU MLP (4 d), learned positions, untied head;
the model sizes of configs/linear.yaml (d_model 128, 2 layers, 4 heads); AdamW lr 1e-3 (torch's other
defaults), batch 64, 10 epochs, shuffled batches right-padded to their longest sequence, cross-entropy
on the real next tokens; test accuracy (argmax over real targets) at the end. The data are the same
splits as `picollm train` of the config (built here without the cache, as the reference built its own).

Run as a process: `python -m picollm.bench_reference CONFIG [--epochs N]`; the last stdout line is
JSON {"wall_s", "train_s", "test_accuracy", "epochs"} for the parent to read (an IPC channel).
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

EPOCHS, BATCH, LR = 10, 64, 1e-3


class NaiveLinearAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)  # (B, H, N, dh)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        s = torch.cumsum(k[..., :, None] * v[..., None, :], dim=2)  # (B, H, N, dh, dh)
        z = torch.cumsum(k, dim=2)
        num = torch.einsum("bhnd,bhnde->bhne", q, s)
        den = (q * z).sum(-1, keepdim=True) + 1e-6
        return self.out((num / den).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = NaiveLinearAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ReferenceModel(nn.Module):
    def __init__(self, vocab: int, max_len: int, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def _padded(seqs: list, pad: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _loss_and_hits(model: nn.Module, batch: torch.Tensor, pad: int) -> tuple[torch.Tensor, int, int]:
    logits = model(batch[:, :-1])
    targets = batch[:, 1:].masked_fill(batch[:, 1:] == pad, -100)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    real = targets != -100
    return loss, int((logits.argmax(-1) == targets)[real].sum()), int(real.sum())


def run(config: str, epochs: int = EPOCHS) -> dict[str, float]:
    """Train and test the reference on the data of `config` (a picollm training config)."""
    from picollm.config import TrainRunConfig, load_config
    from picollm.data.splits import build_data

    t_start = time.perf_counter()
    cfg = load_config(TrainRunConfig, config, [])
    data = build_data(cfg.data)
    pad, vocab = cfg.data.pad_id, cfg.data.vocab_size
    torch.manual_seed(0)
    model = ReferenceModel(vocab, cfg.data.max_len)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    train = data.train.sequences
    t_train = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(train)).split(BATCH):
            loss, _, _ = _loss_and_hits(model, _padded([train[i] for i in idx], pad), pad)
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - t_train
    model.eval()
    hits = total = 0
    with torch.no_grad():
        test = data.test.sequences
        for i in range(0, len(test), BATCH):
            _, h, n = _loss_and_hits(model, _padded(test[i : i + BATCH], pad), pad)
            hits, total = hits + h, total + n
    return {
        "wall_s": time.perf_counter() - t_start,
        "train_s": train_s,
        "test_accuracy": hits / max(total, 1),
        "epochs": float(epochs),
    }


def main(argv: list[str]) -> None:
    epochs = int(argv[argv.index("--epochs") + 1]) if "--epochs" in argv else EPOCHS
    out = run(argv[0], epochs)
    sys.stdout.write(json.dumps(out) + "\n")  # the parent reads this line (IPC, not UI output)


if __name__ == "__main__":
    main(sys.argv[1:])
