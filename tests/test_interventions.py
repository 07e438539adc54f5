"""Token layout properties, STAS / DG / STG exactness, and that every intervention intervenes."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minivdit.attention import attention
from minivdit.interventions import Perturb, Steer, TokenLayout, Zero

# --- token layout ------------------------------------------------------------------------------------------------

grids = st.builds(TokenLayout, frames=st.integers(1, 6), height=st.integers(1, 9), width=st.integers(1, 9),
                  text_len=st.sampled_from([0, 5, 226]), patch_t=st.just(1))


@settings(max_examples=200, deadline=None)
@given(layout=grids, p=st.floats(0, 50))
def test_layout_partition(layout, p):
    n, k = layout.n, math.floor(p / 100 * layout.n + 1e-9)
    first, boundary, interior = layout.partition(p)
    every = torch.cat([first, boundary, interior])
    assert len(every) == len(set(every.tolist())) == layout.token_frames * n  # disjoint and complete
    assert set(every.tolist()) == set(range(layout.text_len, layout.num_tokens))
    assert len(first) == n and first.min() == layout.text_len
    assert len(layout.boundary(p)) == layout.token_frames * min(2 * k, n)  # head k + tail k per frame
    assert len(boundary) == (layout.token_frames - 1) * min(2 * k, n)
    s = layout.tokens("first+boundary", p)
    assert len(s) == n + (layout.token_frames - 1) * min(2 * k, n)


@settings(max_examples=100, deadline=None)
@given(layout=grids)
def test_layout_edge_cases(layout):
    assert len(layout.boundary(0)) == 0  # p = 0: no boundary tokens
    _, boundary, interior = layout.partition(50)  # p = 50: the whole frame, but an odd frame's middle token
    assert len(interior) == (layout.token_frames - 1) * (layout.n % 2)
    pos = (layout.boundary(50) - layout.text_len) % layout.n
    assert set(pos.tolist()) <= set(range(layout.n))


def test_boundary_positions_and_rounding():
    layout = TokenLayout(frames=3, height=4, width=5)  # n = 20; p = 8 -> floor(1.6) = 1 token each side
    assert layout.boundary_width(8) == 1 and layout.boundary_width(10) == 2
    assert layout.boundary(8).tolist() == [0, 19, 20, 39, 40, 59]
    assert TokenLayout(2, 2, 2, text_len=3, patch_t=2).first().tolist() == [3, 4, 5, 6]  # 2 latent frames per token
    with pytest.raises(ValueError, match=r"\[0, 50\]"):
        layout.boundary(51)


# --- STAS --------------------------------------------------------------------------------------------------------


def test_stas_is_eq_3_to_5():
    layout = TokenLayout(frames=3, height=2, width=5)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, layout.num_tokens, 8, generator=g)
    steer = Steer(block=0, dims=(1, 6), alpha=2.5, p=10)
    out = steer(h, layout)
    s = layout.tokens("first+boundary", 10)
    want = h.clone()
    for b in range(2):
        for d in (1, 6):
            peak = h[b, :, d].abs().max()  # max over all tokens of this sample (Alg. 1 line 9)
            want[b, s, d] = 2.5 * peak * torch.sign(h[b, s, d])
    assert torch.equal(out, want)
    changed = (out != h).nonzero()
    assert set(changed[:, 1].tolist()) <= set(s.tolist()) and set(changed[:, 2].tolist()) <= {1, 6}
    scaled = Steer(block=0, dims=(1,), rule="scaling", omega=0.5, tokens="first", p=0)(h, layout)
    assert torch.equal(scaled[:, :10, 1], 1.5 * h[:, :10, 1]) and torch.equal(scaled[:, 10:], h[:, 10:])


def test_stas_batched_equals_sequential():
    layout = TokenLayout(frames=2, height=3, width=3)
    h = torch.randn(2, layout.num_tokens, 6)
    h[1] *= 10  # the two samples have very different peaks
    steer = Steer(block=0, dims=(2,), alpha=3.0, p=20)
    assert torch.equal(steer(h, layout), torch.cat([steer(h[:1], layout), steer(h[1:], layout)]))


@pytest.mark.parametrize("bad", [dict(alpha=-1.0), dict(p=60.0), dict(p=-1.0), dict(rule="min"), dict(tokens="all")])
def test_stas_rejects_bad_parameters(bad):
    with pytest.raises(ValueError):
        Steer(block=0, dims=(0,), **bad)


def test_perturb_validation():
    with pytest.raises(ValueError, match="block indices"):
        Perturb(steer=Steer(block=7, dims=(0,))).validate(num_layers=4, dim=8)
    with pytest.raises(ValueError, match="hidden size is 8"):
        Perturb(zero=Zero(block=0, dims=(8,))).validate(num_layers=4, dim=8)
    with pytest.raises(ValueError, match="block indices"):
        Perturb(skip=frozenset({4})).validate(num_layers=4, dim=8)


# --- interventions through the model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def inputs(b=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 16, 3, 4, 6, generator=g), torch.tensor([900, 900][:b]), torch.randn(b, 512, 32, generator=g)


@torch.no_grad()
def test_interventions_change_the_output_and_strengths_differ(model):
    x, t, ctx = inputs()
    clean = model(x, t, ctx)
    outs = [model(x, t, ctx, Perturb(steer=Steer(block=1, dims=(3, 7), alpha=a, p=20))) for a in (1.0, 4.0)]
    outs += [model(x, t, ctx, Perturb(zero=Zero(1, (3, 7)))), model(x, t, ctx, Perturb(skip=frozenset({2}))),
             model(x, t, ctx, Perturb(identity_attn=frozenset({2})))]
    for o in outs:
        assert (o - clean).abs().max() > 1e-4
    assert (outs[0] - outs[1]).abs().max() > 1e-4
    assert torch.equal(model(x, t, ctx, Perturb(steer=Steer(block=1, dims=()))), clean)  # no channels: vanilla


@torch.no_grad()
def test_stg_r_equals_the_model_without_that_block(model):
    x, t, ctx = inputs()
    got = model(x, t, ctx, Perturb(skip=frozenset({2})))
    blocks = model.blocks
    try:
        model.blocks = torch.nn.ModuleList([b for i, b in enumerate(blocks) if i != 2])
        want = model(x, t, ctx)
    finally:
        model.blocks = blocks
    assert torch.equal(got, want)


@torch.no_grad()
def test_stg_a_replaces_self_attention_by_the_projected_values(model):
    x, t, ctx = inputs()
    got = model(x, t, ctx, Perturb(identity_attn=frozenset({1})))
    attn = model.blocks[1].self_attn
    original = attn.forward
    try:  # reference: the self-attention output of block 1 is o(v) -- each token's own value vector
        attn.forward = lambda h, rope=None, identity=False, blur=None: attn.o(attn.v(h))
        want = model(x, t, ctx)
    finally:
        attn.forward = original
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_identity_attention_function_keeps_text_rows():
    q, k, v = (torch.randn(1, 7, 2, 4) for _ in range(3))
    out = attention(q, k, v, identity_from=3).unflatten(-1, (2, 4))
    assert torch.equal(out[:, 3:], v[:, 3:])
    assert torch.allclose(out[:, :3], attention(q, k, v).unflatten(-1, (2, 4))[:, :3])
