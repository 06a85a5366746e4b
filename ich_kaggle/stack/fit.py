"""Training and prediction of a sequence net on padded series, and the fold loop shared by every second-stage model.

Training stops on an inner validation split of the training series (`stack.val_fraction`, `stack.patience`)
rather than after a fixed number of steps. Batches are contiguous runs of length-sorted series (bucketing: little
padding), visited in a shuffled order; each series is reversed with probability 1/2 during training, so reverse
test-time augmentation stays in distribution.
The loss is the competition metric as a masked weighted BCE (any = 2, subtypes = 1).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..core.labels import LABEL_WEIGHTS
from ..core.config import StackConfig
from ..core.registry import STACK_MODELS
from .nets import KINDS, SequenceNet
from .sequences import N_LABELS, Sequences, reverse_inputs, reverse_values


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block on `n` torch threads (`stack.threads`), restoring the caller's count after: the second stage's
    small nets were fastest on one thread per process (2 threads: 2.2x slower per step at load 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def metric_bce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weighted log loss of the competition, averaged over real (unpadded) slices."""
    w = torch.tensor(LABEL_WEIGHTS, dtype=logits.dtype, device=logits.device)
    per = F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w
    m = mask.unsqueeze(-1).to(logits.dtype)
    return (per * m).sum() / (m.sum() * w.sum()).clamp_min(1.0)


def batch_bounds(n: int, batch: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch, n)) for s in range(0, n, batch)]


@dataclass
class TorchSeqs:
    """Torch views of a Sequences (no copies)."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def of(cls, seqs: Sequences) -> "TorchSeqs":
        """`mask` is what losses count (`Sequences.scored`); the nets see every real slice through `lengths`."""
        return cls(
            torch.from_numpy(seqs.x),
            torch.from_numpy(seqs.y),
            torch.from_numpy(np.ascontiguousarray(seqs.scored)),
            torch.from_numpy(seqs.lengths),
        )

    def batch(self, lo: int, hi: int):
        lengths = self.lengths[lo:hi]
        top = int(lengths.max())  # sorted ascending, but do not rely on it
        return self.x[lo:hi, :top], self.y[lo:hi, :top], self.mask[lo:hi, :top], lengths


def inner_split(n: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the series held out to stop on (none when fewer than 2 would be held out or trained on)."""
    held = np.zeros(n, dtype=bool)
    n_val = int(round(n * fraction))
    if n_val >= 2 and n - n_val >= 2:
        held[np.random.default_rng([seed, 7]).choice(n, size=n_val, replace=False)] = True
    return held


@torch.inference_mode()
def validation_loss(net: SequenceNet, data: "TorchSeqs", batch_series: int = 256) -> float:
    """The metric (forward pass only) over every real slice of `data`."""
    net.eval()
    total, weight = 0.0, 0.0
    for lo, hi in batch_bounds(len(data.lengths), batch_series):
        x, y, mask, lengths = data.batch(lo, hi)
        n = float(mask.sum())
        total += float(metric_bce(net(x, lengths), y, mask)) * n
        weight += n
    net.train()
    return total / max(weight, 1.0)


def _new_net(seqs: Sequences, scfg: StackConfig, n_models: int, kind: str | None) -> SequenceNet:
    return SequenceNet(
        seqs.n_features,
        n_models,
        kind=kind or scfg.model,
        hidden=scfg.hidden,
        layers=scfg.layers,
        dropout=scfg.dropout,
        skip_k=scfg.neighbors_k,
    )


def _optimizer(net: SequenceNet, scfg: StackConfig, total: int):
    """AdamW with a linear warm-up over the first 5% of `total` steps, then a cosine decay to zero at `total`."""
    opt = torch.optim.AdamW(net.parameters(), lr=scfg.lr, weight_decay=1e-4)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    return opt, sched


def _flipped(data: TorchSeqs, bound: tuple[int, int], rng: np.random.Generator):
    """One training batch, each series reversed with probability 1/2 (only the drawn ones are reversed)."""
    x, y, mask, lengths = data.batch(*bound)
    flip = torch.from_numpy(rng.random(len(lengths)) < 0.5)
    if bool(flip.any()):
        x, y, mask = x.clone(), y.clone(), mask.clone()
        lf = lengths[flip]
        x[flip] = reverse_inputs(x[flip], lf)
        y[flip] = reverse_values(y[flip], lf)
        mask[flip] = reverse_values(mask[flip].unsqueeze(-1), lf).squeeze(-1)
    return x, y, mask, lengths


