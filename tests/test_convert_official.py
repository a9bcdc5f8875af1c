"""The official-weights converter, on synthetic checkpoints with the official names, nesting and packing.

The files are built here at small sizes the way the released ones are laid out
(official_checkpoint_keys.md): InternLM2 base shards with a packed grouped-query `wqkv`, a peft
finetune checkpoint with LoRA pairs, `{"state_dict": …}` for OMG-Seg, an open_clip state dict and a
bare class-embedding tensor. The converted LLM is checked against an InternLM2 forward written here
in the official layout (packed wqkv split by the official rearrange, LoRA applied at run time).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from omg_llava_ros import OmgLlava
from omg_llava_ros.convert import ConversionError, ConvertOptions, OfficialFiles, convert_official
from omg_llava_ros.convert.files import StreamingSafetensorsWriter, TensorSpec
from omg_llava_ros.convert.internlm2 import InternLM2Config
from omg_llava_ros.convert.official import CLIP, DECODER_COPY, LLAVA, LLM, OMG_SEG, expected_official_shapes
from omg_llava_ros.model.config import OmgLlavaConfig, official_7b, tiny
from omg_llava_ros.model.omg_decoder import OmgDecoder

spm = pytest.importorskip("sentencepiece", reason="the tokenizer conversion needs sentencepiece")

P = "llm.base_model.model."
EMBED, HEAD = P + "model.tok_embeddings.weight", P + "output.base_layer.weight"
TARGETS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")
RANK, ALPHA = 8, 16.0
SCALING = ALPHA / RANK
CORPUS = [
    "Please segment the red circle.",
    "Describe the image with segmentation masks.",
    "What is on the table? two objects: a blue star and an orange cross.",
    "How many squares are there? three.",
    "Is there a purple triangle? yes.",
    "Pick up the small yellow object left of the large green square.",
    "The quick brown fox jumps over the lazy dog.",
]
LM = {  # an InternLM2 config.json at small size (GQA: 4 heads share 2 KV heads)
    "architectures": ["InternLM2ForCausalLM"],
    "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
    "model_type": "internlm2",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "max_position_embeddings": 256,
    "bias": False,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}


# -- synthetic official files -----------------------------------------------------------------------
def _sentencepiece_model(path: Path) -> int:
    """A byte-fallback BPE model like InternLM2's, with two placeholder pieces at the end that
    tokenizer_config.json renames to <|im_end|> / <|im_start|>. Returns the piece count."""
    from sentencepiece import sentencepiece_model_pb2

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=buf,
        model_type="bpe",
        vocab_size=380,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    for name in ("[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = name, 0.0, 4
    path.write_bytes(proto.SerializeToString())
    return len(proto.pieces)


def _tokenizer_config(n: int) -> dict:
    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "rstrip": False, "normalized": False, "special": True}

    return {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "added_tokens_decoder": {
            "0": entry("<unk>"),
            "1": entry("<s>"),
            "2": entry("</s>"),
            str(n - 2): entry("<|im_end|>"),
            str(n - 1): entry("<|im_start|>"),
        },
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
    }


def _randn(*shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape) * scale


def _base_llm(vocab: int) -> dict[str, torch.Tensor]:
    h, i, nh, nkv = LM["hidden_size"], LM["intermediate_size"], LM["num_attention_heads"], LM["num_key_value_heads"]
    d = h // nh
    sd = {"model.tok_embeddings.weight": _randn(vocab, h)}
    for n in range(LM["num_hidden_layers"]):
        p = f"model.layers.{n}."
        sd[p + "attention.wqkv.weight"] = _randn((nh + 2 * nkv) * d, h)
        sd[p + "attention.wo.weight"] = _randn(h, h)
        sd[p + "feed_forward.w1.weight"] = _randn(i, h)
        sd[p + "feed_forward.w3.weight"] = _randn(i, h)
        sd[p + "feed_forward.w2.weight"] = _randn(h, i)
        sd[p + "attention_norm.weight"] = 1 + _randn(h, scale=0.1)
        sd[p + "ffn_norm.weight"] = 1 + _randn(h, scale=0.1)
    sd["model.norm.weight"] = 1 + _randn(h, scale=0.1)
    sd["output.weight"] = _randn(vocab, h)
    return sd


def _finetune(base: dict[str, torch.Tensor], rows: int, cfg: OmgLlavaConfig) -> dict[str, torch.Tensor]:
    """omg_llava_7b_finetune_8gpus.pth at small size: peft names, trained (non-zero) LoRA B."""
    h = LM["hidden_size"]
    sd = {EMBED: _randn(rows, h), HEAD: _randn(rows, h)}
    for n in range(LM["num_hidden_layers"]):
        for t in TARGETS:
            out_f, in_f = base[f"model.layers.{n}.{t}.weight"].shape
            sd[f"{P}model.layers.{n}.{t}.lora_A.default.weight"] = _randn(RANK, in_f)
            sd[f"{P}model.layers.{n}.{t}.lora_B.default.weight"] = _randn(out_f, RANK)
    sd[P + "output.lora_A.default.weight"] = _randn(RANK, h)
    sd[P + "output.lora_B.default.weight"] = _randn(rows, RANK)
    q, feat = 2 * cfg.decoder.hidden_dim, 4 * cfg.image_encoder.dims[-1]
    for name, shape in {
        "query_proj.weight": (feat, q),
        "query_proj.bias": (feat,),
        "model.0.weight": (h, feat),
        "model.0.bias": (h,),
        "model.2.weight": (h, h),
        "model.2.bias": (h,),
        "model_feat.0.weight": (h, feat + q),
        "model_feat.0.bias": (h,),
        "model_feat.2.weight": (h, h),
        "model_feat.2.bias": (h,),
        "seperate_embed.weight": (1, h),
    }.items():
        sd["projector.model." + name] = _randn(*shape)
    for name, shape in {"0.weight": (q, h), "0.bias": (q,), "2.weight": (q, q), "2.bias": (q,)}.items():
        sd["projector_text2vision.model." + name] = _randn(*shape)
    return sd


def _omg_seg(cfg: OmgLlavaConfig) -> dict[str, torch.Tensor]:
    dec = OmgDecoder(cfg.decoder, cfg.image_encoder.dims)
    return {"panoptic_head." + k: _randn(*v.shape) for k, v in dec.state_dict().items() if k != "class_embed"}


def _decoder_copy(omg_seg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 170-tensor (at 7B) trainable copy of finetuned_refseg.pth, with its own values."""
    out = {}
    for k, v in omg_seg.items():
        for mine in ("transformer_decoder.", "mask_embed."):
            if k.startswith("panoptic_head." + mine):
                new = "visual_encoder.panoptic_head." + mine[:-1] + "_llm." + k[len("panoptic_head." + mine) :]
                out[new] = _randn(*v.shape)
    return out


