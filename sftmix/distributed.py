"""Multi-process coordination: the one module that knows which rank it runs on.

Under `accelerate launch` (DDP, FSDP2, DeepSpeed) every process runs the same command.
Everywhere else in sftmix the rule is: one rank decides and writes, every rank waits at
the boundary, and an error raised on the deciding rank is raised on every rank, so all
exit non-zero together (the launcher ends the others when one rank dies elsewhere).

    world_size(), rank(), local_rank(), is_main()
    on_main(fn, ...)   rank 0 runs fn; every rank returns its result or raises its error
    main_first(fn, ...)  rank 0 runs fn, then the others (a cache rank 0 fills, the others read): as accelerate's
                       main_process_first, but an error of rank 0 is raised on every rank, not waited on
    barrier()          accelerate's wait_for_everyone
    gather(obj)        every rank's obj, in rank order, on every rank (accelerate's gather_object)
    sum_over_ranks(v)  element-wise sum of every rank's numbers (accelerate's reduce)
    shard(count)       the indices of `range(count)` this rank handles (strided)
    device(use_cpu)    this rank's device (its own GPU under a launcher)
    full_state_dict()  the whole model's weights on rank 0, whatever shards them (FSDP2, ZeRO-3)
    unpartitioned_loading()   load a whole model on this rank even inside a ZeRO-3 job
    gathered(*params)  partitioned parameters whole for a block (a read outside their module)
    partitioned_loading() / zero3_inference(model)   load a model partitioned over a ZeRO-3 job and wrap it for
                       inference (sharded scoring and evaluation)
    configure_launch(config) / check_launch(config)   make a launch work as asked, or refuse it
    leave(succeeded)   end this rank's part in the job before Python shuts down

One process (no launcher) is the trivial case: nothing is initialised, nothing waits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .errors import InputError

T = TypeVar("T")


def world_size() -> int:
    """Processes in this job: WORLD_SIZE set by the launcher, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its machine (its GPU under a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _state():
    """accelerate's process state; outside a trainer, the first call initialises the process group from the
    launcher's environment (gloo when there is no GPU)."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != world_size():  # accelerate would then gather or reduce nothing, silently
        raise RuntimeError(f"{world_size()} processes were launched but accelerate sees {state.num_processes}")
    return state


# accelerate's collectives (wait_for_everyone, gather_object, reduce, broadcast_object_list); one process: no-ops.
def barrier() -> None:
    if world_size() > 1:
        _state().wait_for_everyone()


def gather(obj: Any) -> list[Any]:
    """All ranks' `obj` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    from accelerate.utils import gather_object

    _state()
    return gather_object([obj])


def sum_over_ranks(values: list[float], device) -> list[float]:
    """Element-wise sum of every rank's `values` (a collective; `device` must suit the backend: NCCL needs CUDA)."""
    if world_size() == 1:
        return [float(value) for value in values]
    import torch
    from accelerate.utils import reduce

    _state()
    return reduce(torch.tensor([float(value) for value in values], dtype=torch.float64, device=device), "sum").tolist()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    _state()
    return broadcast_object_list([obj if is_main() else None], from_process=0)[0]


def leave(succeeded: bool) -> None:
    """Destroy the process group while the interpreter is still whole; a no-op in one process.

    Left to Python's shutdown, gloo's worker threads can still hold finished work (and its
    tensors) while the interpreter is being torn down, and freeing them then aborts the
    process (SIGABRT) after a run that succeeded, failing the whole launch. After success every
    rank first waits for the others, so no rank closes its connections while another still
    uses them; after a failure it does not wait (the launcher ends the ranks still running).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if succeeded:
        dist.barrier()
    dist.destroy_process_group()


class FailedOnMain(RuntimeError):
    """Raised on the other ranks when rank 0 failed in `on_main`; rank 0 reports the error itself."""

    # The CLI exits 1 without a word for it: rank 0 prints the error (a traceback) once.


class InputFailedOnMain(InputError):
    """An InputError of rank 0, raised on the other ranks (same exit status 2, printed once)."""

    quiet = True


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on rank 0 only; every rank returns its (picklable) result or raises its error."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except InputError as err:
            broadcast(("input_error", str(err)))
            raise
        except BaseException as err:
            broadcast(("error", f"{type(err).__name__}: {err}"))
            raise
    kind, value = broadcast(outcome)
    if kind == "input_error":
        raise InputFailedOnMain(value)
    if kind == "error":
        raise FailedOnMain(f"rank 0 failed: {value}")
    return value


def main_first(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Rank 0 runs `fn` first (filling a cache, converting a model), then the other ranks run it too."""
    result: list[T] = []
    on_main(lambda: result.append(fn(*args, **kwargs)))
    return result[0] if result else fn(*args, **kwargs)


def shard(count: int) -> range:
    """This rank's indices of `range(count)`: every world_size-th, starting at its rank."""
    return range(rank(), count, world_size())


def print_on_main(message: str, file=None) -> None:
    """What a command reports (stdout; progress: `file` sys.stderr): printed once, not once per rank; no collective."""
    if is_main():
        print(message, file=file, flush=True)


def device(use_cpu: bool = False):
    """This rank's device: its own GPU (LOCAL_RANK) when there is one, else the CPU."""
    import torch

    if use_cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank())


