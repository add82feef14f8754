"""`answerfirst export gguf`: our own HF -> GGUF writer, llama.cpp K-quants, parity in the manifest.

    student checkpoint (safetensors + tokenizer) --write_gguf--> student-f32|f16|q8_0.gguf
                        F32 / F16 / Q8_0 written here, tensor by tensor (gguf.GGUFWriter, gguf.quants)
    student-f32|f16.gguf --llama_model_quantize--> student-q4_k_m|q5_k_m.gguf  (llama.cpp's quantizer)
    every variant --parity vs torch fp32--> answerfirst.json (kind "gguf", variants fastest first)

What a GGUF file holds (written by `write_gguf`):
- the Qwen3 hyper-parameters (`qwen3.*` keys),
- the tensors, renamed by TENSOR_TABLE (one row per tensor kind; names from gguf's TENSOR_NAMES),
- the tokenizer: byte-level BPE tokens, merges, token types, the "qwen2" pre-tokenizer, special ids,
  and the chat template, so llama.cpp tokenizes exactly like the HF tokenizer,
- `answerfirst.format` / `answerfirst.grade_token_ids`: the AFRL format, so a lone .gguf file still
  scores with the right rubric and grades (llama.cpp ignores keys it does not know; its quantizer
  copies them into the K-quant files),
- a rank head, so llama.cpp's own reranking runs the file as it is (`llama-server --reranking`,
  or a context with embeddings on): `cls.output` holds the K grade rows of the output head, highest
  grade first, `classifier.output_labels` the grade strings in that order, `qwen3.pooling_type` is
  RANK (llama.cpp then applies the head to each sequence's last token and a softmax over the K
  outputs) and `tokenizer.chat_template.rerank` is the AFRL prompt with llama-server's `{query}` and
  `{document}` markers. llama-server returns the first output as the score: the probability of the
  highest grade. The runtime reads all K (runtime/_llamacpp.py).

Resume: each file is written to `NAME.partial` and renamed when complete, and the manifest is
rewritten after every step, so a rerun with the same checkpoint skips finished files (and parity
reports already measured) instead of redoing them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from answerfirst.afrl import AFRLFormat, PromptTokenizer
from answerfirst.artifact import (
    Manifest,
    ManifestError,
    Variant,
    checkpoint_hash,
    finalize_files,
    has_manifest,
)
from answerfirst.export.parity import ParityThresholds, log_report, measure, summary
from answerfirst.export.parity import probe_pairs as student_probe_pairs
from answerfirst.extras import missing_extra
from answerfirst.qwen3 import QWEN_SPLIT_PATTERN, Qwen3Shape
from answerfirst.runtime import ScorerConfig
from answerfirst.runtime._llamacpp import FORMAT_KEY, GRADE_IDS_KEY, RANK_SUFFIX

logger = logging.getLogger(__name__)

ARCHITECTURE = "qwen3"
GGUF_PRE_TOKENIZER = "qwen2"  # llama.cpp's name for the Qwen2/Qwen3 split regex (QWEN_SPLIT_PATTERN)
FILE_STEM = "student"


class GGUFExportError(ValueError):
    """The checkpoint cannot be written as a Qwen3 GGUF, or an export step failed."""


# --------------------------------------------------------------------------------------------
# Quantizations: how each is made and the parity it must meet (the stated tolerances)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quant:
    """One GGUF variant: `direct` ones are written by this module, the others by llama.cpp's quantizer.

    thresholds: what parity against torch fp32 must meet (scores with an F32 KV cache). F32 differs
    from torch only by float summation order; F16 rounds weights to 11 bits; Q8_0 / K-quants move
    probabilities further. The max |dp| bounds rest on measurements (bench/parity_thresholds.py,
    README "Export"): on a learned student (3 layers, hidden 128, 128 probe pairs) healthy F16 / Q8_0 /
    Q4_K_M measured 1.6e-3 / 0.044 / 0.076 (Q4_K_M there falls back to Q5_0 on 128-wide rows), the
    256-aligned random test model's real Q4_K 0.29, and every broken export of the student >= 0.92."""

    name: str
    file_type: int  # gguf.LlamaFileType / llama_ftype value
    direct: bool
    thresholds: ParityThresholds
    rank_thresholds: ParityThresholds | None = None  # the "-rank" variant's; None = the same

    def __post_init__(self) -> None:
        if self.rank_thresholds is None:
            object.__setattr__(self, "rank_thresholds", self.thresholds)


