"""Each paper concept pinned against a hand computation on small tensors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omg_llava_ros.model.config import OmgDecoderConfig
from omg_llava_ros.model.omg_decoder import OmgDecoder, QueryConstraints, attention_blocked
from omg_llava_ros.model.perception_prior import (
    OUTSIDE_PIECE_LOGIT,
    bilinear_matrix,
    exact_prior_resize,
    literal_prior_resize,
    merged_selection,
    perception_prior,
    piece_followed,
    split_pieces,
)
from omg_llava_ros.model.pixel_decoder import MultiScaleDeformableAttention
from omg_llava_ros.model.pixel_shuffle import pixel_shuffle
from omg_llava_ros.model.positional_encoding import (
    coordinate_to_encoding,
    frame_position_term,
    sine_position_encoding,
)
from omg_llava_ros.model.preprocessing import ImagePreprocessor, Letterbox
from omg_llava_ros.model.prompt_encoder import box_allowed, interior_point, mask_allowed, point_query_position
from omg_llava_ros.model.transformer_decoder import PackedAttention

# -- pixel shuffle --------------------------------------------------------------------------------


def test_pixel_shuffle_channel_order_by_hand():
    c, h, w = 3, 4, 6
    x = torch.arange(2 * c * h * w, dtype=torch.float32).reshape(2, c, h, w)
    tokens = pixel_shuffle(x, 2)
    assert tokens.shape == (2, (h // 2) * (w // 2), 4 * c)
    for b in range(2):
        for i in range(h // 2):
            for j in range(w // 2):
                t = i * (w // 2) + j  # row-major token index
                for dy in range(2):
                    for dx in range(2):
                        for ch in range(c):
                            assert tokens[b, t, (dy * 2 + dx) * c + ch] == x[b, ch, 2 * i + dy, 2 * j + dx]


def test_pixel_shuffle_rejects_odd_maps():
    with pytest.raises(ValueError):
        pixel_shuffle(torch.zeros(1, 2, 3, 4), 2)


# -- positional encodings -------------------------------------------------------------------------


def _hand_sine(value: float, num_feats: int, t: float = 10000.0) -> list[float]:
    out = []
    for k in range(num_feats):
        freq = t ** (2 * (k // 2) / num_feats)
        out.append(math.sin(value / freq) if k % 2 == 0 else math.cos(value / freq))
    return out


def test_sine_position_encoding_by_hand():
    h, w, f = 2, 3, 4
    pos = sine_position_encoding(h, w, f)
    assert pos.shape == (h * w, 2 * f)
    for y in range(h):
        for x in range(w):
            ye = (y + 1) / (h + 1e-6) * 2 * math.pi
            xe = (x + 1) / (w + 1e-6) * 2 * math.pi
            expected = _hand_sine(ye, f) + _hand_sine(xe, f)
            assert torch.allclose(pos[y * w + x], torch.tensor(expected), atol=1e-5)


def test_coordinate_encoding_order_is_y_x_w_h():
    coords = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    enc = coordinate_to_encoding(coords, num_feats=4)
    parts = [_hand_sine(v * 2 * math.pi, 4) for v in (0.2, 0.1, 0.3, 0.4)]
    assert torch.allclose(enc[0], torch.tensor(sum(parts, [])), atol=1e-6)


def test_frame_term_does_not_change_cross_attention():
    torch.manual_seed(0)
    attn = PackedAttention(8, 2)
    q, k = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    term = frame_position_term(4)
    assert term.shape == (8,)
    assert torch.allclose(attn(q, k, k), attn(q, k + term, k), atol=1e-5)


# -- masked attention -----------------------------------------------------------------------------


def test_packed_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    dim, heads = 16, 4
    ours = PackedAttention(dim, heads)
    ref = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    ref.in_proj_weight.data.copy_(ours.in_proj_weight.data)
    ref.in_proj_bias.data.copy_(torch.randn(3 * dim))
    ours.in_proj_bias.data.copy_(ref.in_proj_bias.data)
    ref.out_proj.load_state_dict(ours.out_proj.state_dict())
    q, k, v = torch.randn(2, 3, dim), torch.randn(2, 7, dim), torch.randn(2, 7, dim)
    blocked = torch.rand(2, 3, 7) > 0.5
    blocked[..., 0] = False  # no fully blocked row
    expected = ref(q, k, v, attn_mask=blocked.repeat_interleave(heads, dim=0))[0]
    assert torch.allclose(ours(q, k, v, blocked), expected, atol=1e-5)


def test_attention_mask_from_prediction_and_fully_masked_rows():
    logits = torch.full((1, 2, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0  # query 0 predicts the top-left quarter; query 1 predicts nothing
    blocked = attention_blocked(logits, (4, 4))
    assert blocked.shape == (1, 2, 16)
    expected0 = torch.ones(4, 4, dtype=torch.bool)
    expected0[:2, :2] = False
    assert torch.equal(blocked[0, 0], expected0.flatten())
    assert not blocked[0, 1].any()  # an all-blocked row is reset to attend everywhere


def test_box_constraint_blocks_outside_the_box_at_every_level():
    # Prediction says "everywhere", the box says "only these cells".
    logits = torch.full((1, 1, 8, 8), 5.0)
    box = (4.0, 4.0, 8.0, 8.0)  # in a 16-px model input
    for shape in [(2, 2), (4, 4), (8, 8)]:
        allowed = box_allowed(box, 16, shape)
        cons = QueryConstraints([allowed[None, None]], torch.tensor([[True]]))
        blocked = attention_blocked(logits, shape, cons, 0)[0, 0].reshape(shape)
        h, w = shape
        # official rounding: start floor(x0/16·w), end floor(x1/16·w + 1), exclusive
        sx, ex = math.floor(4 / 16 * w), math.floor(8 / 16 * w + 1)
        expected = torch.ones(shape, dtype=torch.bool)
        expected[sx:ex, sx:ex] = False
        assert torch.equal(blocked, expected), shape


def test_box_constraint_keeps_prediction_inside_the_box():
    logits = torch.full((1, 1, 4, 4), -5.0)
    logits[0, 0, 1, 1] = 5.0
    allowed = box_allowed((0.0, 0.0, 8.0, 8.0), 16, (4, 4))  # cells [0, 3) × [0, 3)
    cons = QueryConstraints([allowed[None, None]], torch.tensor([[True]]))
    blocked = attention_blocked(logits, (4, 4), cons, 0)[0, 0].reshape(4, 4)
    assert not blocked[1, 1] and blocked.sum() == 15


def test_mask_constraint_is_exactly_the_region():
    logits = torch.full((1, 1, 4, 4), 5.0)  # prediction ignored for mask prompts
    region = np.zeros((16, 16), bool)
    region[8:, 8:] = True
    allowed = mask_allowed(region, (4, 4))
    cons = QueryConstraints([allowed[None, None]], torch.tensor([[False]]))
    blocked = attention_blocked(logits, (4, 4), cons, 0)[0, 0].reshape(4, 4)
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[2:, 2:] = False
    assert torch.equal(blocked, expected)


def _small_decoder():
    torch.manual_seed(0)
    cfg = OmgDecoderConfig(
        hidden_dim=32,
        num_queries=4,
        num_heads=4,
        num_layers=3,
        ffn_dim=64,
        pixel_decoder_layers=1,
        pixel_decoder_heads=4,
        pixel_decoder_points=2,
        pixel_decoder_ffn_dim=64,
        num_groups=8,
        num_classes=3,
        num_thing_classes=2,
        num_class_templates=2,
        clip_dim=16,
    )
    dec = OmgDecoder(cfg, (8, 16, 24, 32)).eval()
    feats = [torch.randn(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate((8, 16, 24, 32))]
    return dec, dec.encode_memory(feats)


def test_mask_prompt_query_never_reads_memory_outside_its_region():
    dec, memory = _small_decoder()
    region = np.zeros((128, 128), bool)
    region[10:60, 20:90] = True
    allowed = [mask_allowed(region, s)[None, None] for s in memory.level_shapes]
    cons = QueryConstraints(allowed, torch.tensor([[False]]))
    q, pos = torch.randn(1, 1, 32), torch.randn(1, 1, 32)
    with torch.no_grad():
        base = dec.decode(q, pos, memory, cons).query
        noise = [10 * torch.randn_like(m) for m in memory.memories]
        keep = [a[0, 0].float()[None, :, None] for a in allowed]
        outside = [m + (1 - k) * e for m, k, e in zip(memory.memories, keep, noise, strict=True)]
        inside = [m + k * e for m, k, e in zip(memory.memories, keep, noise, strict=True)]
        out_outside = dec.decode(q, pos, _with_memories(memory, outside), cons).query
        out_inside = dec.decode(q, pos, _with_memories(memory, inside), cons).query
    assert torch.allclose(base, out_outside, atol=1e-5)
    assert not torch.allclose(base, out_inside, atol=1e-3)


def _with_memories(memory, memories):
    from dataclasses import replace

    return replace(memory, memories=memories)


def test_decoder_queries_are_independent_across_batch():
    dec, memory = _small_decoder()
    q, pos = torch.randn(3, 1, 32), torch.randn(3, 1, 32)
    with torch.no_grad():
        together = dec.decode(q, pos, memory).mask_logits[-1]
        alone = dec.decode(q[1:2], pos[1:2], memory).mask_logits[-1]
    assert torch.allclose(together[1:2], alone, atol=1e-5)


def test_class_head_background_is_last_and_zero():
    dec, memory = _small_decoder()
    dec.class_embed.copy_(F.normalize(torch.randn_like(dec.class_embed), dim=-1))
    q, pos = dec.panoptic_queries()
    with torch.no_grad():
        out = dec.decode(q, pos, memory, with_class=True)
    assert out.class_logits.shape == (1, 4, 4)
    assert torch.all(out.class_logits[..., -1] == 0)
    assert out.class_logits[..., :-1].abs().max() <= math.exp(4.6052) + 1e-3  # cosine × 100
    assert out.iou.shape == (1, 4, 1)
    assert len(out.mask_logits) == 1 + 3


# -- deformable attention -------------------------------------------------------------------------


def _bilinear_zero_pad(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample (C, H, W) at continuous pixel coords (pixel centres at integers), zeros outside."""
    c, h, w = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(c)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            wgt = (1 - abs(x - xx)) * (1 - abs(y - yy))
            if 0 <= xx < w and 0 <= yy < h:
                out += wgt * img[:, yy, xx]
    return out


