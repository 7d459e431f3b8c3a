"""The causal Wan DiT: official names/shapes, the math pieces against slow references, and the
causal structure of the full-sequence and teacher-forcing forwards."""

from __future__ import annotations

import math

import pytest
import torch

from core.attention import BlockCausalMask, TeacherForcingMask, dense_mask
from core.config import ModelConfig
from core.dit import CausalWanDiT, count_parameters, sinusoidal_embedding
from core.rope import Rope3D, axis_pairs, frame_positions
from tests.conftest import text_context, tiny_model

# reference-model.md §2.1, in state-dict order.
EMBEDDINGS = [
    ("patch_embedding.weight", (3072, 48, 1, 2, 2)), ("patch_embedding.bias", (3072,)),
    ("text_embedding.0.weight", (3072, 4096)), ("text_embedding.0.bias", (3072,)),
    ("text_embedding.2.weight", (3072, 3072)), ("text_embedding.2.bias", (3072,)),
    ("time_embedding.0.weight", (3072, 256)), ("time_embedding.0.bias", (3072,)),
    ("time_embedding.2.weight", (3072, 3072)), ("time_embedding.2.bias", (3072,)),
    ("time_projection.1.weight", (18432, 3072)), ("time_projection.1.bias", (18432,)),
]
BLOCK = [("modulation", (1, 6, 3072))]
for _attn in ("self_attn", "cross_attn"):
    for _proj in "qkvo":
        BLOCK += [(f"{_attn}.{_proj}.weight", (3072, 3072)), (f"{_attn}.{_proj}.bias", (3072,))]
    BLOCK += [(f"{_attn}.norm_q.weight", (3072,)), (f"{_attn}.norm_k.weight", (3072,))]
    if _attn == "self_attn":
        BLOCK += [("norm3.weight", (3072,)), ("norm3.bias", (3072,))]
BLOCK += [("ffn.0.weight", (14336, 3072)), ("ffn.0.bias", (14336,)),
          ("ffn.2.weight", (3072, 14336)), ("ffn.2.bias", (3072,))]
HEAD = [("head.modulation", (1, 2, 3072)), ("head.head.weight", (192, 3072)),
        ("head.head.bias", (192,))]


def test_5b_preset_matches_official_state_dict():
    with torch.device("meta"):
        model = CausalWanDiT(ModelConfig.preset("wan2.2-ti2v-5b"))
    state = model.state_dict()
    expected = EMBEDDINGS + [(f"blocks.{i}.{k}", s) for i in range(30) for k, s in BLOCK] + HEAD
    assert len(state) == 825
    assert count_parameters(model) == 4_999_787_712
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected
    block_params = sum(math.prod(s) for _, s in BLOCK)
    assert len(BLOCK) == 27 and block_params == 163_656_704
    assert not list(model.buffers())  # the RoPE tables are not state


# -- math pieces ---------------------------------------------------------------------------------


def test_sinusoidal_embedding_cosine_half_first():
    t = torch.tensor([[0.0, 1.0, 999.0]])
    emb = sinusoidal_embedding(t, 256)
    assert emb.shape == (1, 3, 256) and emb.dtype == torch.float64
    j = torch.arange(128, dtype=torch.float64)
    w = 10000.0 ** (-j / 128)
    for i, value in enumerate(t[0].tolist()):
        assert torch.allclose(emb[0, i, :128], torch.cos(value * w))
        assert torch.allclose(emb[0, i, 128:], torch.sin(value * w))


def test_rope_axis_split_and_bases():
    assert axis_pairs(128) == (22, 21, 21)
    assert axis_pairs(32) == (6, 5, 5)
    rope = Rope3D(128)
    for pairs, inv in zip((22, 21, 21), rope.inv_freq, strict=True):
        j = torch.arange(pairs, dtype=torch.float64)
        assert torch.allclose(inv, 10000.0 ** (-2 * j / (2 * pairs)), rtol=0, atol=1e-15)


@pytest.mark.parametrize("head_dim,frames,height,width,start,offset", [
    (32, 3, 2, 4, 0, 0.0), (128, 2, 3, 2, 40, 8.0), (24, 4, 1, 3, 7, 16.0)])