QUANTS: dict[str, Quant] = {
    # fastest first: this is the order of the manifest's variants (Manifest.variant picks the first passing)
    "q4_k_m": Quant("q4_k_m", 15, False, ParityThresholds(max_abs_dp=0.35, min_agreement=0.75, min_spearman=0.8)),
    "q5_k_m": Quant("q5_k_m", 17, False, ParityThresholds(max_abs_dp=0.25, min_agreement=0.8, min_spearman=0.85)),
    "q8_0": Quant("q8_0", 7, True, ParityThresholds(max_abs_dp=0.10, min_agreement=0.9, min_spearman=0.9)),
    "f16": Quant("f16", 1, True, ParityThresholds(max_abs_dp=5e-3, min_agreement=0.95, min_spearman=0.98)),
    # 4-bit non-linear blocks of 32, no importance matrix needed; held to Q4_K_M's bounds (a 4-bit quant
    # alike). Slow on CPUs: 1099 ms/doc at Qwen3-0.6B on the AMX Xeon of bench/results, Q4_K_M 523,
    # Q8_0 973 (bench/levers.py), so it comes after F16 in this order.
    "iq4_nl": Quant("iq4_nl", 25, False, ParityThresholds(max_abs_dp=0.35, min_agreement=0.75, min_spearman=0.8)),
    "f32": Quant("f32", 0, True, ParityThresholds(max_abs_dp=1e-3, min_agreement=1.0, min_spearman=0.999)),
}
DEFAULT_QUANTS = ("f16", "q8_0", "q4_k_m")
PARITY_N_CTX = 4096  # KV cells for the parity run: the longest probe prompt times a small batch
# Parity isolates what the weights' quantization costs: F32 KV cache and no flash attention. The
# runtime's defaults (F16 cache, flash attention, whose CPU kernel rounds through F16) move
# probabilities by a further ~2e-4; tests/test_gguf.py bounds that.
PARITY_CONFIG = ScorerConfig(kv_cache_type="f32", flash_attn=False, n_ctx=PARITY_N_CTX, batch_size=4)


def parse_quants(quants: str | Sequence[str]) -> tuple[str, ...]:
    names = [q.strip().lower() for q in (quants.split(",") if isinstance(quants, str) else quants) if q.strip()]
    unknown = [q for q in names if q not in QUANTS]
    if unknown or not names:
        raise GGUFExportError(f"--quant: unknown or empty {unknown or names}; choose from {', '.join(QUANTS)}")
    return tuple(q for q in QUANTS if q in names)  # fastest first, duplicates dropped


def variant_file(quant: str) -> str:
    return f"{FILE_STEM}-{quant}.gguf"


# --------------------------------------------------------------------------------------------
# The tensor-name map: one row per tensor kind (HF name -> gguf MODEL_TENSOR)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRow:
    hf_name: str  # "{bid}" = block index
    kind: str  # gguf.MODEL_TENSOR member name; the GGUF name is gguf.TENSOR_NAMES[kind] + ".weight"


TENSOR_TABLE: tuple[TensorRow, ...] = (
    TensorRow("model.embed_tokens.weight", "TOKEN_EMBD"),
    TensorRow("model.norm.weight", "OUTPUT_NORM"),
    TensorRow("lm_head.weight", "OUTPUT"),  # absent when the head is tied to the embeddings
    TensorRow("model.layers.{bid}.input_layernorm.weight", "ATTN_NORM"),
    TensorRow("model.layers.{bid}.self_attn.q_proj.weight", "ATTN_Q"),
    TensorRow("model.layers.{bid}.self_attn.q_norm.weight", "ATTN_Q_NORM"),
    TensorRow("model.layers.{bid}.self_attn.k_proj.weight", "ATTN_K"),
    TensorRow("model.layers.{bid}.self_attn.k_norm.weight", "ATTN_K_NORM"),
    TensorRow("model.layers.{bid}.self_attn.v_proj.weight", "ATTN_V"),
    TensorRow("model.layers.{bid}.self_attn.o_proj.weight", "ATTN_OUT"),
    TensorRow("model.layers.{bid}.post_attention_layernorm.weight", "FFN_NORM"),
    TensorRow("model.layers.{bid}.mlp.gate_proj.weight", "FFN_GATE"),
    TensorRow("model.layers.{bid}.mlp.up_proj.weight", "FFN_UP"),
    TensorRow("model.layers.{bid}.mlp.down_proj.weight", "FFN_DOWN"),
)


