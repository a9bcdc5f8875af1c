"""InternLM2's sentencepiece tokenizer → a transformers fast tokenizer that needs no remote code.

The result reproduces `InternLM2TokenizerFast` (the class `AutoTokenizer(trust_remote_code=True)`
picks for internlm2-chat-7b): a byte-fallback BPE over the sentencepiece pieces with merges ordered by
piece score, `▁` prepended to every text segment and spaces turned into `▁`, BOS added in front, and
the tokens of `tokenizer_config.json`'s `added_tokens_decoder` (`<|im_start|>`, `<|im_end|>`, … which
replace placeholder pieces of the sentencepiece model) as special tokens. OMG-LLaVA's tokens are then
added in the official order (`[SEG]`, `<p>`, `</p>`, `<region>`, then `<mark>`).

Reading the model file needs the `sentencepiece` package (for its protobuf schema) and `protobuf`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omg_llava_ros.convert.files import ConversionError
from omg_llava_ros.model.chat_template import IM_END, IM_START
from omg_llava_ros.model.language_model import add_special_tokens, special_token_ids

log = logging.getLogger(__name__)

SPIECE_UNDERLINE = "▁"
_BPE = 2  # sentencepiece TrainerSpec.ModelType
_SPECIAL_TYPES = (2, 3)  # sentencepiece ModelProto.SentencePiece.Type: UNKNOWN, CONTROL


def _load_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:
        raise ConversionError(
            "converting the InternLM2 tokenizer needs the `sentencepiece` and `protobuf` packages "
            "(pip install 'omg_llava_ros[convert]')"
        ) from err
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def bpe_merges(pieces: list[tuple[str, float]], mergeable: set[int]) -> list[tuple[str, str]]:
    """Merges of a sentencepiece BPE vocabulary: every split of a piece into two vocabulary pieces,
    ranked by the merged piece's score (higher first; sentencepiece merges the best-scoring pair),
    ties in vocabulary order."""
    ids = {piece: i for i, (piece, _) in enumerate(pieces)}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for i, (piece, score) in enumerate(pieces):
        if i not in mergeable:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def internlm2_tokenizer(llm_dir: str | Path):
    """The InternLM2 tokenizer of `llm_dir` (tokenizer.model + tokenizer_config.json), as a fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    llm_dir = Path(llm_dir)
    model_path = llm_dir / "tokenizer.model"
    if not model_path.is_file():
        raise ConversionError(f"--llm: {llm_dir} has no tokenizer.model")
    proto = _load_proto(model_path)
    if proto.trainer_spec.model_type != _BPE:
        raise ConversionError(f"{model_path} is not a BPE sentencepiece model (InternLM2's is)")
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:
        log.warning(
            "%s: sentencepiece normaliser %r (remove_extra_whitespaces=%s) is not reproduced; like "
            "InternLM2TokenizerFast only the dummy prefix and space → ▁ are applied",
            model_path,
            norm.name,
            norm.remove_extra_whitespaces,
        )

    config_path = llm_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    added = {int(k): v for k, v in (config.get("added_tokens_decoder") or {}).items()}

    pieces = [(p.piece, p.score) for p in proto.pieces]
    # InternLM2's converter names the first three pieces itself.
    for i, name in enumerate(("<unk>", "<s>", "</s>")):
        if i < len(pieces):
            pieces[i] = (name, 0.0)
    extra_ids = sorted(i for i in added if i >= len(pieces))
    if extra_ids and extra_ids != list(range(len(pieces), len(pieces) + len(extra_ids))):
        raise ConversionError(f"{config_path}: added token ids {extra_ids} leave gaps after the {len(pieces)} pieces")
    # Like transformers' SentencePieceExtractor (which InternLM2TokenizerFast uses): every piece may be a
    # merge result, except the special ones, which are matched whole before the BPE runs.
    mergeable = {i for i, p in enumerate(proto.pieces) if p.type not in _SPECIAL_TYPES and i not in added}
    merges = bpe_merges(pieces, mergeable)
    for i, entry in added.items():
        if i < len(pieces):
            pieces[i] = (entry["content"], pieces[i][1])
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ConversionError(f"{model_path}: duplicate pieces after applying {config_path.name}")

    tok = Tokenizer(BPE(vocab, merges, unk_token=pieces[0][0], fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend(SPIECE_UNDERLINE)] if norm.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPIECE_UNDERLINE)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = []
    for i in sorted(added):
        entry = added[i]
        token = AddedToken(
            entry["content"],
            single_word=entry.get("single_word", False),
            lstrip=entry.get("lstrip", False),
            rstrip=entry.get("rstrip", False),
            normalized=entry.get("normalized", False),
            special=entry.get("special", True),
        )
        specials.append(token)
    tok.add_special_tokens(specials)
    for i in extra_ids:
        if tok.token_to_id(added[i]["content"]) != i:
            raise ConversionError(f"{config_path}: added token {added[i]['content']!r} did not get id {i}")

    bos = _token_content(config.get("bos_token")) or "<s>"
    eos = _token_content(config.get("eos_token")) or "</s>"
    unk = _token_content(config.get("unk_token")) or "<unk>"
    pad = _token_content(config.get("pad_token")) or eos
    add_bos = config.get("add_bos_token", True)
    add_eos = config.get("add_eos_token", False)
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    special_ids = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids)

    others = [t.content for t in specials if t.special and t.content not in (bos, eos, unk, pad)]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        additional_special_tokens=others,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def omg_llava_tokenizer(llm_dir: str | Path, embedding_rows: int):
    """The InternLM2 tokenizer plus OMG-LLaVA's tokens; checks the ids against the checkpoint's
    embedding size (rows = base vocabulary + `[SEG]`, `<p>`, `</p>`, `<region>`)."""
    tokenizer = internlm2_tokenizer(llm_dir)
    base = len(tokenizer)
    rows = add_special_tokens(tokenizer)
    if rows != embedding_rows:
        raise ConversionError(
            f"the tokenizer has {base} tokens, so the 4 OMG-LLaVA tokens end at {rows}, but the checkpoint's "
            f"embedding has {embedding_rows} rows: tokenizer and checkpoint do not belong together"
        )
    try:
        ids = special_token_ids(tokenizer)
    except ValueError as err:
        raise ConversionError(
            f"{err}; InternLM2's chat template needs {IM_START} and {IM_END} "
            f"(tokenizer_config.json `added_tokens_decoder` of internlm2-chat-7b)"
        ) from None
    log.info(
        "tokenizer: %d base tokens; [SEG]=%d <p>=%d </p>=%d <region>=%d <mark>=%d %s=%s %s=%s",
        base,
        ids.seg,
        ids.phrase_start,
        ids.phrase_end,
        ids.region,
        ids.mark,
        IM_START,
        tokenizer.convert_tokens_to_ids(IM_START),
        IM_END,
        ids.im_end,
    )
    return tokenizer
