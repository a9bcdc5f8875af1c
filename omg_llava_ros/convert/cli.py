"""`omg-llava-ros convert-official`: the released files → a model directory for `OmgLlava.from_pretrained`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Resolved to torch dtypes only when the command runs (the parser is built for every command).
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_convert_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert-official",
        help="convert the released OMG-LLaVA weights (no remote code) into a model directory",
        description=(
            "Reads the official files with torch.load(weights_only=True) only, converts InternLM2 to the "
            "transformers Llama layout, merges the LoRA (or keeps it as a peft adapter) and writes "
            "config.json, model.safetensors, llm/ (sharded safetensors) and tokenizer/ to --out."
        ),
    )
    p.add_argument("--omg-seg", required=True, type=Path, help="omg_seg_convl.pth")
    p.add_argument(
        "--llava",
        required=True,
        type=Path,
        help="omg_llava_7b_finetune_8gpus.pth (or finetuned_refseg.pth / finetuned_gcg.pth, with their decoder copy)",
    )
    p.add_argument("--llm", required=True, type=Path, help="the internlm2-chat-7b folder (config, weights, tokenizer)")
    p.add_argument(
        "--clip",
        required=True,
        type=Path,
        help="open_clip convnext_large_d_320 laion2b_s29b_b131k_ft_soup weights (open_clip_pytorch_model.bin "
        "or open_clip_model.safetensors)",
    )
    p.add_argument("--class-embeds", required=True, type=Path, help="convnext_large_d_320_CocoPanopticOVDataset.pth")
    p.add_argument("--out", required=True, type=Path, help="output directory (created; must be empty)")
    p.add_argument(
        "--decoder-copy",
        type=Path,
        default=None,
        help="take the [SEG] decoder copy (transformer_decoder_llm, mask_embed_llm) from this file, e.g. "
        "finetuned_refseg.pth, when --llava does not hold one",
    )
    p.add_argument("--keep-lora", action="store_true", help="keep the LoRA as a peft adapter in llm/ (needs peft)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="LLM weight dtype (vision stays fp32)")
    p.add_argument("--lora-alpha", type=float, default=256.0, help="LoRA alpha (official: 256 with r = 512)")
    p.add_argument("--max-shard-size", default="2GB", help="largest LLM safetensors shard (e.g. 2GB, 500MB)")
    p.add_argument("--config", default="official-7b", help="preset whose non-weight settings the model keeps")
    p.set_defaults(func=cmd_convert_official)
    return p


def cmd_convert_official(args: argparse.Namespace) -> int:
    import torch

    from omg_llava_ros.convert.files import ConversionError, parse_size
    from omg_llava_ros.convert.official import ConvertOptions, OfficialFiles, convert_official

    logging.getLogger("omg_llava_ros.convert").setLevel(logging.INFO)
    if args.keep_lora:
        try:
            import peft  # noqa: F401
        except ImportError:
            log.warning("--keep-lora: peft is not installed here; loading the adapter will need it")
    files = OfficialFiles(
        omg_seg=args.omg_seg,
        llava=args.llava,
        llm=args.llm,
        clip=args.clip,
        class_embeds=args.class_embeds,
        decoder_copy=args.decoder_copy,
    )
    options = ConvertOptions(
        keep_lora=args.keep_lora,
        dtype=getattr(torch, DTYPES[args.dtype]),
        lora_alpha=args.lora_alpha,
        max_shard_bytes=parse_size(args.max_shard_size),
        base_config=args.config,
    )
    try:
        out = convert_official(files, args.out, options)
    except ConversionError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {out}; load it with OmgLlava.from_pretrained({str(out)!r})")
    return 0