@torch.no_grad()
def test_deformable_attention_matches_a_loop_over_sampling_points():
    torch.manual_seed(0)
    dim, heads, levels, points = 8, 2, 2, 3
    msda = MultiScaleDeformableAttention(dim, heads, levels, points)
    for p in msda.parameters():
        p.data.normal_(0, 0.5)
    shapes = [(2, 3), (4, 5)]
    n = sum(h * w for h, w in shapes)
    query, pos = torch.randn(1, n, dim), torch.randn(1, n, dim)
    refs = torch.rand(n, 2)
    got = msda(query, pos, refs, shapes)

    q = query + pos
    value = msda.value_proj(query)[0].view(n, heads, dim // heads)
    offsets = msda.sampling_offsets(q)[0].view(n, heads, levels, points, 2)
    weights = msda.attention_weights(q)[0].view(n, heads, levels * points).softmax(-1).view(n, heads, levels, points)
    expected = torch.zeros(n, dim)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for i in range(n):
        head_out = []
        for hd in range(heads):
            acc = torch.zeros(dim // heads)
            for lv, (h, w) in enumerate(shapes):
                img = value[starts[lv] : starts[lv] + h * w, hd].T.reshape(-1, h, w)
                for pt in range(points):
                    lx = refs[i, 0] + offsets[i, hd, lv, pt, 0] / w
                    ly = refs[i, 1] + offsets[i, hd, lv, pt, 1] / h
                    s = _bilinear_zero_pad(img, float(lx * w - 0.5), float(ly * h - 0.5))
                    acc += weights[i, hd, lv, pt] * s
            head_out.append(acc)
        expected[i] = torch.cat(head_out)
    expected = query[0] + msda.output_proj(expected)
    assert torch.allclose(got[0], expected, atol=1e-4)


# -- perception prior -----------------------------------------------------------------------------


def test_bilinear_matrix_equals_interpolate():
    x = torch.randn(1, 1, 7, 1)
    for dst in (3, 7, 16):
        m = bilinear_matrix(7, dst)
        ref = F.interpolate(x, size=(dst, 1), mode="bilinear", align_corners=False)[0, 0, :, 0]
        assert torch.allclose(m @ x[0, 0, :, 0], ref, atol=1e-6)


def test_exact_prior_resize_equals_the_literal_official_steps():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 8) * 4
    scale = torch.rand(2, 5)
    for size, grid in [(32, (2, 2)), (32, (4, 4)), (24, (3, 3)), (32, (8, 8))]:
        assert torch.allclose(
            exact_prior_resize(logits, scale, size, grid), literal_prior_resize(logits, scale, size, grid), atol=1e-5
        )


def test_perception_prior_formula_by_hand():
    # Grid = mask size = input size: every resize is the identity, so P = (0.5 s + 0.5) σ(m).
    class_logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 5.0]]])  # 3 queries, bg last
    m = torch.tensor([[[[4.0, -4.0]], [[-4.0, 4.0]], [[0.0, 0.0]]]])  # (1, 3, 1, 2)
    feat = torch.arange(3 * 2, dtype=torch.float32).view(1, 3, 2)
    qpos = -torch.arange(3 * 2, dtype=torch.float32).view(1, 3, 2)
    # The input is square, so the 1×2 map is repeated into 2×2.
    m2 = m.expand(1, 3, 2, 2).contiguous()
    prior = perception_prior(class_logits, m2, feat, qpos, input_size=2, grid=(2, 2))
    s = torch.softmax(class_logits[0], -1)[:, :-1].max(-1).values
    p = (0.5 * s[:, None, None] + 0.5) * torch.sigmoid(m2[0])
    w = torch.softmax(p.flatten(1), dim=0)  # over queries
    q = torch.cat([feat[0], qpos[0]], -1)
    expected = w.T @ q
    assert torch.allclose(prior.pixel_prior[0], expected, atol=1e-5)
    winners = sorted(set(p.flatten(1).argmax(0).tolist()))
    assert prior.object_indices[0].tolist() == winners
    assert torch.equal(prior.object_tokens[0], q[winners])


