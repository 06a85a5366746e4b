"""Sequence nets over a series' slices: bidirectional GRU, dilated 1-D convolutions, or convolutions then GRU.

All three start as the identity on the first-stage predictions (a linear skip over neighbouring slices initialised to
the models' mean logit, the learned path initialised to zero), so training can only move away from the first stage
where it helps.
Padding never changes a series' output: the backward GRU reads each series reversed within its own length, so for
both directions the padding comes after the real slices (and packing, ~2x slower on CPU, is not needed); the
convolutions zero every padded position after each layer (no batch norm). A series alone and the same series batched
with a longer one therefore match.
"""

from __future__ import annotations

import torch
from torch import nn

from .sequences import N_LABELS, N_POS, reverse_values

KINDS = ("gru", "conv", "gru_conv")  # each registered as a stack model by stack/fit.py


def _mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class ConvBlock(nn.Module):
    """Residual dilated conv over the slice axis; LayerNorm is per position, so padding cannot leak in."""

    def __init__(self, width: int, dilation: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding=dilation, dilation=dilation)
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # h (B, L, W)
        c = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.drop(torch.relu(self.norm(c)))
        return h * mask.unsqueeze(-1)


class SequenceNet(nn.Module):
    """(B, L, F) slice features + lengths -> (B, L, 6) logits."""

    def __init__(
        self,
        n_features: int,
        n_models: int,
        kind: str = "gru",
        hidden: int = 64,
        layers: int = 2,
        dropout: float = 0.1,
        skip_k: int = 2,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown sequence net {kind!r}; choose from {', '.join(KINDS)}")
        self.kind = kind
        self.inp = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU())
        self.blocks = nn.ModuleList()
        if kind in ("conv", "gru_conv"):
            n_blocks = max(1, 2 * layers) if kind == "conv" else max(1, layers)
            self.blocks = nn.ModuleList(ConvBlock(hidden, 2 ** (i % 4), dropout) for i in range(n_blocks))
        self.fwd = nn.ModuleList()
        self.bwd = nn.ModuleList()
        out_width = hidden
        if kind in ("gru", "gru_conv"):
            for i in range(layers):
                width = hidden if i == 0 else 2 * hidden
                self.fwd.append(nn.GRU(width, hidden, batch_first=True))
                self.bwd.append(nn.GRU(width, hidden, batch_first=True))
            out_width = 2 * hidden
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(out_width, N_LABELS)
        # linear skip over the +-skip_k neighbouring slices (the neighbours baseline inside the net)
        self.skip = nn.Conv1d(n_features, N_LABELS, kernel_size=2 * skip_k + 1, padding=skip_k)
        with torch.no_grad():
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)
            for m in range(n_models):  # centre tap = mean first-stage logit of each label
                for j in range(N_LABELS):
                    self.skip.weight[j, N_POS + m * N_LABELS + j, skip_k] = 1.0 / n_models

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = _mask(lengths, x.shape[1])
        h = self.inp(x) * mask.unsqueeze(-1)
        for block in self.blocks:
            h = block(h, mask)
        for i, (fwd, bwd) in enumerate(zip(self.fwd, self.bwd)):
            if i:
                h = self.drop(h)
            hf, _ = fwd(h)
            hb, _ = bwd(reverse_values(h, lengths))
            h = torch.cat([hf, reverse_values(hb, lengths)], dim=-1)
        skip = self.skip(x.transpose(1, 2)).transpose(1, 2)  # x is zero on padding, as conv padding is
        return (self.out(self.drop(h)) + skip) * mask.unsqueeze(-1)