def test_rope_rotation_matches_complex_reference(head_dim, frames, height, width, start, offset):
    rope = Rope3D(head_dim)
    pt, ph, pw = axis_pairs(head_dim)
    x = torch.randn(2, frames * height * width, 3, head_dim, dtype=torch.float64)
    table = rope.table(frame_positions(frames, start, offset), height, width, torch.float64)
    got = table.rotate(x)
    # Slow reference: token by token, pair i of (f, r, c) turns by p * inv_freq of its axis.
    inv_t, inv_h, inv_w = rope.inv_freq
    expected = torch.empty_like(x)
    token = 0
    for f in range(frames):
        for r in range(height):
            for c in range(width):
                angles = torch.cat([(start + f + offset) * inv_t, r * inv_h, c * inv_w])
                z = torch.view_as_complex(x[:, token].reshape(2, 3, -1, 2).contiguous())
                rotated = z * torch.polar(torch.ones_like(angles), angles)
                expected[:, token] = torch.view_as_real(rotated).reshape(2, 3, head_dim)
                token += 1
    assert torch.allclose(got, expected, atol=1e-12)
    assert pt + ph + pw == head_dim // 2


def test_rope_pairs_are_interleaved():
    rope = Rope3D(32)
    x = torch.zeros(1, 1, 1, 32, dtype=torch.float64)
    x[..., 0] = 1.0  # real part of pair 0 (temporal axis, frequency 1)
    table = rope.table(frame_positions(1, start_frame=3), 1, 1, torch.float64)
    out = table.rotate(x)[0, 0, 0]
    assert torch.allclose(out[:2], torch.tensor([math.cos(3.0), math.sin(3.0)], dtype=torch.float64))
    assert torch.count_nonzero(out[2:]) == 0


def test_unpatchify_order_is_pt_ph_pw_c():
    model = tiny_model()
    y = torch.randn(1, 2, 3 * 4, 192)  # F=2, h=3, w=4
    out = model.unpatchify(y, (2, 3, 4))
    assert out.shape == (1, 48, 2, 6, 8)
    for f, h, w, ph, pw, c in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 1, 1, 47), (0, 1, 2, 1, 0, 5)]:
        assert out[0, c, f, 2 * h + ph, 2 * w + pw] == y[0, f, h * 4 + w, ph * 96 + pw * 48 + c]


# -- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames,tokens,fpb", [(6, 2, 2), (4, 3, 1), (8, 1, 4)])
def test_teacher_forcing_mask_rules_for_every_pair(frames, tokens, fpb):
    mask = dense_mask(TeacherForcingMask(frames, tokens, fpb))
    half = frames * tokens
    for q in range(2 * half):
        for k in range(2 * half):
            q_noisy, k_noisy = q >= half, k >= half
            qb, kb = (q % half) // (fpb * tokens), (k % half) // (fpb * tokens)
            if not q_noisy:
                want = not k_noisy and kb <= qb
            else:
                want = (not k_noisy and kb < qb) or (k_noisy and kb == qb)
            assert bool(mask[q, k]) == want, (q, k)