def test_object_tokens_on_the_mask_grid_keep_an_object_between_token_centres():
    # 16×16 mask logits, 2×2 token grid over a 16-px input: token centres sit at pixels 3.5–4.5 and
    # 11.5–12.5. Query 0 is the table, query 1 a 3×3 object at rows/cols 6–8 (no token centre).
    m = torch.full((1, 3, 16, 16), -6.0)
    m[0, 0] = 6.0
    m[0, 0, 6:9, 6:9] = -6.0
    m[0, 1, 6:9, 6:9] = 6.0
    cls = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]]])
    f, p = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    on_tokens = perception_prior(cls, m, f, p, 16, (2, 2), object_grid="tokens")
    on_mask = perception_prior(cls, m, f, p, 16, (2, 2), object_grid="mask")
    assert on_tokens.object_indices[0].tolist() == [0]
    assert on_mask.object_indices[0].tolist() == [0, 1]
    assert torch.equal(on_mask.object_tokens[0], torch.cat([f, p], -1)[0, [0, 1]])
    assert torch.equal(on_mask.pixel_prior, on_tokens.pixel_prior)  # the selection changes nothing else
    with pytest.raises(ValueError, match="object_grid"):
        perception_prior(cls, m, f, p, 16, (2, 2), object_grid="pixels")


