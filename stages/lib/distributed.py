"""Training on several GPUs and machines: the `accelerate launch` plan, and the adapter saved from
a wrapped (DDP) or sharded (FSDP) model exactly as a one-GPU run saves it.

Two engines, both accelerate's, chosen by `train.distributed`:
  ddp   each GPU holds the whole nf4 model and trains on its share of the batches; the LoRA
        gradients (~84 MB for an 8B model) are all-reduced every step.
  fsdp  FSDP-QLoRA for models that do not fit one GPU: the nf4 weights are stored in bf16
        (`bnb_4bit_quant_storage`) so that FSDP can flatten and shard them with the bf16 LoRA
        weights; each GPU holds 1/N of the model between layers.
Several machines: `train.num_machines` > 1 with `train.main_process_ip`/`main_process_port`, the
same params on every machine; each machine's rank comes from the environment (MACHINE_RANK,
else SLURM_NODEID, else 0), so dvc.lock is the same everywhere.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

# FSDP settings for QLoRA: the ones peft's and accelerate's FSDP-QLoRA guides use. Frozen nf4 and
# trainable LoRA weights live in one flat parameter per wrapped layer unless LoRA layers are wrapped
# on their own, which transformers' Trainer does for a peft model (peft's fsdp_auto_wrap_policy);
# use_orig_params stays off as in those guides.
FSDP_FLAGS = {
    "--fsdp_version": "1",
    "--fsdp_sharding_strategy": "FULL_SHARD",
    "--fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "--fsdp_backward_prefetch": "BACKWARD_PRE",
    "--fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "--fsdp_use_orig_params": "false",
    "--fsdp_cpu_ram_efficient_loading": "false",  # each process loads and quantises onto its own GPU
    "--fsdp_sync_module_states": "true",
    "--fsdp_offload_params": "false",
}


def machine_rank(env=None) -> int:
    env = os.environ if env is None else env
    for name in ("MACHINE_RANK", "SLURM_NODEID"):
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return 0


def needs_launch(train, env=None) -> bool:
    """Whether the stage must re-run itself under `accelerate launch` (not when it already runs
    under it: accelerate sets LOCAL_RANK)."""
    env = os.environ if env is None else env
    if "LOCAL_RANK" in env:
        return False
    return train.num_processes * train.num_machines > 1 or train.distributed == "fsdp"


def launch_command(train, accelerate: str = "accelerate", env=None, module: str = "stages.train") -> list[str]:
    """The `accelerate launch` command line for `train` (pure: reads params and, for the machine
    rank, the environment). train.num_processes is the number of processes (GPUs) per machine."""
    total = train.num_processes * train.num_machines
    command = [accelerate, "launch", "--num_processes", str(total)]
    if train.num_machines > 1:
        command += ["--num_machines", str(train.num_machines), "--machine_rank", str(machine_rank(env)),
                    "--main_process_ip", str(train.main_process_ip),
                    "--main_process_port", str(train.main_process_port)]
    if train.distributed == "fsdp":
        command.append("--use_fsdp")
        for flag, value in FSDP_FLAGS.items():
            command += [flag, value]
    elif total > 1:
        command.append("--multi_gpu")
    return command + ["-m", module]


def unwrap(model):
    """The model inside DDP/FSDP wrappers (their `.module`). Not by attribute: FSDP forwards
    unknown attributes to the module it wraps."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn import DataParallel
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, (FullyShardedDataParallel, DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def full_state_dict(model) -> dict:
    """The whole model's state dict with plain (unwrapped) names, gathered from every process for
    a sharded model: on rank 0 the full tensors (on the CPU), elsewhere {}. Every process must call
    it (collective). Works for a plain, DDP-wrapped or FSDP-sharded model alike."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


_WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _plain_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


@contextlib.contextmanager
def _names_without_wrappers(model):
    """peft picks the adapter's entries out of a state dict by the names of the model's LoRA
    layers, and strips FSDP's wrapper name only where it leads the name; with the layers wrapped
    one by one (as Trainer wraps a peft model) the names hold it in the middle, no entry matched
    and peft 0.21 wrote an empty adapter (seen in tests/test_distributed.py). While saving, the
    model reports its module names as the gathered state dict spells them."""
    wrapped_named_modules = model.named_modules

    def named_modules(*args, **kwargs):
        for name, module in wrapped_named_modules(*args, **kwargs):
            yield _plain_name(name), module

    model.named_modules = named_modules
    try:
        yield model
    finally:
        del model.named_modules


def save_adapter(model, directory, is_main: bool, dtype=None) -> None:
    """Write the LoRA adapter of a (possibly wrapped or sharded) peft model to `directory` as a
    one-GPU run writes it (peft's save_pretrained: adapter_model.safetensors + adapter_config.json).
    `dtype`: the adapter weights' dtype in a one-GPU run; accelerate's FSDP keeps trainable weights
    in fp32 under mixed precision (seen on the H200: an fp32 adapter where one GPU writes bf16), so
    they are cast back. Collective: every process calls it; only `is_main` writes."""
    state = full_state_dict(model)
    if dtype is not None:
        # The adapter's entries only: the state dict holds the frozen base too, and on CPU casting
        # its bf16 weights to the adapter's fp32 made a 400 MB copy that was the train stage's
        # memory peak, for tensors save_pretrained then leaves out.
        state = {k: v.to(dtype) if "lora_" in k and v.is_floating_point() else v for k, v in state.items()}
    if is_main:
        with _names_without_wrappers(unwrap(model)) as peft_model:
            peft_model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        _sort_config_sets(Path(directory))


def _sort_config_sets(directory: Path) -> None:
    """peft writes the config's sets (target_modules) as lists in the set's iteration order, which
    for strings changes from one process to the next (hash randomisation): the same adapter then
    hashed differently in DVC on every run, and the stages after train re-ran for nothing. The
    lists are written sorted, in peft's own format (indent 2, sorted keys)."""
    for config_path in directory.rglob("adapter_config.json"):
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in ("target_modules", "modules_to_save", "exclude_modules"):
            if isinstance(config.get(key), list) and all(isinstance(v, str) for v in config[key]):
                config[key] = sorted(config[key])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
