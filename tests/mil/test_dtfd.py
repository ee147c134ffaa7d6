"""DTFD-MIL: keys, the authors' checkpoint container, the seeded pseudo-bag split, sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_milview.mil import DTFD, build_from_state_dict, build_model, detect_arch
from napari_milview.mil.checkpoint import CheckpointError, load_model
from napari_milview.mil.dtfd import pseudo_bag_split

#: the four state_dicts of the authors' released save_model/model.pth (in 1024, mDim 512)
AUTHORS_TABLE = {
    "classifier": {"fc.weight": (2, 512), "fc.bias": (2,)},
    "dim_reduction": {"fc1.weight": (512, 1024)},
    "attention": {
        "attention_V.0.weight": (128, 512), "attention_V.0.bias": (128,),
        "attention_U.0.weight": (128, 512), "attention_U.0.bias": (128,),
        "attention_weights.weight": (1, 128), "attention_weights.bias": (1,)},
    "att_classifier": {
        "attention.attention_V.0.weight": (128, 512), "attention.attention_V.0.bias": (128,),
        "attention.attention_U.0.weight": (128, 512), "attention.attention_U.0.bias": (128,),
        "attention.attention_weights.weight": (1, 128),
        "attention.attention_weights.bias": (1,),
        "classifier.fc.weight": (2, 512), "classifier.fc.bias": (2,)},
}
FLAT_TABLE = {f"{m}.{k}": s for m, d in AUTHORS_TABLE.items() for k, s in d.items()}


def _container(table=AUTHORS_TABLE, seed=0, prefix=""):
    """A dict of module state_dicts as Main_DTFD_MIL.py saves it (``prefix`` 'module.' as
    with --isPar True)."""
    g = torch.Generator().manual_seed(seed)
    return {m: {prefix + k: torch.randn(s, generator=g) * 0.1 for k, s in d.items()}
            for m, d in table.items()}


def _small(**kw):
    torch.manual_seed(0)
    hp = {"in_dim": 16, "n_classes": 2, "m_dim": 8, "attn_dim": 4, **kw}
    model = build_model("dtfd", **hp)
    with torch.no_grad():
        model.classifier.fc.weight.mul_(20)
    return model


def _bag(n=53, d=16, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# -- keys and the container ---------------------------------------------------------------
def test_keys_shapes_match_the_authors_checkpoint_and_load_strictly():
    m = DTFD(in_dim=1024, n_classes=2, m_dim=512, attn_dim=128)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == FLAT_TABLE
    sd = {f"{mod}.{k}": v for mod, d in _container().items() for k, v in d.items()}
    assert detect_arch(sd) == "dtfd"
    model = build_from_state_dict(sd)
    assert model.hparams["m_dim"] == 512 and model.hparams["in_dim"] == 1024
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])


def test_residual_blocks_are_inferred():
    m = DTFD(in_dim=32, m_dim=16, attn_dim=8, num_res=2)
    assert "dim_reduction.resBlocks.1.block.2.weight" in m.state_dict()
    assert DTFD.hparams_from_state_dict(m.state_dict())["num_res"] == 2
    out = m.forward_attention(torch.randn(9, 32))
    assert torch.isfinite(out.logits).all()


def test_inconsistent_state_dict_is_named():
    sd = DTFD(in_dim=32, m_dim=16, attn_dim=8).state_dict()
    sd["att_classifier.classifier.fc.weight"] = torch.zeros(3, 16)
    with pytest.raises(ValueError, match="classes 2/3"):
        DTFD.hparams_from_state_dict(sd)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_the_authors_container_loads_with_a_note(tmp_path, prefix):
    path = tmp_path / "best_model.pth"
    ck = _container(prefix=prefix)
    torch.save(ck, path)
    model, card = load_model(path)
    assert card.arch == "dtfd" and card.feature_dim == 1024
    assert ("container: 4 module state_dicts (classifier, dim_reduction, attention, "
            "att_classifier)") in card.notes
    if prefix:
        assert "DataParallel 'module.' inside" in card.notes
    sd = model.state_dict()
    assert set(sd) == set(FLAT_TABLE)
    for mod, d in ck.items():
        for k, v in d.items():
            assert torch.equal(sd[f"{mod}.{k.removeprefix(prefix)}"], v)
    # split settings the weights cannot show are on the card, with their defaults
    assert card.hparams["num_group"] == 4 and card.hparams["distill"] == "AFS"
    assert card.hparams["seed"] == 0 and card.hparams["total_instance"] == 4


def test_settings_through_hparams_and_a_missing_module_is_refused(tmp_path):
    path = tmp_path / "best_model.pth"
    ck = _container()
    torch.save(ck, path)
    _, card = load_model(path, hparams={"seed": 5, "distill": "MaxMinS", "num_group": 3,
                                        "total_instance": 6})
    assert (card.hparams["seed"], card.hparams["distill"], card.hparams["num_group"]) == \
        (5, "MaxMinS", 3)
    with pytest.raises(CheckpointError, match="m_dim"):
        load_model(path, hparams={"m_dim": 256})
    del ck["att_classifier"]
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="unknown layout"):
        load_model(path)


# -- the split ----------------------------------------------------------------------------
@pytest.mark.parametrize("n,g", [(53, 4), (8, 4), (3, 4), (1, 1), (10, 3)])
def test_split_partitions_with_array_split_sizes(n, g):
    chunks = pseudo_bag_split(n, g, seed=0)
    assert len(chunks) == g
    assert sorted(torch.cat(chunks).tolist()) == list(range(n))
    assert [len(c) for c in chunks] == [len(c) for c in np.array_split(np.arange(n), g)]
    assert torch.cat(chunks).tolist() == np.random.default_rng(0).permutation(n).tolist()


def test_same_seed_same_output_whatever_the_global_rng():
    model, x = _small(), _bag()
    torch.manual_seed(1)
    np.random.seed(1)
    a = model.forward_attention(x)
    torch.manual_seed(2)
    np.random.seed(2)
    b = model.forward_attention(x)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.aux["pseudo_bag"], b.aux["pseudo_bag"])
    for k in a.sources:
        assert torch.equal(a.sources[k], b.sources[k])
    twin = build_model("dtfd", **model.hparams)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin(x), a.logits)


def test_different_seed_different_split():
    model, x = _small(), _bag()
    other = build_model("dtfd", **{**model.hparams, "seed": 1})
    other.load_state_dict(model.state_dict())
    a, b = model.forward_attention(x), other.forward_attention(x)
    assert not torch.equal(a.aux["pseudo_bag"], b.aux["pseudo_bag"])
    assert not torch.allclose(a.sources["tier1/attention"], b.sources["tier1/attention"])
    assert not torch.allclose(a.logits, b.logits)
    # the whole-bag attention logits do not depend on the split
    assert torch.equal(a.sources["raw/tier1/attention"], b.sources["raw/tier1/attention"])


# -- sources ------------------------------------------------------------------------------
def test_sources_follow_the_paper():
    model, x = _small(n_classes=3), _bag()
    out = model.forward_attention(x)
    n = x.shape[0]
    assert out.default_source == "instance/2"
    assert set(out.sources) == {"tier1/attention", "raw/tier1/attention", "instance/0",
                                "instance/1", "instance/2"}
    assert all(v.shape == (n,) for v in out.sources.values())
    groups = out.aux["pseudo_bag"]
    att = out.sources["tier1/attention"]
    h = model.dim_reduction(x)
    w = model.classifier.fc.weight
    for g in range(4):
        idx = (groups == g).nonzero()[:, 0]
        torch.testing.assert_close(att[idx].sum(), torch.tensor(1.0))
        torch.testing.assert_close(att[idx], torch.softmax(out.sources["raw/tier1/attention"]
                                                           [idx], 0))
        # the paper's instance probability: softmax_c(W_c . (a_k h_k)), no bias
        p = torch.softmax((att[idx, None] * h[idx]) @ w.t(), dim=1)
        for c in range(3):
            torch.testing.assert_close(out.sources[f"instance/{c}"][idx], p[:, c])
    total = sum(out.sources[f"instance/{c}"] for c in range(3))
    torch.testing.assert_close(total, torch.ones(n))
    assert out.sources["instance/2"].std() > 0.01  # informative, not all 1/C


def test_one_pseudo_bag_afs_is_abmil_then_the_tier2_classifier():
    model, x = _small(num_group=1), _bag()
    out = model.forward_attention(x)
    a = torch.softmax(out.sources["raw/tier1/attention"], 0)
    f = a @ model.dim_reduction(x)
    torch.testing.assert_close(out.aux["tier2_attention"], torch.ones(1))
    torch.testing.assert_close(out.logits, model.att_classifier.classifier(f))
    torch.testing.assert_close(out.aux["tier1_logits"][0], model.classifier(f))


@pytest.mark.parametrize("distill,total,n_feats", [("AFS", 4, 4), ("MaxS", 8, 8),
                                                   ("MaxMinS", 8, 16)])
def test_distillation_variants(distill, total, n_feats):
    model, x = _small(distill=distill, total_instance=total), _bag()
    out = model.forward_attention(x)
    assert out.aux["tier2_attention"].shape == (n_feats,)
    assert out.aux["tier1_logits"].shape == (4, 2)
    torch.testing.assert_close(out.aux["tier2_attention"].sum(), torch.tensor(1.0))


def test_maxs_picks_the_top_instances_of_each_pseudo_bag():
    model, x = _small(distill="MaxS", total_instance=4), _bag()
    out = model.forward_attention(x)
    h = model.dim_reduction(x)
    groups, p = out.aux["pseudo_bag"], out.sources["instance/1"]
    top = [int(torch.nonzero(groups == g)[:, 0][p[groups == g].argmax()]) for g in range(4)]
    logits, _ = model.att_classifier(h[top])
    torch.testing.assert_close(out.logits, logits)


def test_small_bags_as_the_authors_code_treats_them():
    model = _small()
    # N < G: the empty pseudo-bags give zero features under AFS (the sum over no instance)
    out = model.forward_attention(_bag(n=2))
    assert out.aux["tier2_attention"].shape == (4,)
    assert (out.aux["pseudo_bag"] < 2).all()
    one = model.forward_attention(_bag(n=1))
    torch.testing.assert_close(one.sources["tier1/attention"], torch.ones(1))
    mm = _small(distill="MaxMinS", total_instance=8).forward_attention(_bag(n=2))
    assert mm.aux["tier2_attention"].shape == (4,)  # 2 non-empty pseudo-bags x (1 + 1)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="distill"):
        DTFD(distill="Max")
    with pytest.raises(ValueError, match="total_instance // num_group"):
        DTFD(distill="MaxS", total_instance=2, num_group=4)


def test_gradients_flow_in_training_mode():
    model = _small(dropout=0.1).train()
    model(_bag()).sum().backward()
    assert model.dim_reduction.fc1.weight.grad is not None
    assert model.att_classifier.classifier.fc.weight.grad is not None