def tensor_names(n_blocks: int, tied: bool) -> list[tuple[str, str]]:
    """[(hf_name, gguf_name)] in writing order: the global tensors, then block 0, block 1, ..."""
    import gguf

    rows = [r for r in TENSOR_TABLE if not (r.kind == "OUTPUT" and tied)]
    gguf_name = {r.kind: gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[r.kind]] + ".weight" for r in rows}
    names = [(r.hf_name, gguf_name[r.kind]) for r in rows if "{bid}" not in r.hf_name]
    for bid in range(n_blocks):
        names += [(r.hf_name.format(bid=bid), gguf_name[r.kind].format(bid=bid)) for r in rows if "{bid}" in r.hf_name]
    return names


# --------------------------------------------------------------------------------------------
# Reading the checkpoint: config, tokenizer, safetensors (streamed one tensor at a time)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Qwen3Params(Qwen3Shape):
    """The Qwen3 shape (answerfirst.qwen3) plus what a qwen3 GGUF header also states."""

    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @classmethod
    def read(cls, config: Any, where: str) -> Qwen3Params:
        """From a transformers config, refusing what a qwen3 GGUF cannot express."""
        if getattr(config, "model_type", None) != "qwen3":
            raise GGUFExportError(
                f"{where}: model_type {getattr(config, 'model_type', None)!r}; the GGUF exporter writes Qwen3 "
                "students (model_type 'qwen3')"
            )
        if getattr(config, "use_sliding_window", False):
            raise GGUFExportError(f"{where}: use_sliding_window=True is not supported by the Qwen3 GGUF writer")
        if getattr(config, "attention_bias", False):
            raise GGUFExportError(f"{where}: attention_bias=True has no place in a qwen3 GGUF")
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise GGUFExportError(f"{where}: rope_type {rope_type!r} (RoPE scaling) is not supported; only 'default'")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise GGUFExportError(f"{where}: config has no rope_theta")
        return cls.from_config(
            config,
            max_position_embeddings=int(config.max_position_embeddings),
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=float(theta),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


class SafetensorsCheckpoint:
    """Name -> fp32 numpy array, read lazily from (possibly sharded) safetensors files."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: model_dir / file for name, file in weight_map.items()}
        elif (model_dir / "model.safetensors").is_file():
            from safetensors import safe_open

            path = model_dir / "model.safetensors"
            with safe_open(path, framework="pt") as f:
                self.files = {name: path for name in f.keys()}
        else:
            raise GGUFExportError(
                f"{model_dir} has no model.safetensors (or .index.json); save the checkpoint with safetensors"
            )

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def load(self, name: str, rows: Sequence[int] | None = None) -> np.ndarray:
        """The tensor as f32 (bf16 / f16 / f32 on disk; numpy has no bf16), or only `rows` of it
        (read one by one, so the grade rows of a 151k-row head cost a few KB)."""
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            if rows is None:
                return f.get_tensor(name).float().numpy()
            tensor = f.get_slice(name)
            return np.concatenate([tensor[r : r + 1].float().numpy() for r in rows])


def check_tokenizer(tokenizer: Any, where: str) -> dict[str, Any]:
    """The tokenizer must be Qwen-style byte-level BPE, or llama.cpp's "qwen2" tokenizer would differ."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"{where}: not a fast tokenizer; the GGUF writer needs tokenizer.json")
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{where}: tokenizer model is {model.get('type')!r}; a Qwen GGUF needs byte-level BPE")
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if regexes != [QWEN_SPLIT_PATTERN] or len(byte_level) != 1:
        raise GGUFExportError(
            f"{where}: the tokenizer's pre-tokenizer is not Qwen's (Split on the Qwen2 regex + ByteLevel); "
            "llama.cpp's 'qwen2' pre-tokenizer would split text differently"
        )
    return data


# --------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------


def _token_table(tokenizer: Any, data: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1; ids the tokenizer lacks become UNUSED pads."""
    import gguf

    if len(tokenizer) > vocab_size:
        raise GGUFExportError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, i in data["model"]["vocab"].items():
        tokens[i], types[i] = token, int(gguf.TokenType.NORMAL)
    for added in data.get("added_tokens", []):
        # Stored as raw text (llama.cpp matches added tokens on text, not on byte-level symbols).
        kind = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        tokens[added["id"]], types[added["id"]] = added["content"], int(kind)
    return tokens, types


def _merges(data: dict[str, Any]) -> list[str]:
    # tokenizers writes merges as ["a", "b"] pairs (new) or "a b" strings (old); GGUF stores "a b".
    return [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]


def rank_order(fmt: AFRLFormat) -> list[int]:
    """Grade indices in the order of the rank head's rows: highest value first, so the first output,
    which llama-server returns as the score, is the probability of the best grade."""
    return sorted(range(len(fmt.grades)), key=lambda k: (-fmt.values[k], k))


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of a GGUF file: read from `hf_name` (only `rows` of it when set), written as `gguf_name`."""

    hf_name: str
    gguf_name: str
    qtype: Any  # gguf.GGMLQuantizationType
    rows: tuple[int, ...] | None = None


def _tensor_plan(
    params: Qwen3Params, checkpoint: SafetensorsCheckpoint, quant: str, head_rows: Sequence[int]
) -> list[PlannedTensor]:
    """Every tensor of the file in writing order: the TENSOR_TABLE tensors, then the rank head
    (`head_rows` of the output head). 1-D tensors (norms) stay F32; 2-D ones take the file's type,
    Q8_0 falling back to F16 for rows that are not a multiple of its 32-value block."""
    import gguf

    tied = params.tie_word_embeddings or "lm_head.weight" not in checkpoint.names()
    plan_names = tensor_names(params.num_hidden_layers, tied)
    expected = {hf for hf, _ in plan_names}
    unexpected = sorted(checkpoint.names() - expected - {"lm_head.weight"})
    missing = sorted(expected - checkpoint.names())
    if unexpected or missing:
        raise GGUFExportError(
            f"the checkpoint's tensors do not match a Qwen3 model: missing {missing[:5]}, unknown {unexpected[:5]}"
        )

    def qtype(shape: tuple[int, ...]) -> Any:
        if len(shape) == 1 or quant == "f32":
            return gguf.GGMLQuantizationType.F32
        if quant == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            return gguf.GGMLQuantizationType.Q8_0
        return gguf.GGMLQuantizationType.F16

    plan = [PlannedTensor(hf, name, qtype(checkpoint.shape(hf))) for hf, name in plan_names]
    head = "embed_tokens" if tied else "lm_head"
    head_name = next(hf for hf, _ in plan_names if head in hf)
    rank_head = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.CLS_OUT] + ".weight"
    rows = tuple(int(r) for r in head_rows)
    plan.append(PlannedTensor(head_name, rank_head, qtype((len(rows), params.hidden_size)), rows))
    return plan


def _planned_shape(checkpoint: SafetensorsCheckpoint, tensor: PlannedTensor) -> tuple[int, ...]:
    shape = checkpoint.shape(tensor.hf_name)
    return shape if tensor.rows is None else (len(tensor.rows), *shape[1:])


def write_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    quant: str,
    fmt: AFRLFormat,
    grade_token_ids: Sequence[int],
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the checkpoint in `model_dir` as one F32 / F16 / Q8_0 GGUF file (atomically).

    Tensors are streamed: the header and tensor infos first, then each tensor is read from
    safetensors, converted and written, so peak memory is one tensor, not the model."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    if quant not in QUANTS or not QUANTS[quant].direct:
        raise GGUFExportError(f"write_gguf writes f32, f16 or q8_0; {quant!r} comes from llama.cpp's quantizer")
    model_dir, out_path = Path(model_dir), Path(out_path)
    params = Qwen3Params.read(AutoConfig.from_pretrained(model_dir), str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = check_tokenizer(tokenizer, str(model_dir))
    checkpoint = SafetensorsCheckpoint(model_dir)
    plan = _tensor_plan(params, checkpoint, quant, [grade_token_ids[k] for k in rank_order(fmt)])

    partial = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(partial, ARCHITECTURE)
    try:
        writer.add_name(model_dir.name)
        _write_metadata(writer, params, tokenizer, data, quant, fmt, grade_token_ids)
        for tensor in plan:
            shape, qtype = _planned_shape(checkpoint, tensor), tensor.qtype
            nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
            if qtype == gguf.GGMLQuantizationType.F32:
                nbytes = int(np.prod(shape)) * 4
            elif qtype == gguf.GGMLQuantizationType.F16:
                nbytes = int(np.prod(shape)) * 2
            writer.add_tensor_info(tensor.gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, tensor in enumerate(plan, start=1):
            weights = checkpoint.load(tensor.hf_name, tensor.rows)  # (rows, cols) or (n,), f32
            if tensor.qtype == gguf.GGMLQuantizationType.F16:
                weights = weights.astype(np.float16)
            elif tensor.qtype == gguf.GGMLQuantizationType.Q8_0:
                weights = gguf.quants.quantize(weights, tensor.qtype)  # (rows, cols / 32 * 34) uint8 blocks
            writer.write_tensor_data(weights)
            if progress is not None:
                progress(done, len(plan))
        writer.close()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out_path)
    return out_path


def _write_metadata(
    writer: Any, params: Qwen3Params, tokenizer: Any, data: dict[str, Any], quant: str, fmt: AFRLFormat,
    grade_token_ids: Sequence[int],
) -> None:
    """The GGUF's key-value metadata: file type, Qwen3 hyper-parameters, tokenizer, our AFRL keys."""
    import gguf

    writer.add_file_type(QUANTS[quant].file_type)
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # Qwen3 hyper-parameters; key_length is needed because head_dim != hidden / heads in Qwen3-0.6B.
    writer.add_context_length(params.max_position_embeddings)
    writer.add_embedding_length(params.hidden_size)
    writer.add_block_count(params.num_hidden_layers)
    writer.add_feed_forward_length(params.intermediate_size)
    writer.add_head_count(params.num_attention_heads)
    writer.add_head_count_kv(params.num_key_value_heads)
    writer.add_key_length(params.head_dim)
    writer.add_value_length(params.head_dim)
    writer.add_rope_freq_base(params.rope_theta)
    writer.add_layer_norm_rms_eps(params.rms_norm_eps)
    writer.add_vocab_size(params.vocab_size)
    # The tokenizer: byte-level BPE ("gpt2" in llama.cpp) with Qwen's pre-tokenizer.
    tokens, types = _token_table(tokenizer, data, params.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GGUF_PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(data))
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
        writer.add_eot_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_add_bos_token(False)  # Qwen prompts start with <|im_start|>, never a BOS
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    writer.add_string(FORMAT_KEY, json.dumps(fmt.to_dict(), ensure_ascii=False))
    writer.add_array(GRADE_IDS_KEY, [int(i) for i in grade_token_ids])
    # The rank head (module docstring): llama.cpp's reranking reads these three keys and cls.output.
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_classifier_output_labels([fmt.grades[k] for k in rank_order(fmt)])
    # llama-server substitutes {query} and {document} and tokenizes the whole text with special tokens
    # parsed; the runtime tokenizes the three segments apart and never parses chat markers inside user
    # text, so the two differ only where a document holds such markers.
    writer.add_string(gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(name="rerank"), fmt.render("{query}", "{document}"))
    writer.add_array(gguf.Keys.Tokenizer.CHAT_TEMPLATES, ["rerank"])


def quantize_gguf(source: Path, out_path: Path, quant: str, threads: int | None = None) -> Path:
    """A K-quant file from an F32/F16 GGUF by llama.cpp's own quantizer (llama_model_quantize).

    K-quants work on 256-value super-blocks: tensors whose rows are not a multiple of 256 (tiny
    models) get llama.cpp's fallback type for that tensor; the file still loads and scores."""
    from answerfirst.runtime._llamacpp import import_llama_cpp, route_llama_logs

    llama_cpp = import_llama_cpp()
    route_llama_logs(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant].file_type
    params.nthread = threads or 0  # 0: all hardware threads
    partial = out_path.with_name(out_path.name + ".partial")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
    if status != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise GGUFExportError(f"llama.cpp could not quantize {source.name} to {quant} (status {status}); see the log")
    os.replace(partial, out_path)
    return out_path


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """{ggml type name: tensor count} of a GGUF file (shows K-quant fallbacks)."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------
# export_gguf: files + parity + manifest, resumable
# --------------------------------------------------------------------------------------------


def _student_format(model_dir: Path) -> tuple[AFRLFormat, tuple[int, ...], Manifest | None, Any]:
    """The student's AFRL format (its manifest's, else derived from its chat template) and grade ids."""
    from transformers import AutoTokenizer

    student = Manifest.read(model_dir) if has_manifest(model_dir) else None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fmt = student.format if student is not None else AFRLFormat.from_chat_template(tokenizer)
    prompts = PromptTokenizer(tokenizer, fmt)
    return fmt, prompts.grade_ids, student, tokenizer


def _open_out_dir(out_dir: Path, source: dict[str, str], fmt: AFRLFormat, force: bool) -> Manifest | None:
    """The previous manifest of an export of the same checkpoint and format (to resume), else None.
    A GGUF export of other weights or another format is replaced (exports are derived from their
    checkpoint, as the ONNX export does: `make distill export` reruns after the student changed).
    Refuses to overwrite anything else (another kind of artifact, unrelated files) unless force."""
    if not out_dir.exists():
        out_dir.mkdir(parents=True)
        return None
    if not out_dir.is_dir():
        raise GGUFExportError(f"--out {out_dir} exists and is not a directory")
    if has_manifest(out_dir):
        try:
            previous = Manifest.from_dict(json.loads((out_dir / "answerfirst.json").read_text()), str(out_dir))
        except (ManifestError, json.JSONDecodeError):
            previous = None
        if previous is None or previous.kind != "gguf":
            if not force:
                raise GGUFExportError(
                    f"--out {out_dir} holds another kind of artifact (or an unreadable answerfirst.json); "
                    "choose another --out or pass --force to overwrite it"
                )
        elif previous.source.get("sha256") != source["sha256"]:
            logger.info("gguf: %s holds the export of other weights (%s); replacing it", out_dir, previous.source.get("model"))
        elif previous.format != fmt:  # same weights, another rubric/grades: the files' embedded format is stale
            logger.info("gguf: %s was exported with another AFRL format; rewriting it", out_dir)
        else:
            return None if force else previous
    elif any(out_dir.iterdir()) and not force:
        raise GGUFExportError(f"--out {out_dir} is not empty and has no answerfirst.json; choose an empty directory or --force")
    for stale in out_dir.glob("*.gguf*"):
        stale.unlink()
    return None


def export_gguf(
    model_dir: str | Path,
    out_dir: str | Path,
    quants: Sequence[str] | str = DEFAULT_QUANTS,
    *,
    probe_pairs: Sequence[tuple[str, str]] | None = None,
    threads: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> Manifest:
    """Export a Qwen3 student checkpoint to GGUF files with a parity report each; returns the manifest.

    quants: any of f32, f16, q8_0 (written directly), q4_k_m, q5_k_m (llama.cpp's quantizer, from
    the F32 file when one is requested, else the F16 one, else a temporary F32 file).
    probe_pairs: (query, doc) pairs for parity; default: the student's held-out probe pairs.
    force: overwrite an --out that holds something else; by default a rerun resumes.
    progress: show tqdm bars (the CLI); the library otherwise only logs."""
    from answerfirst.runtime._llamacpp import import_llama_cpp

    import_llama_cpp()  # fail before any work when the [gguf] extra is missing
    _import_gguf()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise GGUFExportError(f"--model {model_dir} is not a checkpoint directory (no config.json)")
    wanted = parse_quants(quants)
    started = time.perf_counter()
    fmt, grade_ids, student, tokenizer = _student_format(model_dir)
    source = {"model": str(model_dir), "sha256": checkpoint_hash(model_dir)}
    previous = _open_out_dir(out_dir, source, fmt, force)
    for stale in [*out_dir.glob("*.partial"), *out_dir.glob("answerfirst-gguf-*")]:  # left by a killed run
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    # Files written before the rank head existed lack it: a resume rewrites them.
    current = previous is not None and previous.info.get("export", {}).get("rank_head")
    done = {v.name: v for v in previous.variants} if current else {}
    pairs = list(probe_pairs) if probe_pairs is not None else student_probe_pairs(student)

    # the runtime tokenizes with exactly the student's tokenizer
    tokenizer_files = [Path(f).name for f in tokenizer.save_pretrained(out_dir)]
    manifest = Manifest(
        kind="gguf",
        format=fmt,
        grade_token_ids=grade_ids,
        source=source,
        variants=[],
        info={
            "export": {"quants": list(wanted), "architecture": ARCHITECTURE, "complete": False, "rank_head": True},
            "probe_pairs": [list(p) for p in pairs],
        },
    )

    manifest.write(out_dir)
    k_quants = [q for q in wanted if not QUANTS[q].direct]
    source_quant = next((q for q in ("f32", "f16") if q in wanted), None)
    _write_files(model_dir, out_dir, manifest, wanted, done, source_quant, threads, progress)
    # every file carries the rank head: its "-rank" variant scores the same file through it
    for written in list(manifest.variants):
        rank_name = written.name + RANK_SUFFIX
        kept = done.get(rank_name) if written.parity is not None else None  # the file and its parity were kept
        _save_variant(manifest, out_dir, Variant(rank_name, written.file, written.quantization, kept and kept.parity))

    # 3. parity of every variant against torch fp32 on the probe pairs
    pending = [v for v in manifest.variants if v.parity is None]
    if pending:
        reference = _torch_scores(model_dir, pairs, threads)
        for v in pending:
            v.parity = _variant_parity(out_dir, v, pairs, reference, threads)
            _save_variant(manifest, out_dir, v)
    manifest.info["export"].update(
        complete=True,
        k_quant_source=(source_quant or "f32 (temporary)") if k_quants else None,
        tensor_types={v.name: gguf_tensor_types(out_dir / v.file) for v in manifest.variants if v.name in QUANTS},
        parity_config={k: getattr(PARITY_CONFIG, k) for k in ("kv_cache_type", "flash_attn", "n_ctx", "n_batch")},
        seconds=round(time.perf_counter() - started, 1),
    )
    finalize_files(manifest, out_dir, sorted({v.file for v in manifest.variants}) + tokenizer_files)
    manifest.write(out_dir)
    return manifest


def _save_variant(manifest: Manifest, out_dir: Path, variant: Variant) -> None:
    """Add or replace a variant and rewrite the manifest: a rerun resumes from here. Fastest first:
    the logits-path variants in QUANTS order, then the slower rank-path ones (runtime/_llamacpp.py)."""
    manifest.variants = [v for v in manifest.variants if v.name != variant.name] + [variant]
    manifest.variants.sort(key=lambda v: (v.name.endswith(RANK_SUFFIX), list(QUANTS).index(v.name.removesuffix(RANK_SUFFIX))))
    manifest.write(out_dir)


def _write_files(
    model_dir: Path,
    out_dir: Path,
    manifest: Manifest,
    wanted: Sequence[str],
    done: dict[str, Variant],
    source_quant: str | None,
    threads: int | None,
    progress: bool,
) -> None:
    """1. the files written here (F32 / F16 / Q8_0), 2. the K-quants by llama.cpp's quantizer, from the
    F32 or F16 file requested, else a temporary F32 one. Files a previous run finished (`done`) stay."""
    fmt, grade_ids = manifest.format, manifest.grade_token_ids
    k_quants = [q for q in wanted if not QUANTS[q].direct]
    temp_dir = None
    k_source: Path | None = None
    if k_quants and source_quant is None:
        temp_dir = Path(tempfile.mkdtemp(prefix="answerfirst-gguf-", dir=out_dir))
        k_source = temp_dir / variant_file("f32")
    elif k_quants:
        k_source = out_dir / variant_file(source_quant)

    def kept(quant: str, path: Path) -> bool:
        if quant in done and path.is_file():
            logger.info("gguf %s: %s already written, kept (resume)", quant, path.name)
            _save_variant(manifest, out_dir, Variant(quant, path.name, quant, done[quant].parity))
            return True
        return False

    try:
        for quant in [q for q in wanted if QUANTS[q].direct]:
            path = out_dir / variant_file(quant)
            if kept(quant, path):
                continue
            logger.info("gguf %s: writing %s", quant, path.name)
            with _progress_bar(progress, f"write {quant}") as bar:
                write_gguf(model_dir, path, quant, fmt, grade_ids, progress=bar)
            _save_variant(manifest, out_dir, Variant(quant, path.name, quant, None))
        if temp_dir is not None and any(q not in done for q in k_quants):
            logger.info("gguf: writing a temporary F32 file as the K-quant source")
            with _progress_bar(progress, "write f32 (temporary)") as bar:
                write_gguf(model_dir, k_source, "f32", fmt, grade_ids, progress=bar)
        for quant in k_quants:
            path = out_dir / variant_file(quant)
            if kept(quant, path):
                continue
            logger.info("gguf %s: quantizing %s -> %s with llama.cpp", quant, k_source.name, path.name)
            quantize_gguf(k_source, path, quant, threads)
            _save_variant(manifest, out_dir, Variant(quant, path.name, quant, None))
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _torch_scores(model_dir: Path, pairs: list[tuple[str, str]], threads: int | None) -> list[Any]:
    from answerfirst.runtime import load

    reference = load(model_dir, backend="torch", threads=threads)
    return reference.score_pairs(pairs)


def _variant_parity(
    out_dir: Path, variant: Variant, pairs: list[tuple[str, str]], reference: list[Any], threads: int | None
) -> dict[str, Any]:
    """Score the probe pairs with this file (PARITY_CONFIG), opened as the runtime opens the export."""
    from answerfirst.runtime import load

    scorer = load(out_dir, variant=variant.name, threads=threads, config=PARITY_CONFIG)
    try:
        quant = QUANTS[variant.name.removesuffix(RANK_SUFFIX)]
        thresholds = quant.rank_thresholds if variant.name.endswith(RANK_SUFFIX) else quant.thresholds
        report = measure(reference, lambda: scorer.score_pairs(pairs), thresholds)
    finally:
        scorer.close()
    report["kv_cache_type"] = "f32"
    log_report(f"gguf {variant.name}", report)
    return report


class _progress_bar:
    """A tqdm bar fed by write_gguf's (done, total) callback; nothing when progress is off."""

    def __init__(self, enabled: bool, desc: str):
        self.enabled, self.desc, self.bar = enabled, desc, None

    def __enter__(self) -> Callable[[int, int], None] | None:
        if not self.enabled:
            return None

        def update(done: int, total: int) -> None:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.desc, unit="tensor")
            self.bar.update(done - self.bar.n)

        return update

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise missing_extra("the GGUF export", "train", e) from None
    return gguf


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="student checkpoint directory (safetensors + tokenizer)")
    parser.add_argument("--out", required=True, help="output directory (GGUF files + tokenizer + answerfirst.json)")
    parser.add_argument(
        "--quant",
        default=",".join(DEFAULT_QUANTS),
        help=f"comma-separated variants among {', '.join(QUANTS)} (default {','.join(DEFAULT_QUANTS)})",
    )
    parser.add_argument("--threads", type=int, default=None, help="threads for quantization and parity")
    parser.add_argument("--force", action="store_true", help="overwrite an --out that holds another export")


def run(args: argparse.Namespace) -> int:
    manifest = export_gguf(
        args.model, args.out, args.quant, threads=args.threads, force=args.force, progress=True
    )
    print(f"GGUF export of {args.model} -> {args.out} ({manifest.info['export']['seconds']} s)")
    for v in manifest.variants:
        size = (Path(args.out) / v.file).stat().st_size / 2**20
        p = v.parity or {}
        status = "PASSED" if v.parity_passed else "FAILED " + "; ".join(p.get("failures", []))
        print(
            f"  {v.name:7s} {v.file:24s} {size:9.1f} MiB  {summary(p)}  {status}"
        )
    if not any(v.parity_passed for v in manifest.variants):
        print("no variant passed parity; load one explicitly with variant=...")
        return 1
    return 0


__all__ = ["QUANTS", "TENSOR_TABLE", "GGUFExportError", "export_gguf", "write_gguf", "quantize_gguf"]