@dataclass
class _EarlyStop:
    """The best inner-validation loss so far, its weights, and how many validations since it improved."""

    net: SequenceNet
    val: TorchSeqs
    curve: list[dict] | None
    best_loss: float = math.inf
    best_state: dict | None = None
    bad: int = 0

    def check(self, step: int, epoch: float, train_loss: float) -> float:
        """Validate, record a curve row, keep the weights if best; returns the validation loss."""
        v = validation_loss(self.net, self.val)
        if self.curve is not None:
            self.curve.append({"step": step, "epoch": epoch, "train_loss": train_loss, "val_loss": v, "stop": ""})
        if v < self.best_loss - 1e-6:
            self.best_loss, self.bad = v, 0
            self.best_state = {k: t.detach().clone() for k, t in self.net.state_dict().items()}
        else:
            self.bad += 1
        return v


def train_net(
    seqs: Sequences,
    scfg: StackConfig,
    n_models: int,
    seed: int,
    kind: str | None = None,
    epochs: int | None = None,
    curve: list[dict] | None = None,
) -> SequenceNet:
    """Fit one sequence net on labelled series; stop on an inner validation split of those series.

    `stack.val_fraction` of the series are held out (never the outer held-out fold, which nothing here sees); the
    net is validated every `stack.val_every` steps (default: each epoch), the best weights are kept, and training
    stops after `stack.patience` validations without improvement, after `stack.epochs` epochs, at `stack.max_steps`
    (when set) or once `stack.max_seconds` of wall time are spent (a safety budget that the early stop is meant to
    beat). Each validation is appended to `curve` (step, epoch, train_loss, val_loss, stop); the last row's `stop`
    says what ended training: validation, epochs, max_steps or time.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = _new_net(seqs, scfg, n_models, kind)
    held = inner_split(len(seqs), scfg.val_fraction, seed)
    data = TorchSeqs.of(seqs.subset(~held) if held.any() else seqs)
    bounds = batch_bounds(len(data.lengths), scfg.batch_series)
    total = max(1, (epochs or scfg.epochs) * len(bounds))
    stop = "epochs"
    if 0 < scfg.max_steps < total:
        total, stop = scfg.max_steps, "max_steps"
    every = scfg.val_every or len(bounds)
    opt, sched = _optimizer(net, scfg, total)
    early = _EarlyStop(net, TorchSeqs.of(seqs.subset(held)), curve) if held.any() else None
    if early is not None:  # step 0: the identity start (the first stage itself) is a candidate too
        early.check(0, 0.0, math.nan)
    net.train()
    step, running, seen = 0, 0.0, 0
    while step < total:
        for b in rng.permutation(len(bounds))[: total - step]:
            step += 1
            x, y, mask, lengths = _flipped(data, bounds[b], rng)
            loss = metric_bce(net(x, lengths), y, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            running, seen = running + float(loss.detach()), seen + 1
            out_of_time = scfg.max_seconds > 0 and time.perf_counter() - started > scfg.max_seconds
            if early is not None and (step % every == 0 or step == total or out_of_time):
                early.check(step, step / len(bounds), running / seen)
                running, seen = 0.0, 0
                if early.bad >= scfg.patience:
                    total, stop = step, "validation"  # the validation loss stopped improving
                    break
            if out_of_time:
                total, stop = step, "time"
                break
    if curve:
        curve[-1]["stop"] = stop
    if early is not None and early.best_state is not None:
        net.load_state_dict(early.best_state)
    net.eval()
    return net


@torch.inference_mode()
def predict_net(
    net: SequenceNet, seqs: Sequences, batch_series: int = 256, reverse_tta: bool = True, mode: str = "tta"
) -> np.ndarray:
    """(S, L, 6) probabilities. mode: tta (mean of forward and reversed), forward, or reversed."""
    net.eval()
    data = TorchSeqs.of(seqs)
    out = np.zeros(seqs.y.shape, dtype=np.float32)
    if not reverse_tta and mode == "tta":
        mode = "forward"
    for lo, hi in batch_bounds(len(seqs), batch_series):
        x, _, mask, lengths = data.batch(lo, hi)
        parts = []
        if mode in ("tta", "forward"):
            parts.append(torch.sigmoid(net(x, lengths)))
        if mode in ("tta", "reversed"):
            rev = net(reverse_inputs(x, lengths), lengths)
            parts.append(torch.sigmoid(reverse_values(rev, lengths)))
        p = torch.stack(parts).mean(0) * mask.unsqueeze(-1)
        out[lo:hi, : p.shape[1]] = p.numpy()
    return out


@dataclass(frozen=True)
class SequenceStacker:
    """A stack model (`core.registry.STACK_MODELS`): fit(series, config, #models, fold, curve) and
    predict(model, series, config) -> (S, L, 6) probabilities. This one trains a `SequenceNet` of one kind, seeded
    by stack.seed + fold."""

    kind: str

    def fit(
        self, seqs: Sequences, scfg: StackConfig, n_models: int, fold: int, curve: list[dict] | None = None
    ) -> SequenceNet:
        return train_net(seqs, scfg, n_models, seed=scfg.seed + fold, kind=self.kind, curve=curve)

    def predict(self, net: SequenceNet, seqs: Sequences, scfg: StackConfig) -> np.ndarray:
        return predict_net(net, seqs, batch_series=max(256, scfg.batch_series), reverse_tta=scfg.reverse_tta)


for _kind in KINDS:
    STACK_MODELS.register(_kind, functools.partial(SequenceStacker, _kind))


FitFn = Callable[[Sequences, int], object]
PredictFn = Callable[[object, Sequences], np.ndarray]


@dataclass
class CrossFit:
    oof: np.ndarray  # (S_train, L, 6) each slice predicted by the model that never saw its fold's labels
    test: np.ndarray  # (S_test, L_test, 6) mean over the fold models
    folds: list[int]
    models: dict[int, object] = field(default_factory=dict)  # the fitted model of each fold (saved: stack.saved)


def cross_fit(
    train: Sequences,
    test: Sequences | None,
    fit: FitFn,
    predict: PredictFn,
    progress: Callable[[str], None] | None = None,
) -> CrossFit:
    """For each fold k: fit on the other folds' slices, predict fold k's slices and the test series.

    The folds are the first stage's (`Sequences.slots`, one per slice): under a patient split a series lies in one
    fold and model k simply never sees fold k's series; under `cv.split: random` a series has slices in several
    folds, and model k trains on every series with its fold-k slices left out of the loss (`loss_mask`; they stay
    visible as inputs, like the OOF predictions they are) and predicts exactly those slices.
    """
    slots = train.slots if train.slots is not None else np.where(train.mask, train.group[:, None], -1)
    folds = sorted(int(f) for f in np.unique(slots[train.mask]) if f >= 0)
    if len(folds) < 2:
        raise ValueError(f"stacking needs out-of-fold predictions from at least 2 folds, got {folds}")
    oof = np.full(train.y.shape, np.nan, dtype=np.float32)
    models: dict[int, object] = {}
    test_sum = np.zeros(test.y.shape, dtype=np.float32) if test is not None and len(test) else None
    for k in folds:
        held = slots == k
        others = train.mask & ~held & (slots >= 0)
        fit_rows = others.any(axis=1)
        part = train.subset(fit_rows)
        if not (held & train.mask)[fit_rows].any():  # the series lie in one fold each: nothing to leave out
            part.loss_mask = None
        else:
            part.loss_mask = others[fit_rows]
        model = fit(part, k)
        models[k] = model
        pred_rows = held.any(axis=1)
        pred = predict(model, train.subset(pred_rows))
        take = (held | ~train.mask)[pred_rows]  # its fold's slices (and the padding, which predicts 0)
        oof[pred_rows] = np.where(take[..., None], pred, oof[pred_rows])
        if test_sum is not None:
            test_sum += predict(model, test)
        if progress:
            progress(f"fold {k}")
    test_mean = test_sum / len(folds) if test_sum is not None else np.zeros((0, 0, N_LABELS), dtype=np.float32)
    return CrossFit(oof, test_mean, folds, models)