def test_merged_object_tokens_drop_a_duplicate_query_and_read_left_to_right():
    # 16×16 masks. Classes: two things, the table (stuff), no-object last.
    # q0 the table; q1 object A on the right; q2 a second query on A that wins its lower rows;
    # q3 object B on the left, its mask bleeding two columns beyond it; q4 empty.
    m = torch.full((1, 5, 16, 16), -6.0)
    m[0, 0] = 6.0
    m[0, 0, 5:10, 1:5] = m[0, 0, 5:10, 10:14] = -6.0
    m[0, 1, 5:10, 10:14] = 6.0
    m[0, 2, 5:10, 10:14] = 6.0
    m[0, 2, 8:10, 10:14] = 9.0
    m[0, 3, 5:10, 1:5] = 6.0
    m[0, 3, 5:10, 5:7] = 1.0
    cls = torch.tensor([[[0, 0, 6.0, 0], [6.0, 0, 0, 0], [5.9, 0, 0, 0], [0, 6.0, 0, 0], [0, 0, 0, 6.0]]])
    f, p = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    on_mask = perception_prior(cls, m, f, p, 16, (2, 2), object_grid="mask")
    assert on_mask.object_indices[0].tolist() == [0, 1, 2, 3]  # the duplicate wins pixels of its own
    merged = perception_prior(cls, m, f, p, 16, (2, 2), object_grid="merged", num_thing_classes=2)
    assert merged.object_indices[0].tolist() == [3, 1, 0]  # B (left), A (right), then the table
    assert torch.equal(merged.object_tokens[0], torch.cat([f, p], -1)[0, [3, 1, 0]])
    assert torch.equal(merged.pixel_prior, on_mask.pixel_prior)


