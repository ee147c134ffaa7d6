"""The Qt-free evidence jobs of napari_milview.jobs, driven as the docks' workers drive them
(the generator, in this thread): the faithfulness job's numbers are the core's, Cancel stops
it inside a core call, the disagreement job refuses fewer than two checkpoints. The docks'
side (threads, widgets) is tested in tests/_qt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_milview.evidence.faithfulness import deletion_insertion, descending
from napari_milview.jobs import (
    DisagreementConfig,
    DisagreementJob,
    EvidenceUpdate,
    FaithfulnessConfig,
    FaithfulnessJob,
)
from napari_milview.mil import build_model
from napari_milview.mil.base import MILModel, MILOutput


def _drive(job) -> list:
    return list(job.gen)


def _bag(n=40, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def test_faithfulness_job_equals_the_core():
    torch.manual_seed(0)
    model = build_model("abmil", in_dim=8, n_classes=2)
    x = _bag()
    rng = np.random.default_rng(2)
    scores = {"attention": rng.random(40), "other": rng.random(40)}
    job = FaithfulnessJob(FaithfulnessConfig(model, x, scores, k=5, steps=8, random_orders=3,
                                             seed=7, classes=["normal", "lesion"]))
    ups = _drive(job)
    assert job.outcome == "done", job.error
    assert all(isinstance(u, EvidenceUpdate) for u in ups)
    assert [u.source for u in ups if u.source] == ["attention", "other"]
    total = 4 * 2 * 9 + 1 + (2 * 9 + 1)
    assert job.progress == (total, total) == (ups[-1].done, ups[-1].total)
    assert job.calls["deletion_insertion"] == 2  # one core call per source
    for name, s in scores.items():
        ref = deletion_insertion(model, x, descending(s), k=5, steps=8, random_orders=3,
                                 seed=7)
        got = job.result[name]
        for key in ("deletion", "insertion", "random_deletion", "random_insertion",
                    "random_deletion_std", "random_insertion_std"):
            np.testing.assert_allclose(got[key], ref[key], atol=1e-12, err_msg=key)
        for key in ("deletion_auc", "insertion_auc", "random_deletion_auc",
                    "random_insertion_auc", "topk_probability", "baseline"):
            assert got[key] == pytest.approx(ref[key], abs=1e-12), (name, key)
        assert got["target"] == ref["target"] and got["random_orders"] == 3
        assert got["png"].startswith(b"\x89PNG")


class _Stopper(MILModel):
    """Mean pooling that sets ``event`` on its ``after``-th forward (a user pressing Cancel
    while the core is running)."""

    arch = "test_stopper"

    def __init__(self, event, after, in_dim=8, n_classes=2):
        super().__init__()
        self._set_hparams(in_dim=in_dim, n_classes=n_classes)
        self.fc = torch.nn.Linear(in_dim, n_classes)
        self.event, self.after, self.n = event, after, 0

    def _forward(self, x, with_sources):
        self.n += 1
        if self.n == self.after:
            self.event.set()
        return MILOutput(logits=self.fc(x.mean(0)), sources={}, default_source="attention")


def test_cancel_stops_the_faithfulness_job_inside_the_core_call():
    job = FaithfulnessJob(FaithfulnessConfig(None, _bag(), {"a": np.arange(40.0)}, steps=10,
                                             random_orders=5, plots=False))
    model = _Stopper(job.cancel, after=30)
    job.config.model = model
    _drive(job)
    assert job.outcome == "cancelled" and job.result is None
    # the full-bag forward of _prob_fn is call 1; cancel set on call 30 stops the next one
    assert model.n == 30
    assert 0 < job.progress[0] < job.progress[1]


def test_disagreement_job_needs_two_checkpoints():
    job = DisagreementJob(DisagreementConfig(["one.pt"], bag=None))
    assert _drive(job) == []
    assert job.outcome == "failed" and "2 or more" in job.error