def _open_clip(cfg: OmgLlavaConfig) -> dict[str, torch.Tensor]:
    """open_clip's CLIP state dict: the timm trunk under visual.trunk, plus heads and a text tower."""
    from timm.models.convnext import ConvNeXt

    enc = cfg.image_encoder
    trunk = ConvNeXt(depths=enc.depths, dims=enc.dims, num_classes=0)
    sd = {"visual.trunk." + k: _randn(*v.shape) for k, v in trunk.state_dict().items()}
    w, c = enc.dims[-1], cfg.decoder.clip_dim
    sd.update(
        {
            "visual.head.mlp.fc1.weight": _randn(2 * c, w),
            "visual.head.mlp.fc1.bias": _randn(2 * c),
            "visual.head.mlp.fc2.weight": _randn(c, 2 * c),
            "token_embedding.weight": _randn(100, c),
            "positional_embedding": _randn(77, c),
            "transformer.resblocks.0.attn.in_proj_weight": _randn(3 * c, c),
            "ln_final.weight": _randn(c),
            "text_projection": _randn(c, c),
            "logit_scale": torch.tensor(4.6),
        }
    )
    return sd


@dataclass
class Official:
    root: Path
    files: OfficialFiles
    cfg: OmgLlavaConfig
    base: dict[str, torch.Tensor]
    llava: dict[str, torch.Tensor]
    omg_seg: dict[str, torch.Tensor]
    clip: dict[str, torch.Tensor]
    class_embeds: torch.Tensor
    refseg: Path
    copy: dict[str, torch.Tensor]
    n_pieces: int

    def files_with(self, **changes) -> OfficialFiles:
        return OfficialFiles(**{**vars(self.files), **changes})


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Official:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("official")
    cfg = tiny()
    llm_dir = root / "internlm2-chat-7b"
    llm_dir.mkdir()
    n = _sentencepiece_model(llm_dir / "tokenizer.model")
    (llm_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(n)))
    (llm_dir / "config.json").write_text(json.dumps({**LM, "vocab_size": n}))
    base = _base_llm(n)
    # Two pytorch_model-*.bin shards, as the release has.
    keys = list(base)
    half = len(keys) // 2
    index = {}
    for s, part in enumerate((keys[:half], keys[half:])):
        name = f"pytorch_model-0000{s + 1}-of-00002.bin"
        torch.save({k: base[k] for k in part}, llm_dir / name)
        index.update({k: name for k in part})
    (llm_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": index}))

    llava = _finetune(base, n + 4, cfg)
    torch.save(llava, root / "omg_llava_7b_finetune_8gpus.pth")
    omg_seg = _omg_seg(cfg)
    torch.save({"state_dict": omg_seg, "meta": {"epoch": 12, "mmdet_version": "3.1.0"}}, root / "omg_seg_convl.pth")
    copy_sd = _decoder_copy(omg_seg)
    torch.save({**llava, **copy_sd}, root / "finetuned_refseg.pth")
    clip = _open_clip(cfg)
    torch.save(clip, root / "open_clip_pytorch_model.bin")
    dec = cfg.decoder
    class_embeds = torch.nn.functional.normalize(
        torch.randn(dec.num_classes, dec.num_class_templates, dec.clip_dim), dim=-1
    )
    torch.save(class_embeds, root / "convnext_large_d_320_CocoPanopticOVDataset.pth")
    files = OfficialFiles(
        omg_seg=root / "omg_seg_convl.pth",
        llava=root / "omg_llava_7b_finetune_8gpus.pth",
        llm=llm_dir,
        clip=root / "open_clip_pytorch_model.bin",
        class_embeds=root / "convnext_large_d_320_CocoPanopticOVDataset.pth",
    )
    return Official(
        root, files, cfg, base, llava, omg_seg, clip, class_embeds, root / "finetuned_refseg.pth", copy_sd, n
    )


def _options(official: Official, **kw) -> ConvertOptions:
    return ConvertOptions(
        dtype=kw.pop("dtype", torch.float32), lora_alpha=ALPHA, base_config=copy.deepcopy(official.cfg), **kw
    )


@pytest.fixture(scope="module")
def merged(official, tmp_path_factory) -> tuple[Path, OmgLlava]:
    out = tmp_path_factory.mktemp("converted") / "merged"
    # A small shard limit, so the LLM is written as several shards with an index.
    convert_official(official.files, out, _options(official, max_shard_bytes=120_000))
    return out, OmgLlava.from_pretrained(out)


# -- the official layout, computed directly ---------------------------------------------------------
def internlm2_reference_logits(base: dict, ft: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2 as the official model runs it: packed wqkv rearranged "(h gs d)", LoRA on every
    linear and the head at run time, the fine-tuned embedding and head base."""
    h, nh, nkv = LM["hidden_size"], LM["num_attention_heads"], LM["num_key_value_heads"]
    d, g, eps = h // nh, nh // nkv, LM["rms_norm_eps"]

    def lin(x, module, weight=None):
        w = base[module + ".weight"] if weight is None else weight
        a, b = ft[f"{P}{module}.lora_A.default.weight"], ft[f"{P}{module}.lora_B.default.weight"]
        return x @ w.T + SCALING * (x @ a.T) @ b.T

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rotate_half(t):
        return torch.cat([-t[..., d // 2 :], t[..., : d // 2]], dim=-1)

    t = len(ids)
    inv = 1.0 / (LM["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    cos, sin = (f(torch.cat([freqs, freqs], -1)).float()[:, None] for f in (torch.cos, torch.sin))
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = ft[EMBED][ids]
    for n in range(LM["num_hidden_layers"]):
        p = f"model.layers.{n}."
        qkv = lin(rms(x, base[p + "attention_norm.weight"]), p + "attention.wqkv").view(t, nkv, g + 2, d)
        q, k, v = qkv[:, :, :g].reshape(t, nh, d), qkv[:, :, -2], qkv[:, :, -1]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # query head j uses KV head j // g
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + lin(torch.einsum("hqk,khd->qhd", att, v).reshape(t, h), p + "attention.wo")
        y = rms(x, base[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(lin(y, p + "feed_forward.w1"))
        x = x + lin(gate * lin(y, p + "feed_forward.w3"), p + "feed_forward.w2")
    return lin(rms(x, base["model.norm.weight"]), "output", weight=ft[HEAD])


def _ids(official: Official) -> torch.Tensor:
    n = official.n_pieces
    return torch.tensor([1, n - 1, 17, 250, 31, 300, n + 0, n + 1, 42, n + 3, 99, n - 2])


def _force(model: OmgLlava, answer: str):
    """A logits processor that makes the model answer `answer`, then stop."""
    target = model.tokenizer.encode(answer, add_special_tokens=False) + [model.tokens.im_end]

    def force(generated, logits):
        out = torch.full_like(logits, -1e9)
        out[target[min(len(generated), len(target) - 1)]] = 0
        return out

    return force


def _llm_logits(model: OmgLlava, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.llm(input_ids=ids[None]).logits[0].float()


# -- tests ----------------------------------------------------------------------------------------
def test_official_key_sets_at_7b_match_the_reference_listing():
    """At the released sizes (built on the meta device) the converter expects exactly the listed tensors."""
    cfg = official_7b()
    cfg.decoder.llm_decoder_copy = True
    lm = InternLM2Config(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=92544,
    )
    shapes = expected_official_shapes(cfg, lm)
    listing = json.loads((Path(__file__).parent / "data" / "official_keys.json").read_text())
    assert {k: list(v) for k, v in shapes[OMG_SEG].items()} == listing["omg_seg_convl"]

    finetune = {EMBED: [92548, 4096], HEAD: [92548, 4096]}
    dims = {"attention.wqkv": (6144, 4096), "attention.wo": (4096, 4096), "feed_forward.w1": (14336, 4096)}
    dims |= {"feed_forward.w3": (14336, 4096), "feed_forward.w2": (4096, 14336)}
    for i in range(32):
        for t, (out_f, in_f) in dims.items():
            finetune[f"{P}model.layers.{i}.{t}.lora_A.default.weight"] = [512, in_f]
            finetune[f"{P}model.layers.{i}.{t}.lora_B.default.weight"] = [out_f, 512]
    finetune[P + "output.lora_A.default.weight"] = [512, 4096]
    finetune[P + "output.lora_B.default.weight"] = [92548, 512]
    finetune |= listing["projectors"]
    assert len(finetune) == 339
    assert {k: list(v) for k, v in shapes[LLAVA].items()} == finetune

    copy_keys = {k: list(v) for k, v in shapes[DECODER_COPY].items()}
    assert len(copy_keys) == 170
    for k, v in listing["omg_seg_convl"].items():
        for part in ("transformer_decoder.", "mask_embed."):
            if k.startswith("panoptic_head." + part):
                llm_key = "visual_encoder.panoptic_head." + part[:-1] + "_llm." + k[len("panoptic_head." + part) :]
                assert copy_keys[llm_key] == v
    assert len(shapes[LLM]) == 227
    assert shapes[LLM]["model.layers.31.attention.wqkv.weight"] == (6144, 4096)
    assert shapes[CLIP]["visual.trunk.stem.0.weight"] == (192, 3, 4, 4)
    assert shapes[CLIP]["visual.trunk.stages.3.blocks.2.mlp.fc2.weight"] == (1536, 6144)
    assert len([k for k in shapes[CLIP] if k.startswith("visual.trunk.stages.2.blocks.")]) == 27 * 9


def test_converted_llm_equals_the_official_layout_with_runtime_lora(official, merged):
    out, model = merged
    ids = _ids(official)
    ref = internlm2_reference_logits(official.base, official.llava, ids)
    torch.testing.assert_close(_llm_logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    # The merge matters: without LoRA the logits are clearly different.
    plain = {**official.llava}
    for k in plain:
        if "lora_B" in k:
            plain[k] = torch.zeros_like(plain[k])
    assert (internlm2_reference_logits(official.base, plain, ids) - ref).abs().max() > 0.1
    # Written as Hugging Face shards with an index, no pickles anywhere.
    assert (out / "llm" / "model.safetensors.index.json").is_file()
    assert len(list((out / "llm").glob("model-*-of-*.safetensors"))) > 1
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pth"))
    assert model.llm.config.model_type == "llama" and model.llm.config.num_key_value_heads == 2


def test_tokenizer_is_native_with_the_official_special_ids(official, merged):
    from transformers import AutoTokenizer

    out, model = merged
    n = official.n_pieces
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")  # no remote code
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("[SEG]", "<p>", "</p>", "<region>", "<mark>")}
    assert ids == {"[SEG]": n, "<p>": n + 1, "</p>": n + 2, "<region>": n + 3, "<mark>": n + 4}
    assert tok.convert_tokens_to_ids("<|im_start|>") == n - 1 and tok.convert_tokens_to_ids("<|im_end|>") == n - 2
    assert model.llm.get_input_embeddings().weight.shape[0] == n + 4  # <mark> has no row
    sp = spm.SentencePieceProcessor(model_file=str(official.files.llm / "tokenizer.model"))
    for text in [*CORPUS, "émoji 🤖 and 日本語", "  two  spaces", "a\nb"]:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("hi")[0] == 1  # BOS, as InternLM2 adds it
    assert tok.encode("<|im_start|>user\n[SEG]<|im_end|>", add_special_tokens=False)[0] == n - 1
    assert n in tok.encode("<|im_start|>user\n[SEG]<|im_end|>", add_special_tokens=False)


def test_vision_tensors_land_in_their_places(official, merged):
    out, model = merged
    seg, clip, llava = official.omg_seg, official.clip, official.llava
    dec, enc = model.omg_decoder, model.image_encoder
    pairs = [
        (enc.stem[0].weight, clip["visual.trunk.stem.0.weight"]),
        (enc.stages[1].downsample[1].weight, clip["visual.trunk.stages.1.downsample.1.weight"]),
        (enc.stages[2].blocks[0].gamma, clip["visual.trunk.stages.2.blocks.0.gamma"]),
        (enc.stages[3].blocks[0].mlp.fc2.bias, clip["visual.trunk.stages.3.blocks.0.mlp.fc2.bias"]),
        (dec.pixel_decoder.input_convs[0].conv.weight, seg["panoptic_head.pixel_decoder.input_convs.0.conv.weight"]),
        (
            dec.transformer_decoder.layers[1].cross_attn.attn.in_proj_weight,
            seg["panoptic_head.transformer_decoder.layers.1.cross_attn.attn.in_proj_weight"],
        ),
        (dec.transformer_decoder.post_norm.bias, seg["panoptic_head.transformer_decoder.post_norm.bias"]),
        (dec.query_feat.weight, seg["panoptic_head.query_feat.weight"]),
        (dec.mask_embed[4].weight, seg["panoptic_head.mask_embed.4.weight"]),
        (dec.pos_linear.weight, seg["panoptic_head.pos_linear.weight"]),
        (dec.class_embed, official.class_embeds),
        (model.visual_projector.query_proj.weight, llava["projector.model.query_proj.weight"]),
        (model.visual_projector.model[2].bias, llava["projector.model.model.2.bias"]),
        (model.visual_projector.model_feat[0].weight, llava["projector.model.model_feat.0.weight"]),
        (model.visual_projector.seperate_embed.weight, llava["projector.model.seperate_embed.weight"]),
        (model.text_projector.model[2].weight, llava["projector_text2vision.model.2.weight"]),
    ]
    for ours, theirs in pairs:
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    # Every official vision tensor, not only those: the state dict holds them all, unchanged.
    sd = model.state_dict()
    for k, v in seg.items():
        assert torch.equal(sd["omg_decoder." + k[len("panoptic_head.") :]], v)
    assert not model.config.decoder.llm_decoder_copy and not hasattr(dec, "transformer_decoder_llm")
    # End to end with the converted tokenizer: the prompt carries BOS, <|im_start|> and the image
    # placeholder; a generated [SEG] becomes a mask.
    n = official.n_pieces
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    res = model.chat(image, "Please segment it.", logits_processor=_force(model, "<p> red </p> [SEG]."))
    assert len(res.segments) == 1 and res.segments[0].phrase == "red" and res.segments[0].mask.shape == (96, 128)
    ids = model.conversation_ids(res.history.turns)
    assert ids[:2] == [1, n - 1] and ids.count(-200) == 1 and ids.count(n) == 1 and n - 2 in model.tokens.stop_ids


def test_refseg_checkpoint_brings_its_decoder_copy_and_keep_lora_matches(official, tmp_path):
    """finetuned_refseg.pth: the decoder copy becomes the [SEG] decoder; the LoRA kept as a peft adapter
    (base weights as safetensors this time) gives the same logits as the official computation."""
    from safetensors.torch import save_file

    llm_dir = tmp_path / "internlm2-safetensors"
    llm_dir.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        (llm_dir / name).write_bytes((official.files.llm / name).read_bytes())
    save_file({k: v.contiguous() for k, v in official.base.items()}, llm_dir / "model.safetensors")
    peft = pytest.importorskip("peft", reason="--keep-lora needs peft")
    out = tmp_path / "refseg"
    files = official.files_with(llava=official.refseg, llm=llm_dir)
    convert_official(files, out, _options(official, keep_lora=True))
    adapter = json.loads((out / "llm" / "adapter_config.json").read_text())
    assert adapter["r"] == RANK and adapter["lora_alpha"] == ALPHA and "lm_head" in adapter["target_modules"]

    model = OmgLlava.from_pretrained(out)
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.llm.modules())
    ids = _ids(official)
    ref = internlm2_reference_logits(official.base, official.llava, ids)
    torch.testing.assert_close(_llm_logits(model, ids), ref, rtol=1e-4, atol=1e-4)

    dec = model.omg_decoder
    assert model.config.decoder.llm_decoder_copy
    # A [SEG] from the chat is decoded by the copy; perception keeps the frozen decoder.
    image = np.random.default_rng(1).integers(0, 255, (80, 112, 3), dtype=np.uint8)
    res = model.chat(image, "Please segment it.", logits_processor=_force(model, "<p> it </p> [SEG]."))
    state = model.set_image(image)
    q = res.segments[0].query[None]
    with torch.no_grad():
        by_copy = dec.decode(q[:, None, 0], q[:, None, 1], state.memory, seg_decoder=True).mask_logits[-1]
        by_frozen = dec.decode(q[:, None, 0], q[:, None, 1], state.memory).mask_logits[-1]
    assert np.array_equal(res.segments[0].mask, (state.letterbox.logits_to_image(by_copy[:, 0])[0] > 0).numpy())
    assert not torch.allclose(by_copy, by_frozen)
    prefix = "visual_encoder.panoptic_head."
    assert torch.equal(
        dec.transformer_decoder_llm.layers[0].self_attn.attn.in_proj_weight,
        official.copy[prefix + "transformer_decoder_llm.layers.0.self_attn.attn.in_proj_weight"],
    )
    assert torch.equal(dec.mask_embed_llm[4].bias, official.copy[prefix + "mask_embed_llm.4.bias"])
    assert torch.equal(
        dec.transformer_decoder.layers[0].self_attn.attn.in_proj_weight,
        official.omg_seg["panoptic_head.transformer_decoder.layers.0.self_attn.attn.in_proj_weight"],
    )


def test_decoder_copy_decodes_only_seg_queries():
    cfg = tiny().decoder
    cfg.llm_decoder_copy = True
    torch.manual_seed(0)
    dec = OmgDecoder(cfg, tiny().image_encoder.dims).eval()
    dec.transformer_decoder_llm.load_state_dict(dec.transformer_decoder.state_dict())
    dec.mask_embed_llm.load_state_dict(dec.mask_embed.state_dict())
    feats = [torch.randn(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(tiny().image_encoder.dims)]
    q, pos = torch.randn(3, 1, cfg.hidden_dim), torch.randn(3, 1, cfg.hidden_dim)
    with torch.no_grad():
        memory = dec.encode_memory(feats)
        plain = dec.decode(q, pos, memory).mask_logits[-1]
        assert torch.equal(dec.decode(q, pos, memory, seg_decoder=True).mask_logits[-1], plain)  # an exact copy
        dec.mask_embed_llm[4].bias.add_(1.0)
        dec.transformer_decoder_llm.layers[0].ffn.layers[1].bias.add_(0.5)
        assert not torch.allclose(dec.decode(q, pos, memory, seg_decoder=True).mask_logits[-1], plain)
        assert torch.equal(dec.decode(q, pos, memory).mask_logits[-1], plain)  # perception unchanged


def test_cli_converts_with_a_separate_decoder_copy_in_bf16(official, tmp_path):
    from omg_llava_ros.cli import main

    f = official.files
    out = tmp_path / "cli"
    # The tiny preset's vision sizes are those of the synthetic files.
    argv = ["convert-official", "--omg-seg", str(f.omg_seg), "--llava", str(f.llava), "--llm", str(f.llm)]
    argv += ["--clip", str(f.clip), "--class-embeds", str(f.class_embeds), "--out", str(out)]
    argv += ["--decoder-copy", str(official.refseg), "--dtype", "bf16", "--lora-alpha", str(ALPHA), "--config", "tiny"]
    assert main(argv) == 0
    from safetensors import safe_open

    with safe_open(str(out / "llm" / "model.safetensors"), framework="pt") as fh:
        assert fh.get_slice("lm_head.weight").get_dtype() == "BF16"
    model = OmgLlava.from_pretrained(out)
    assert model.config.decoder.llm_decoder_copy
    assert torch.equal(
        model.omg_decoder.mask_embed_llm[0].weight,
        official.copy["visual_encoder.panoptic_head.mask_embed_llm.0.weight"],
    )
    ids = _ids(official)
    ref = internlm2_reference_logits(official.base, official.llava, ids)
    assert (_llm_logits(model, ids) - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 rounding only


def test_missing_and_unmapped_keys_fail_listing_them(official, tmp_path):
    llava = dict(official.llava)
    gone = f"{P}model.layers.1.feed_forward.w3.lora_B.default.weight"
    del llava[gone]
    llava[P + "model.layers.0.attention.wqkv.lora_C.default.weight"] = torch.zeros(RANK, 64)
    torch.save(llava, tmp_path / "llava.pth")
    seg = {k: v for k, v in official.omg_seg.items() if k != "panoptic_head.level_embed.weight"}
    seg["panoptic_head.cls_embed.weight"] = torch.zeros(7, 64)
    torch.save({"state_dict": seg}, tmp_path / "seg.pth")
    clip = dict(official.clip)
    clip["visual.trunk.stages.0.blocks.0.gamma"] = torch.zeros(3)
    torch.save(clip, tmp_path / "clip.pth")
    files = official.files_with(llava=tmp_path / "llava.pth", omg_seg=tmp_path / "seg.pth", clip=tmp_path / "clip.pth")
    with pytest.raises(ConversionError) as err:
        convert_official(files, tmp_path / "out", _options(official))
    msg = str(err.value)
    for expected in (
        gone,
        "lora_C",
        "panoptic_head.level_embed.weight",
        "panoptic_head.cls_embed.weight",
        "visual.trunk.stages.0.blocks.0.gamma [3]",
        "--llava",
        "--omg-seg",
        "--clip",
    ):
        assert expected in msg
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_file_that_needs_pickle_is_refused(official, tmp_path):
    torch.save(
        {"state_dict": official.omg_seg, "meta": {"cfg": OfficialFiles(Path("a"), *[Path("b")] * 4)}},
        tmp_path / "x.pth",
    )
    with pytest.raises(ConversionError, match="refusing .*x.pth"):
        convert_official(official.files_with(omg_seg=tmp_path / "x.pth"), tmp_path / "out", _options(official))


def test_tiny_extras_are_ignored_with_a_log_line_larger_ones_fail(official, tmp_path, caplog):
    llava = dict(official.llava)
    llava["llm.base_model.model.step_counter"] = torch.tensor(3)
    llava["llm.base_model.model.model.layers.0.attention.wqkv.lora_magnitude"] = torch.zeros(64)
    torch.save(llava, tmp_path / "llava.pth")
    with caplog.at_level(logging.INFO, logger="omg_llava_ros.convert"):
        convert_official(official.files_with(llava=tmp_path / "llava.pth"), tmp_path / "out", _options(official))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "ignoring extra tiny tensor llm.base_model.model.step_counter" in logged
    assert "lora_magnitude" in logged
    assert OmgLlava.from_pretrained(tmp_path / "out").config.language_model.num_hidden_layers == 2

    llava["llm.base_model.model.big_extra"] = torch.zeros(65)
    torch.save(llava, tmp_path / "llava2.pth")
    with pytest.raises(ConversionError, match="big_extra"):
        convert_official(official.files_with(llava=tmp_path / "llava2.pth"), tmp_path / "out2", _options(official))


def test_tokenizer_and_checkpoint_of_different_vocabularies_are_refused(official, tmp_path):
    llava = dict(official.llava)
    for k in (EMBED, HEAD):
        llava[k] = llava[k][:-1]
    llava[P + "output.lora_B.default.weight"] = llava[P + "output.lora_B.default.weight"][:-1]
    torch.save(llava, tmp_path / "llava.pth")
    with pytest.raises(ConversionError, match="do not belong together"):
        convert_official(official.files_with(llava=tmp_path / "llava.pth"), tmp_path / "out", _options(official))


def test_streaming_safetensors_writer_round_trips(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).view(2, 3)}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = StreamingSafetensorsWriter(tmp_path / "x.safetensors", specs)
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    writer = StreamingSafetensorsWriter(tmp_path / "y.safetensors", specs)
    with pytest.raises(ValueError, match="expected a"):
        writer.write("b", tensors["b"])
