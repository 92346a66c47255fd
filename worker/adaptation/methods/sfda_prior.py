"""Bateson et al.'s source-free segmentation (MedIA 2022): class-weighted pixel entropy + KL of each image's
soft class proportions to the class-ratio prior, every weight trained with Adam, BatchNorm on batch
statistics (the network in train mode, as the authors' training loop)."""
from __future__ import annotations

import torch

from app.checks import CheckError
from app.checks.priors import read_prior
from app.contract.catalog.segmentation import SFDAPriorParams

from .. import segmentation as S
from ..errors import AdaptationError
from .base import Method, StepOutput, make_optimizer
from .registry import implements


@implements(SFDAPriorParams)
class SFDAPrior(Method):
    state_attrs = ("kl_sum", "kl_count")

    def check_compatible(self) -> None:
        rows, k = self.params.prior_rows, self.ctx.num_classes
        if rows is None:  # a prior file (params.prior_upload), read as the API read it at submit
            if "prior_upload" not in self.ctx.files:
                raise AdaptationError("invalid_params", "params.prior_upload: the run was given no file for this "
                                      "upload", {"field": "params.prior_upload"})
            try:
                self.rows = read_prior(self.ctx.files["prior_upload"].read_bytes()).rows(
                    k, self.ctx.dataset_size, self.ctx.image_names)
            except CheckError as exc:
                raise AdaptationError(exc.code, f"params.prior_upload: {exc.message}",
                                      {"field": "params.prior_upload", **exc.detail}) from None
            super().check_compatible()
            return
        if len(rows[0]) != k:
            raise AdaptationError("invalid_params", f"class_ratio_prior has {len(rows[0])} classes, the model "
                                  f"predicts {k}", {"field": "params.class_ratio_prior"})
        if len(rows) not in (1, self.ctx.dataset_size):
            raise AdaptationError("invalid_params", f"class_ratio_prior has {len(rows)} rows: give one, or one per "
                                  f"target image ({self.ctx.dataset_size})", {"field": "params.class_ratio_prior"})
        self.rows = rows
        super().check_compatible()

    def configure(self) -> None:
        self.model.train()
        for p in self.model.parameters():
            p.requires_grad_(True)
        k, dev = self.ctx.num_classes, self.ctx.device
        prior = torch.tensor(self.rows, dtype=torch.float32, device=dev)
        self.prior = prior / prior.sum(1, keepdim=True)  # 1×K for every image, or N×K per image
        weights = self.params.class_weights or [0.1] + [0.9 / (k - 1)] * (k - 1)
        self.weights = torch.tensor(weights, dtype=torch.float32, device=dev)
        self.kl_sum = torch.zeros((), device=dev)
        self.kl_count = 0

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def build_optimizer(self, params):
        return make_optimizer(params, "adam", self.params.lr, weight_decay=self.params.weight_decay)

    def begin_epoch(self, epoch: int) -> None:
        self.kl_sum, self.kl_count = torch.zeros((), device=self.ctx.device), 0  # the report reads the last epoch

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        with self.ctx.autocast():
            logits = self.model(x)
        probs = logits.float().softmax(1)
        entropy = S.weighted_entropy(probs, self.weights)
        prior = self.prior.expand(len(x), -1) if len(self.prior) == 1 else self.prior[index]
        kl = S.kl_to_prior(S.soft_proportions(probs), prior)
        loss = self.params.lambda_entropy * entropy + self.params.lambda_prior * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.kl_sum = self.kl_sum + kl.detach() * len(x)
        self.kl_count += len(x)
        return StepOutput(logits.detach().float(), loss.detach(), {"kl_to_prior": kl.detach(),
                                                                   "weighted_entropy": entropy.detach()})

    def report(self) -> dict:
        return {"kl_to_prior_last_epoch": float(self.kl_sum) / max(self.kl_count, 1),
                "prior": "per_image" if len(self.prior) > 1 else self.prior[0].tolist(),
                "prior_mean": self.prior.mean(0).tolist()}  # over the target images: what the dashboard compares
