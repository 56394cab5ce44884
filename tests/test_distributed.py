"""Several GPUs / machines (stages/lib/distributed.py): the `accelerate launch` plan for ddp and
fsdp, one and several machines, and the adapter gathered from a DDP-wrapped and from an
FSDP-sharded model, which must be the very file a one-GPU run writes. The sharding runs for real
on the CPU (torch.distributed with gloo, one process); the GPU runs are in bench/NOTES.md."""
import os
import socket

import pytest

from stages.lib.distributed import FSDP_FLAGS, launch_command, machine_rank, needs_launch
from stages.lib.params import ParamsError, TrainParams, validate_params


def _train(**overrides):
    return TrainParams().model_copy(update=overrides)


def test_one_gpu_ddp_is_not_launched_and_inside_a_launch_nothing_relaunches():
    assert not needs_launch(_train(), env={})
    assert needs_launch(_train(num_processes=2), env={})
    assert needs_launch(_train(distributed="fsdp"), env={})  # FSDP even on one GPU (its own wrapping)
    assert not needs_launch(_train(num_processes=8, distributed="fsdp"), env={"LOCAL_RANK": "3"})


def test_ddp_plan_on_one_machine():
    command = launch_command(_train(num_processes=4), accelerate="acc", env={})
    assert command == ["acc", "launch", "--num_processes", "4", "--multi_gpu", "-m", "stages.train"]


def test_fsdp_plan_shards_with_the_qlora_settings():
    command = launch_command(_train(num_processes=8, distributed="fsdp"), accelerate="acc", env={})
    assert command[:4] == ["acc", "launch", "--num_processes", "8"]
    assert "--use_fsdp" in command and "--multi_gpu" not in command
    options = dict(zip(command[5::2], command[6::2]))
    for flag, value in FSDP_FLAGS.items():
        assert options[flag] == value
    assert options["--fsdp_sharding_strategy"] == "FULL_SHARD"
    assert command[-2:] == ["-m", "stages.train"]


def test_several_machines_pass_through_with_the_rank_from_the_environment():
    train = _train(num_processes=8, num_machines=2, main_process_ip="10.0.0.1", main_process_port=29600)
    command = launch_command(train, accelerate="acc", env={"MACHINE_RANK": "1"})
    options = dict(zip(command[2::2], command[3::2]))
    assert options["--num_processes"] == "16"  # accelerate counts processes over all machines
    assert options["--num_machines"] == "2" and options["--machine_rank"] == "1"
    assert options["--main_process_ip"] == "10.0.0.1" and options["--main_process_port"] == "29600"
    assert "--multi_gpu" in command
    assert machine_rank({"SLURM_NODEID": "3"}) == 3 and machine_rank({}) == 0


def test_several_machines_need_the_main_address():
    with pytest.raises(ParamsError, match="train.main_process_ip"):
        validate_params({"train": {"num_machines": 2}})
    with pytest.raises(ParamsError, match="train.distributed"):
        validate_params({"train": {"distributed": "deepspeed"}})


# --------------------------------------------------------------------------------------------
# The adapter, gathered from wrapped and sharded models

torch = pytest.importorskip("torch")


def _tiny_peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # trained-looking values, not peft's zeros
            torch.nn.init.normal_(parameter, std=0.1)
    return model


@pytest.fixture
def process_group():
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _files(directory):
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "adapter_model.safetensors"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_adapter_from_a_wrapped_or_sharded_model_is_the_one_gpu_file(tmp_path, process_group, mode):
    import json

    from stages.lib.distributed import save_adapter

    model = _tiny_peft_model()
    model.save_pretrained(tmp_path / "one_gpu", safe_serialization=True)  # what a one-GPU run writes
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    else:
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel

        # As transformers' Trainer wraps a peft model: LoRA layers in units of their own, flat
        # parameters (use_orig_params off), as accelerate launch is told in FSDP_FLAGS.
        wrapped = FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model),
                                           device_id=torch.device("cpu"), use_orig_params=False)
        assert any(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules() if m is not wrapped)
        # A training step through the sharded model, so the gathered values are live ones.
        wrapped(input_ids=torch.randint(0, 64, (1, 8))).logits.sum().backward()
    save_adapter(wrapped, tmp_path / mode, is_main=True)
    expected, written = _files(tmp_path / "one_gpu"), _files(tmp_path / mode)
    assert written.keys() == expected.keys() and len(written) == 2 * 7 * 2  # A and B of 7 layers x 2
    for key, tensor in expected.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    config = json.loads((tmp_path / mode / "adapter_config.json").read_text())
    reference = json.loads((tmp_path / "one_gpu" / "adapter_config.json").read_text())
    reference["target_modules"] = sorted(reference["target_modules"])  # save_adapter sorts peft's set
    assert config == reference
    # accelerate's FSDP keeps trainable weights in fp32; the adapter goes out in the run's own dtype.
    save_adapter(wrapped, tmp_path / f"{mode}-bf16", is_main=True, dtype=torch.bfloat16)
    cast = _files(tmp_path / f"{mode}-bf16")
    assert all(cast[k].dtype == torch.bfloat16 and torch.equal(cast[k], expected[k].to(torch.bfloat16))
               for k in expected)


def test_adapter_of_a_single_process_run_is_peft_s_own_file(tmp_path):
    # The train stage saves through save_adapter on one GPU and on CPU too (no process group).
    from stages.lib.distributed import save_adapter

    model = _tiny_peft_model()
    model.save_pretrained(tmp_path / "peft", safe_serialization=True)
    save_adapter(model, tmp_path / "stage", is_main=True)
    expected, written = _files(tmp_path / "peft"), _files(tmp_path / "stage")
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


def test_adapter_config_is_the_same_bytes_whatever_the_hash_seed(tmp_path):
    """peft writes target_modules (a set) in iteration order, which for strings changes with the
    process's hash seed: the same adapter then hashed differently in DVC on every run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("peft")
    code = (
        "import sys, torch, transformers, peft\n"
        "from stages.lib.distributed import save_adapter\n"
        "config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,\n"
        "    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)\n"
        "torch.manual_seed(0)\n"
        "model = peft.get_peft_model(transformers.LlamaForCausalLM(config),\n"
        "    peft.LoraConfig(r=2, target_modules='all-linear'))\n"
        "save_adapter(model, sys.argv[1], is_main=True)\n")
    root = Path(__file__).resolve().parents[1]
    written = []
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=root, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr[-2000:]
        written.append((out / "adapter_config.json").read_bytes())
    assert written[0] == written[1] == written[2]
    modules = json.loads(written[0])["target_modules"]
    assert modules == sorted(modules) and len(modules) == 7