def test_block_causal_mask_rule():
    mask = dense_mask(BlockCausalMask(5, 3, 2))
    for q in range(15):
        end = (q // 6 + 1) * 6
        assert mask[q].tolist() == [k < end for k in range(15)]


# -- forward structure ---------------------------------------------------------------------------


def test_block_causal_forward_is_causal_per_block():
    model = tiny_model(1)
    x = torch.randn(1, 48, 6, 8, 8)
    t = torch.rand(1, 6) * 1000
    ctx = text_context(1, 2)
    with torch.no_grad():
        base = model(x, t, ctx, frames_per_block=2)
        later = x.clone()
        later[:, :, 4:] += 1.0  # change the last block only
        moved = model(later, t, ctx, frames_per_block=2)
        earlier = x.clone()
        earlier[:, :, 1] += 1.0  # change the first block
        moved_early = model(earlier, t, ctx, frames_per_block=2)
    assert torch.equal(base[:, :, :4], moved[:, :, :4])
    assert not torch.allclose(base[:, :, 4:], moved_early[:, :, 4:])


def test_teacher_forcing_structure():
    model = tiny_model(2)
    noisy = torch.randn(1, 48, 6, 8, 8)
    clean = torch.randn(1, 48, 6, 8, 8)
    t = torch.rand(1, 6) * 1000
    ctx = text_context(1, 3)
    with torch.no_grad():
        base = model(noisy, t, ctx, frames_per_block=2, clean_x=clean)
        assert torch.equal(base, model(noisy, t, ctx, frames_per_block=2, clean_x=clean,
                                       clean_t=torch.zeros(1, 6)))
        other_noisy = noisy.clone()
        other_noisy[:, :, 2:4] += 1.0  # noisy block 1
        out = model(other_noisy, t, ctx, frames_per_block=2, clean_x=clean)
        # noisy blocks never see each other
        assert torch.equal(out[:, :, :2], base[:, :, :2])
        assert torch.equal(out[:, :, 4:], base[:, :, 4:])
        other_clean = clean.clone()
        other_clean[:, :, 2:4] += 1.0  # clean block 1: seen by noisy block 2 only
        out = model(noisy, t, ctx, frames_per_block=2, clean_x=other_clean)
        assert torch.equal(out[:, :, :4], base[:, :, :4])
        assert not torch.allclose(out[:, :, 4:], base[:, :, 4:])


def test_teacher_forcing_equals_block_causal_on_clean_history():
    """A noisy block in TF sees exactly what the plain forward of [clean history | that block]
    sees (clean frames at t = 0, same RoPE)."""
    model = tiny_model(4)
    clean = torch.randn(1, 48, 4, 8, 8)
    noisy = torch.randn(1, 48, 4, 8, 8)
    t = torch.full((1, 4), 700.0)
    ctx = text_context(1, 5)
    with torch.no_grad():
        tf = model(noisy, t, ctx, frames_per_block=2, clean_x=clean)
        seq = torch.cat([clean[:, :, :2], noisy[:, :, 2:]], dim=2)
        plain = model(seq, torch.tensor([[0.0, 0.0, 700.0, 700.0]]), ctx, frames_per_block=2)
    assert (tf[:, :, 2:] - plain[:, :, 2:]).abs().max() < 1e-5


def test_context_is_zero_padded_and_every_slot_is_attended():
    model = tiny_model(6)
    x = torch.randn(1, 48, 2, 8, 8)
    t = torch.full((1, 2), 500.0)
    short = torch.randn(1, 30, 64)
    padded = torch.cat([short, torch.zeros(1, 482, 64)], dim=1)
    with torch.no_grad():
        a = model(x, t, short, frames_per_block=2)
        b = model(x, t, padded, frames_per_block=2)
    assert torch.equal(a, b)
    # Zero rows become a nonzero constant after text_embedding and are attended: without the
    # padding slots the result would differ.
    text = model.prepare_text(short)
    k_pad = text.layers[0].k[:, 30:]
    assert k_pad.abs().max() > 0


def test_multi_prompt_groups_attend_their_own_prompt():
    """Context batch B*K: the sequence is cut into K groups, group k attends prompt k."""
    model = tiny_model(7)
    x = torch.randn(1, 48, 4, 8, 8)
    t = torch.full((1, 4), 300.0)
    p0, p1 = text_context(1, 8), text_context(1, 9)
    with torch.no_grad():
        both = model(x, t, torch.cat([p0, p1]), frames_per_block=2)
        only0 = model(x, t, p0, frames_per_block=2)
        only1 = model(x, t, p1, frames_per_block=2)
    # frames 0-1 (group 0) cannot see frames 2-3 (a later block): they depend on prompt 0 only
    assert (both[:, :, :2] - only0[:, :, :2]).abs().max() < 1e-5
    assert not torch.allclose(both[:, :, 2:], only0[:, :, 2:])
    assert not torch.allclose(both[:, :, :2], only1[:, :, :2])
    block = model.blocks[0].cross_attn
    h = torch.randn(1, 32, 128)
    with torch.no_grad():
        grouped = block(h, model.prepare_text(torch.cat([p0, p1])).layers[0])
        first = block(h[:, :16], model.prepare_text(p0).layers[0])
        second = block(h[:, 16:], model.prepare_text(p1).layers[0])
    assert torch.allclose(grouped, torch.cat([first, second], dim=1), atol=1e-6)


@pytest.mark.parametrize("bad", ["t_1d", "channels", "odd_height", "context_dim"])
def test_bad_shapes_raise_value_error(bad):
    model = tiny_model()
    x, t, ctx = torch.randn(1, 48, 2, 8, 8), torch.zeros(1, 2), text_context(1, 0)
    if bad == "t_1d":
        t = torch.zeros(1)
    elif bad == "channels":
        x = torch.randn(1, 16, 2, 8, 8)
    elif bad == "odd_height":
        x = torch.randn(1, 48, 2, 7, 8)
    else:
        ctx = torch.randn(1, 512, 32)
    with pytest.raises(ValueError):
        model(x, t, ctx, frames_per_block=2)