def full_state_dict(wrapped_model, model) -> dict | None:
    """The complete state dict on rank 0 ({} elsewhere) for engines that shard weights; None otherwise.

    A collective: every rank must call it. FSDP2 shards parameters as DTensors, and its default
    (sharded) state dict is not loadable by `from_pretrained`; ZeRO-3 partitions them, and without
    `stage3_gather_16bit_weights_on_model_save` accelerate saves no weights at all. Gathering here,
    whatever the user's accelerate config says, is what makes every saved folder loadable.
    """
    from torch.distributed.tensor import DTensor

    if any(isinstance(parameter, DTensor) for parameter in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _zero_stage(wrapped_model) == 3:
        trainable_only = any(not parameter.requires_grad for parameter in model.parameters())  # LoRA: adapter only
        gathered = wrapped_model._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only)
        gathered = gathered or {}  # DeepSpeed returns None on the ranks that do not write
        if wrapped_model.bfloat16_enabled() or wrapped_model.fp16_enabled():
            _use_float32_masters(gathered, model)
        return gathered
    return None


def _use_float32_masters(state_dict: dict, model) -> None:
    """Under ZeRO-3 with bf16/fp16 the module holds 16-bit copies; the optimizer holds the float32 weights that
    training updates. Save those, as one process (and TRL) would. A collective, one parameter at a time."""
    from deepspeed.utils import safe_get_full_fp32_param

    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            full = safe_get_full_fp32_param(parameter)  # every rank takes part; None without an optimizer
            if full is not None and name in state_dict:
                state_dict[name] = full.detach().cpu()


def _zero_stage(wrapped_model) -> int | None:
    """The ZeRO stage of a DeepSpeedEngine, None for anything else."""
    stage = getattr(wrapped_model, "zero_optimization_stage", None)
    return stage() if callable(stage) else None