def test_merged_selection_keeps_touching_objects_and_the_more_confident_duplicate():
    masks = torch.full((3, 8, 8), -5.0)
    masks[0, :, 0:4] = 5.0  # left object
    masks[1, :, 3:8] = 5.0  # right object, overlapping one column (IoU 1/8)
    masks[2, :, 3:8] = 5.0  # a duplicate of the right object
    masks[2, 0, 2] = 5.0
    labels = torch.tensor([0, 1, 1])
    confidence = torch.tensor([0.9, 0.6, 0.8])
    order = merged_selection(torch.arange(3), confidence, labels, masks, num_thing_classes=2)
    assert order.tolist() == [0, 2]  # the duplicate is more confident: it stands for the object
    assert merged_selection(torch.arange(0), confidence, labels, masks, 2).tolist() == []


def test_split_pieces_gives_each_separate_object_its_own_token():
    # Query 0: two squares alike far apart (one mask), plus a 2-cell speck. Query 1: an object whose
    # mask bleeds a 3×3 piece onto query 2's object. Query 3: the table (stuff), also in pieces.
    masks = torch.full((4, 32, 32), -5.0)
    masks[0, 2:8, 20:26] = 5.0  # right piece (36 cells)
    masks[0, 2:8, 2:8] = 4.0  # left piece (36 cells)
    masks[0, 30, 30:32] = 5.0  # speck: too small to be an object
    masks[1, 20:26, 10:16] = 5.0
    masks[1, 20:23, 28:31] = 5.0  # bleed onto query 2's object
    masks[2, 18:26, 26:32] = 5.0
    masks[3, 12:14, :] = 5.0
    masks[3, 28:30, :8] = 5.0
    labels = torch.tensor([0, 1, 0, 2])  # classes 0-1 things, 2 stuff
    index, logits = split_pieces(torch.tensor([0, 1, 2, 3]), labels, masks, num_thing_classes=2)
    assert index.tolist() == [0, 1, 0, 2, 3]  # left to right by piece centroid, then stuff
    left, right = logits[0] >= 0, logits[2] >= 0
    assert left.sum() == 36 + 2 and bool(left[2:8, 2:8].all())  # the speck stays with the largest piece
    assert right.sum() == 36 and bool(right[2:8, 20:26].all())
    assert float(logits[0, 2, 2]) == 4.0 and float(logits[0, 2, 20]) == OUTSIDE_PIECE_LOGIT
    assert torch.equal(logits[1], masks[1])  # the bleed is covered by query 2: not an object
    assert torch.equal(logits[4], masks[3])
    # Through perception_prior: the two pieces share the query's token, and "merged" keeps one.
    cls = torch.full((1, 4, 4), -4.0)
    for q, label in enumerate(labels.tolist()):
        cls[0, q, label] = 4.0
    f, p = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    split = perception_prior(cls, masks[None], f, p, 32, (4, 4), object_grid="split", num_thing_classes=2)
    merged = perception_prior(cls, masks[None], f, p, 32, (4, 4), object_grid="merged", num_thing_classes=2)
    assert split.object_indices[0].tolist() == [0, 1, 0, 2, 3]
    assert torch.equal(split.object_tokens[0][0], split.object_tokens[0][2])
    assert torch.equal(split.object_masks[0], logits)
    assert sorted(merged.object_indices[0].tolist()) == [0, 1, 2, 3]
    assert torch.equal(merged.object_masks[0], masks[merged.object_indices[0]])


