"""IDM, Informative Data Mining for one-shot cross-domain semantic segmentation (Wang et al., ICCV 2023), at
this service's scale: a source model, its labelled source pool (the job's `source_data`, held on the device as
`ctx.source_pool`) and one unlabelled target image (the job's `data`).

Per step (the runner calls `step` once per pass over the one-shot target set; `epochs` = steps):
1. every `mine_every` steps, mining: the whole source pool is predicted in the target's style (AdaIN: the
   first convolution's per-channel mean/std replaced by the target image's), scored by mean pixel entropy
   divided by the number of classes its mask holds, and the top `select_ratio` kept as the informative pool;
   with `restyled_statistics`, BatchNorm's statistics are first re-estimated on the whole source pool in the
   target's style (what the target domain looks like to the model, with the pool's variety of content); the
   target's pseudo-labels (confident argmax, else ignore) are refreshed;
2. patch-wise mixing: `source_batch` informative source images, each with a random `mix_ratio` of its
   grid x grid patches replaced by the target's; labels: the source mask, the target's pseudo-labels;
3. one forward of [mixed images (target style), target image]: cross-entropy on the mixed images, plus
   prototype-based information maximisation on the target: its softmax, rectified by the softmax of the
   cosine similarity of its pixel features (the classifier layer's input) to the class prototypes (an EMA
   of the source pixels' features by their mask), should be confident per pixel and diverse over the
   image (its mean prediction near `diversity_target`: the source pool's class shares, or uniform as in
   SHOT's IM);
4. SGD step (head at head_lr_scale x lr); prototypes updated.
The step returns the model's predictions (before the update) on the mixed images and the target, the
collapse guard's window. BatchNorm is frozen while training (`freeze_batch_norm`); the exported model's
statistics are re-estimated once more, for its final weights, on the restyled source pool (never on the one
target image). Without `restyled_statistics` it keeps the source model's statistics (frozen) or those of its
training batches."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from app.contract.catalog.segmentation import IDMParams

from .. import segmentation as S
from ..errors import AdaptationError
from ..models.export import recalibrate_batch_norm
from ._seg import classifier_layer, head_parameters
from .base import Method, StepOutput, make_optimizer
from .norm import BATCH_NORMS
from .registry import implements

MINE_CHUNK = 256  # source images per forward while mining


class _StyleSwap:
    """Forward hook on the first convolution: the first `n_styled` images of the batch take the style
    (per-channel mean and std of that layer's output) `style`; `record` captures the batch's statistics."""

    def __init__(self) -> None:
        self.style: tuple[torch.Tensor, torch.Tensor] | None = None
        self.n_styled = 0
        self.record = False
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, module, inputs, out):
        mu = out.mean(dim=(2, 3), keepdim=True)
        sd = out.std(dim=(2, 3), keepdim=True) + 1e-5
        if self.record:
            self.recorded = (mu.detach().mean(0, keepdim=True), sd.detach().mean(0, keepdim=True))
        if self.style is None or self.n_styled == 0:
            return out
        n = self.n_styled
        styled = (out[:n] - mu[:n]) / sd[:n] * self.style[1] + self.style[0]
        return torch.cat([styled, out[n:]]) if n < len(out) else styled


class _Features:
    """Forward pre-hook on the classifier layer: keeps its input (the pixels' features)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module, inputs):
        self.value = inputs[0]


@implements(IDMParams)
class IDM(Method):
    # Its batches come from the source pool (source_batch mixed images + the target), not the target set.
    uses_batch_statistics = False
    # BatchNorm is not re-estimated on the one target image: one image's statistics measured far worse than
    # any other choice (BENCHMARKS.md, segmentation, "Why the losing cells lose": USPS 43.5 vs 55.6 mIoU). It is
    # re-estimated on the restyled source pool instead (IDMParams.restyled_statistics, `export_model`).
    recalibrate_on_target = False
    state_attrs = ("prototypes", "have_prototype")

    def check_compatible(self) -> None:
        if self.ctx.source_pool is None:
            raise AdaptationError("source_data_missing", "idm trains on a labelled source pool: the job needs "
                                  "`source_data` (images with masks)")
        if self.ctx.dataset_size > self.params.shots:
            raise AdaptationError("invalid_params", f"idm adapts on {self.params.shots} target image(s) "
                                  f"(params.shots); data holds {self.ctx.dataset_size}",
                                  {"field": "params.shots", "images": self.ctx.dataset_size})
        x, y = self.ctx.source_pool
        if y.ndim != 3:
            raise AdaptationError("invalid_masks", "idm's source_data needs one mask per image (N×H×W)")

    def train_mode(self) -> None:
        """Train mode; with `freeze_batch_norm`, BatchNorm stays in eval mode (the running statistics it came
        with normalise every batch and are not updated)."""
        self.model.train()
        if self.params.freeze_batch_norm:
            for m in self.model.modules():
                if isinstance(m, BATCH_NORMS):
                    m.eval()

    def configure(self) -> None:
        self.train_mode()
        for q in self.model.parameters():
            q.requires_grad_(True)
        first_conv = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is None:
            raise AdaptationError("unsupported_architecture", "idm needs a convolutional network (its style "
                                  "transfer acts on the first Conv2d)")
        try:
            self.classifier = classifier_layer(self.model, self.ctx.num_classes)
        except ValueError as exc:
            raise AdaptationError("unsupported_architecture", f"idm: {exc}") from None
        self.swap, self.features = _StyleSwap(), _Features()
        self.hooks = [first_conv.register_forward_hook(self.swap),
                      self.classifier.register_forward_pre_hook(self.features)]
        k, dim = self.ctx.num_classes, self.classifier.in_channels
        self.prototypes = torch.zeros(k, dim, device=self.ctx.device)
        self.have_prototype = torch.zeros(k, dtype=torch.bool, device=self.ctx.device)
        self.informative: torch.Tensor | None = None
        self.pseudo: torch.Tensor | None = None
        self.steps = 0
        self.mined: list[int] = []
        self.generator = torch.Generator(device="cpu").manual_seed(self.ctx.seed)
        self.restyled = False
        self.target: torch.Tensor | None = None
        ys = self.ctx.source_pool[1]  # the source pool's pixel share per class (ignored pixels left out)
        counts = torch.bincount(ys[ys != S.IGNORE_INDEX].flatten().long(), minlength=k)[:k].float()
        self.class_prior = (counts / counts.sum().clamp_min(1)).to(self.ctx.device)

    def trainable_params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def build_optimizer(self, params):
        p = self.params
        head = {id(q) for q in head_parameters(self.model, self.ctx.num_classes)}
        opt = make_optimizer([q for q in params if id(q) not in head], "sgd", p.lr, p.momentum, p.weight_decay)
        opt.add_param_group({"params": [q for q in params if id(q) in head], "lr": p.head_lr_scale * p.lr})
        return opt

    # --- mining ------------------------------------------------------------------------------------
    @torch.no_grad()
    def target_style(self, x: torch.Tensor) -> None:
        self.swap.record, self.swap.n_styled = True, 0
        try:
            with self.ctx.autocast():
                self.model(x)
        finally:
            self.swap.record = False
        self.swap.style = self.swap.recorded

    @torch.no_grad()
    def mine(self, x: torch.Tensor) -> None:
        """Informative source images (highest uncertainty in the target's style) and the target's pseudo-labels."""
        p = self.params
        self.model.eval()
        try:
            self.target_style(x)
            if p.restyled_statistics:
                self.restyle_statistics()
            with self.ctx.autocast():
                probs = self.model(x).float().softmax(1)
            conf, label = probs.max(1)
            self.pseudo = torch.where(conf >= p.pseudo_threshold, label, torch.full_like(label, S.IGNORE_INDEX))
            xs, ys = self.ctx.source_pool
            scores = []
            for start in range(0, len(xs), MINE_CHUNK):
                chunk = xs[start:start + MINE_CHUNK]
                self.swap.n_styled = len(chunk)
                with self.ctx.autocast():
                    out = self.model(chunk).float()
                ent = S.pixel_entropy(out.softmax(1))  # mean pixel entropy per image
                masks = ys[start:start + MINE_CHUNK]
                present = torch.stack([((masks == c).flatten(1).any(1)) for c in range(self.ctx.num_classes)], 1)
                scores.append(ent / present.sum(1).clamp_min(1))
            scores = torch.cat(scores)
        finally:
            self.swap.n_styled = 0
            self.train_mode()
        keep = max(p.source_batch, math.ceil(p.select_ratio * len(scores)))
        self.informative = scores.topk(min(keep, len(scores))).indices
        self.mined.append(len(self.informative))

    # --- one step ----------------------------------------------------------------------------------
    def mixed_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        xs, ys = self.ctx.source_pool
        pick = self.informative[torch.randint(len(self.informative), (p.source_batch,), generator=self.generator)
                                .to(self.informative.device)]
        src, lab = xs[pick], ys[pick]
        h, w = src.shape[-2:]
        if lab.shape[-2:] != (h, w):
            lab = F.interpolate(lab[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        t = torch.randint(len(x), (p.source_batch,), generator=self.generator).to(x.device)
        tgt, tgt_lab = x[t], self.pseudo[t]
        if tgt_lab.shape[-2:] != (h, w):
            tgt_lab = F.interpolate(tgt_lab[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        grid = p.patch_grid
        cells = (torch.rand(p.source_batch, 1, grid, grid, generator=self.generator) < p.mix_ratio).float()
        mask = F.interpolate(cells, size=(h, w), mode="nearest").to(x.device).bool()
        mixed = torch.where(mask, tgt, src)
        labels = torch.where(mask[:, 0], tgt_lab, lab)
        return mixed, labels

    def update_prototypes(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.no_grad():
            if labels.shape[-2:] != feats.shape[-2:]:
                labels = F.interpolate(labels[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
            f = F.normalize(feats.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
            lab = labels.reshape(-1)
            m = self.params.prototype_momentum
            for c in torch.unique(lab).tolist():
                if c == S.IGNORE_INDEX or c >= self.ctx.num_classes:
                    continue
                mean = f[lab == c].mean(0)
                if bool(self.have_prototype[c]):
                    self.prototypes[c] = m * self.prototypes[c] + (1 - m) * mean
                else:
                    self.prototypes[c] = mean
                    self.have_prototype[c] = True

    def information_maximisation(self, logits: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(1)
        if bool(self.have_prototype.all()):
            sim = torch.einsum("nchw,kc->nkhw", F.normalize(feats.float(), dim=1),
                               F.normalize(self.prototypes, dim=1))
            proto = (sim / self.params.temperature).softmax(1)
            if proto.shape[-2:] != probs.shape[-2:]:
                proto = F.interpolate(proto, size=probs.shape[-2:], mode="bilinear", align_corners=False)
            probs = probs * proto
            probs = probs / probs.sum(1, keepdim=True).clamp_min(1e-8)
        pixel = -(probs * (probs + S.EPS).log()).sum(1).mean()
        mean = probs.mean(dim=(0, 2, 3))
        # diversity: KL(mean || target distribution); with the uniform target, SHOT's -H(mean) up to a constant
        prior = (self.class_prior if self.params.diversity_target == "source_classes"
                 else torch.full_like(mean, 1.0 / len(mean)))
        div = (mean * ((mean + S.EPS).log() - (prior + S.EPS).log())).sum()
        return pixel + self.params.lambda_div * div

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        p = self.params
        if self.informative is None or self.steps % p.mine_every == 0:
            self.mine(x)
        self.target = x
        self.target_style(x)
        mixed, labels = self.mixed_batch(x)
        n = len(mixed)
        self.swap.n_styled = n
        try:
            with self.ctx.autocast():
                out = self.model(torch.cat([mixed, x]))
        finally:
            self.swap.n_styled = 0
        feats = self.features.value
        out = out.float()
        ce = F.cross_entropy(out[:n], labels, ignore_index=S.IGNORE_INDEX)
        ce = torch.nan_to_num(ce)  # every mixed pixel ignored: no supervised signal this step
        im = self.information_maximisation(out[n:], feats[n:])
        loss = ce + p.lambda_im * im
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.update_prototypes(feats[:n].detach(), labels)
        self.steps += 1
        # The step's predictions: the mixed images' and the target's. One canvas alone has the class histogram
        # of a collapse (mostly background); the mixed images show several classes, so the collapse guard
        # watches the model on both.
        return StepOutput(out.detach(), loss.detach(), {"ce": ce.detach(), "im": im.detach()})

    def export_model(self) -> nn.Module:
        """The adapted model; with `restyled_statistics`, its BatchNorm statistics re-estimated once (the first
        call, after the last step) for its final weights on the source pool in the target's style. A model
        rolled back to the source weights (collapse guard) is returned as it is."""
        if self.params.restyled_statistics and not self.restyled and self.target is not None:
            self.restyled = True
            self.target_style(self.target)
            self.restyle_statistics()
        return self.model

    @torch.no_grad()
    def restyle_statistics(self) -> None:
        """BatchNorm statistics of the whole source pool rendered in the target's style (the style set by
        `target_style`): what the target domain looks like to the model, with the pool's variety of content
        rather than one image's (whose own statistics measured far worse, BENCHMARKS.md)."""
        xs, _ = self.ctx.source_pool
        self.swap.n_styled = len(xs)
        try:
            recalibrate_batch_norm(self.model, (xs[i:i + MINE_CHUNK] for i in range(0, len(xs), MINE_CHUNK)),
                                   self.ctx.autocast)
        finally:
            self.swap.n_styled = 0

    def report(self) -> dict[str, Any]:
        xs, _ = self.ctx.source_pool
        return {"steps": self.steps, "source_pool": len(xs), "mined_per_round": self.mined[:1],
                "minings": len(self.mined), "prototypes": int(self.have_prototype.sum())}