@contextlib.contextmanager
def unpartitioned_loading() -> Iterator[None]:
    """Let `from_pretrained` load a whole model on this rank, also inside a ZeRO-3 or FSDP job.

    Inside a ZeRO-3 job transformers partitions every model it loads across the ranks
    (`deepspeed.zero.Init`), which needs every rank to take part and yields weights no plain
    forward can use. With FSDP's `cpu_ram_efficient_loading`, ranks other than each node's
    first load placeholders (zeroed rotary buffers among them) and wait for a broadcast that
    only FSDP wrapping does. Scoring and evaluation give each rank a whole, real copy instead.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    efficient_loading = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    hf_deepspeed.unset_hf_deepspeed_config()
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = reference
        if efficient_loading is None:
            os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
        else:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = efficient_loading


def zero3_launch() -> bool:
    """Whether this job was launched with DeepSpeed ZeRO-3 (accelerate's launch environment)."""
    return (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")


def zero3_inference(model):
    """A model loaded inside a ZeRO-3 job (`partitioned_loading`: each rank holds 1/N of every weight) wrapped for
    inference: each forward gathers the parameters layer by layer, on every rank at once, so every rank must run
    the same number of forwards. Returns the engine (keep it alive while the model is used)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=_inference_config(model.config, model.dtype))
    engine.eval()
    return engine


def gathered(*params):
    """ZeRO-3-partitioned parameters gathered whole for the block, for a read outside their module's forward (the LM
    head's weight in the tiled loss), as TRL's `maybe_gather_lm_head_ctx` does; that one acts only while
    transformers holds a ZeRO-3 config, which `partitioned_loading` drops once the model is loaded. A collective;
    a null context for whole parameters."""
    partitioned = {id(param): param for param in params if param is not None and hasattr(param, "ds_id")}
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    absent = [param for param in partitioned.values() if param.ds_status != ZeroParamStatus.AVAILABLE]
    return deepspeed.zero.GatheredParameters(absent) if absent else contextlib.nullcontext()


@contextlib.contextmanager
def partitioned_loading(model_path: str, dtype) -> Iterator[None]:
    """`from_pretrained` inside this block partitions the model over the ZeRO-3 job as it loads (transformers does
    so while a ZeRO-3 DeepSpeed config is registered: the training arguments' one, else this launch's)."""
    from transformers import AutoConfig
    from transformers.integrations import deepspeed as hf_deepspeed

    if hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    config = hf_deepspeed.HfDeepSpeedConfig(_inference_config(AutoConfig.from_pretrained(model_path), dtype))
    try:
        yield
    finally:
        del config
        hf_deepspeed.unset_hf_deepspeed_config()


def _inference_config(model_config, dtype) -> dict:
    """The launch's DeepSpeed config without its training parts (optimizer, scheduler, optimizer offload), as TRL's
    `prepare_deepspeed` does for reference models, with its "auto" values filled for inference."""
    import copy

    import torch
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    registered = reference() if reference is not None else None
    config = copy.deepcopy(registered.config if registered is not None else DeepSpeedPlugin().deepspeed_config)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    zero["stage"] = 3
    hidden = getattr(model_config.get_text_config(), "hidden_size", None) or 1024
    for key, value in (("reduce_bucket_size", hidden * hidden),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key) in (None, "auto"):
            zero[key] = value
    config["zero_optimization"] = {key: value for key, value in zero.items() if value != "auto"}
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=world_size(),
                  bf16={"enabled": dtype == torch.bfloat16}, fp16={"enabled": dtype == torch.float16})
    return {key: value for key, value in config.items() if value != "auto"}


def describe_launch(wrapped_model, model) -> dict[str, Any]:
    """How this job ran: processes, the process group's size, and the engine that held the weights."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if _zero_stage(wrapped_model) is not None:
        engine = f"deepspeed-zero{_zero_stage(wrapped_model)}"
    elif any(isinstance(parameter, DTensor) for parameter in model.parameters()):
        engine = "fsdp2"
    else:
        engine = "ddp" if world_size() > 1 else "single-process"
    group_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {"processes": world_size(), "process_group_size": group_size, "engine": engine}


def warn_if_launched_as_one() -> None:
    """accelerate's single-process launcher (a config with `distributed_type: NO`, or `--cpu`) starts ONE process even
    for `--num_processes 2`, and leaves a trace: MASTER_ADDR set for the processes it did not start, no WORLD_SIZE."""
    env = os.environ
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        import logging

        logging.getLogger(__name__).warning(
            "accelerate started ONE process although more were asked for (--num_processes > 1 with `distributed_type: "
            "NO` or --cpu starts one): add --multi_gpu, or use a config from configs/accelerate/")


def configure_launch(config) -> None:
    """Before TrainingArguments sets up devices: make a launch without GPUs run as one job.

    Without CUDA, transformers runs the processes of `accelerate launch` as independent
    copies (each training on all the data, none of them distributed) unless it is told to
    use the CPU; DeepSpeed instead needs the gloo backend named.
    """
    import torch

    if world_size() == 1 or torch.cuda.is_available():
        return
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        config.ddp_backend = config.ddp_backend or "gloo"
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":  # FSDP without GPUs: check_launch
        config.use_cpu = True


def check_launch(config) -> None:
    """Refuse, before any work, a launch that sftmix would not run as one correct job."""
    env = os.environ
    if world_size() > 1 and config.world_size != world_size():
        if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise InputError("FSDP needs GPUs (on CPU processes accelerate would run plain DDP, or nothing)")
        raise InputError(
            f"{world_size()} processes were launched but training would see {config.world_size}: they would train as "
            "independent copies. On a machine without GPUs, pass --use_cpu true (DDP) or --ddp_backend gloo "
            "(DeepSpeed)."
        )
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and env.get("FSDP_VERSION", "1") != "2":
        raise InputError("FSDP1 is not supported: set `fsdp_version: 2` in the accelerate config "
                         "(configs/accelerate/fsdp2.yaml), or use DeepSpeed ZeRO-3 (configs/accelerate/zero3.yaml)")
    if env.get("ACCELERATE_USE_MEGATRON_LM", "false").lower() == "true":
        raise InputError("Megatron-LM is not supported: use DDP, FSDP2 or DeepSpeed (configs/accelerate/)")
    parallel = {name: int(env.get(f"PARALLELISM_CONFIG_{name}_SIZE", "1")) for name in ("TP", "CP", "SP")}
    if any(size > 1 for size in parallel.values()):
        raise InputError(f"tensor / context / sequence parallelism ({parallel}) is not supported: the Mixup pairs "
                         "need whole sequences on one rank; use data parallelism with FSDP2 or ZeRO-3")