def test_a_followed_object_keeps_its_own_piece_of_a_mask_covering_two():
    mask = np.zeros((40, 40), bool)
    mask[5:15, 5:15] = True  # the object followed, moved 2 px
    mask[5:15, 25:35] = True  # its twin, found by the same query
    previous = np.zeros_like(mask)
    previous[5:15, 3:13] = True
    kept = piece_followed(mask, previous)
    assert kept.sum() == 100 and kept[5:15, 5:15].all()
    away = np.zeros_like(mask)
    away[20:24, 30:34] = True  # overlaps neither: the nearest piece
    assert piece_followed(mask, away)[5:15, 25:35].all() and piece_followed(mask, away).sum() == 100
    single = mask.copy()
    single[5:15, 25:35] = False
    single[9, 15:25] = True  # one piece: unchanged
    assert np.array_equal(piece_followed(single, previous), single)


def test_prior_variants():
    torch.manual_seed(0)
    cls, m = torch.randn(1, 4, 3), torch.randn(1, 4, 4, 4)
    f, p = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    concat = perception_prior(cls, m, f, p, 4, (2, 2), variant="concat")
    additive = perception_prior(cls, m, f, p, 4, (2, 2), variant="additive")
    none = perception_prior(cls, m, f, p, 4, (2, 2), variant="none")
    assert not torch.allclose(concat.prob, additive.prob)  # additive: no smoothing of the score
    s = torch.softmax(cls, -1)[..., :-1].amax(-1)
    assert torch.allclose(additive.prob, literal_prior_resize(m, s, 4, (2, 2)), atol=1e-5)
    assert torch.all(none.pixel_prior == 0) and none.pixel_prior.shape == concat.pixel_prior.shape


# -- prompts --------------------------------------------------------------------------------------


def test_point_becomes_a_plus_minus_3px_box():
    pos = point_query_position(torch.tensor([[100.0, 50.0]]), 1024, 3.0)
    assert torch.allclose(pos[0], torch.tensor([100 / 1024, 50 / 1024, 6 / 1024, 6 / 1024]), atol=1e-6)


def test_interior_point_is_the_most_interior_pixel():
    mask = np.zeros((40, 60), bool)
    mask[5:35, 5:15] = True  # thin vertical bar
    mask[10:30, 20:56] = True  # thick block: its middle is most interior
    x, y = interior_point(mask)
    # Brute force: distance from each mask pixel to the nearest outside pixel (canvas border counts).
    padded = np.pad(mask, 1)
    oy, ox = np.nonzero(~padded)

    def dist(px, py):
        return np.sqrt((ox - (px + 1)) ** 2 + (oy - (py + 1)) ** 2).min()

    best = max(dist(px, py) for py, px in zip(*np.nonzero(mask), strict=True))
    assert mask[int(y), int(x)] and 20 <= x < 56
    assert dist(int(x), int(y)) >= best - 0.5


# -- preprocessing and the way back ---------------------------------------------------------------


def test_letterbox_geometry_by_hand():
    box = Letterbox.for_image(100, 300, 600)  # wide image: padded above and below
    assert (box.side, box.top, box.left) == (300, 100, 0)
    assert np.allclose(box.points_to_model([[30, 10]]), [[60, 220]])
    logits = torch.full((1, 150, 150), -1.0)  # model-space logits at stride 4
    logits[0, 50:100, :] = 1.0  # exactly the image rows (100..200 of 300 → 50..100 of 150)
    back = box.logits_to_image(logits)
    assert back.shape == (1, 100, 300)
    assert (back[0, 2:-2] > 0).all()


def test_preprocessing_pads_with_the_mean_colour_and_normalises():
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.5, 0.5)
    pre = ImagePreprocessor(8, mean, std)
    image = np.full((4, 8, 3), 255, np.uint8)
    tensor, box = pre(image)
    assert tensor.shape == (1, 3, 8, 8) and box.top == 2
    fill = np.array([int(255 * m) for m in mean]) / 255.0
    expected_pad = (fill - np.array(mean)) / np.array(std)
    assert np.allclose(tensor[0, :, 0, 0].numpy(), expected_pad, atol=1e-5)
    assert np.allclose(tensor[0, :, 4, 4].numpy(), (1 - np.array(mean)) / np.array(std), atol=1e-5)
