"""Assistant-only loss masks on the real chat templates of the major model families
(tests/data/chat_templates/, sources in its README), each on three chat shapes: the masked tokens
must decode to exactly the assistant replies, each followed by the token(s) that end its turn,
and nothing of system or user text or role headers."""
import pytest

from conftest import chat_families
from stages.lib.chat import (TemplateError, assistant_spans, end_of_turn_ids, prepare_messages, render_prompt,
                             tokenize_conversation)

FAMILIES = chat_families()

SHAPES = {
    "single_turn": [
        {"role": "user", "content": "My invoice is wrong, I was charged twice."},
        {"role": "assistant", "content": '{"category": "billing", "priority": "high"}'}],
    "with_system": [
        {"role": "system", "content": "Reply with one JSON object."},
        {"role": "user", "content": "The app crashes when I log in é."},
        {"role": "assistant", "content": '{"category": "bug", "product": "mobile app"}'}],
    "multi_turn": [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "Hi, my router keeps rebooting."},
        {"role": "assistant", "content": "Sorry to hear that. Which model is it?"},
        {"role": "user", "content": "The AX3000."},
        {"role": "assistant", "content": "Please update its firmware to 2.1 and tell me if it still reboots."}],
}


def masked_runs(tokenizer, row) -> list[str]:
    """The masked tokens, decoded run by run (one run per assistant turn)."""
    runs, current = [], []
    for token, flag in zip(row["input_ids"], row["assistant_masks"]):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def expected_runs(spec, messages) -> list[str]:
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    ends = [spec.get("end_of_earlier_turn", spec["end_of_turn"])] * (len(replies) - 1) + [spec["end_of_turn"]]
    return [reply + end for reply, end in zip(replies, ends)]


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mask_is_exactly_the_replies_and_their_end_of_turn(family_tokenizer, family, shape):
    tokenizer, messages = family_tokenizer(family), SHAPES[shape]
    row = tokenize_conversation(tokenizer, messages, max_length=4096)
    assert len(row["input_ids"]) == len(row["assistant_masks"])
    # Mistral's templates put a space before the reply that the reply's first token carries.
    assert [run.removeprefix(" ") for run in masked_runs(tokenizer, row)] == expected_runs(FAMILIES[family], messages)
    # The ids are the template's own tokenisation, so training sees what generation sees (GLM's
    # template ends the last reply with nothing: the eos the mask teaches is appended).
    template_ids = tokenizer.apply_chat_template(prepare_messages(tokenizer, messages), tokenize=True,
                                                 return_dict=True)["input_ids"]
    appended = row["input_ids"][len(template_ids):]
    assert row["input_ids"][:len(template_ids)] == list(template_ids)
    assert appended in ([], [tokenizer.eos_token_id])
    # Every system and user text is in the unmasked part (Gemma folds the system prompt into the
    # first user turn, never into the mask).
    unmasked = tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if not m])
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"] in unmasked


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_prompt_is_what_precedes_the_reply_in_training(family_tokenizer, family):
    """Evaluation and generation continue exactly the text the last reply followed in training
    (compared as text: the test tokenizer's whitespace merges differ from the families' own)."""
    tokenizer = family_tokenizer(family)
    messages = SHAPES["multi_turn"]
    text, spans = assistant_spans(tokenizer, messages)
    prompt = render_prompt(tokenizer, messages[:-1])
    assert text.startswith(prompt)
    assert spans[-1][0] == len(prompt)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_end_of_turn_tokens_include_what_ends_the_last_reply(family_tokenizer, family):
    tokenizer = family_tokenizer(family)
    names = tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer))
    last = tokenizer(FAMILIES[family]["end_of_turn"], add_special_tokens=False)["input_ids"][-1]
    assert tokenizer.convert_ids_to_tokens(last) in names


REASONING = [
    {"role": "user", "content": "What is 6 x 7?"},
    {"role": "assistant", "content": "<think>\nsix sevens\n</think>\n\n42"},
    {"role": "user", "content": "And 6 x 8?"},
    {"role": "assistant", "content": "<think>\nsix eights\n</think>\n\n48"},
]


@pytest.mark.parametrize("family,expected", [
    # Qwen3 and GLM-4.5 drop earlier turns' reasoning and keep the last turn's: the mask follows.
    ("qwen3", ["42<|im_end|>", "<think>\nsix eights\n</think>\n\n48<|im_end|>"]),
    ("glm4_5", ["42<|user|>", "<think>six eights</think>\n48<|endoftext|>"]),
    # Qwen2.5 knows nothing of reasoning: it is part of the reply, as written.
    ("qwen2_5", ["<think>\nsix sevens\n</think>\n\n42<|im_end|>", "<think>\nsix eights\n</think>\n\n48<|im_end|>"]),
    # The R1 distills' template drops every turn's reasoning, up to the blank line after it.
    ("deepseek_r1_distill", ["\n\n42<｜end▁of▁sentence｜>", "\n\n48<｜end▁of▁sentence｜>"]),
])
def test_reasoning_is_masked_where_the_template_keeps_it(family_tokenizer, family, expected):
    tokenizer = family_tokenizer(family)
    assert masked_runs(tokenizer, tokenize_conversation(tokenizer, REASONING, 4096)) == expected


@pytest.mark.parametrize("template_file", ["llama3_training.jinja", "gemma3_training.jinja"])
def test_generation_markers_are_used_where_present(family_tokenizer, template_file):
    """TRL's training templates mark the assistant output with {% generation %}."""
    import copy

    from conftest import CHAT_TEMPLATES

    family = "llama3" if template_file.startswith("llama3") else "gemma3"
    tokenizer = copy.deepcopy(family_tokenizer(family))
    tokenizer.chat_template = (CHAT_TEMPLATES / template_file).read_text(encoding="utf-8")
    messages = SHAPES["multi_turn"] if family == "llama3" else SHAPES["multi_turn"][1:]
    runs = masked_runs(tokenizer, tokenize_conversation(tokenizer, messages, 4096))
    expected = expected_runs(FAMILIES[family], messages)
    # The markers are the template author's word: TRL's Gemma 3 one also marks the newline after.
    assert len(runs) == len(expected)
    assert all(run.startswith(want) and not run[len(want):].strip() for run, want in zip(runs, expected))


def _with_template(tokenizer, template: str):
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    tokenizer.name_or_path = "acme/odd-model"
    return tokenizer


CHATML_LOOP = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{CONTENT}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("content,why", [
    ("{{ m.content | upper }}", "rewrites"),                       # the reply is not what was written
    # text after the reply before any end-of-turn token: not refused as a rewrite, but as a reply
    # whose end cannot be learned
    ("{{ m.content }}{% if m.role == 'assistant' %} (reviewed){% endif %}", "end-of-turn"),
])
def test_a_template_that_rewrites_replies_is_refused_with_what_to_set(smollm2_tokenizer, content, why):
    tokenizer = _with_template(smollm2_tokenizer, CHATML_LOOP.replace("{CONTENT}", content))
    with pytest.raises(TemplateError, match=why) as error:
        tokenize_conversation(tokenizer, SHAPES["single_turn"], 512)
    assert "acme/odd-model" in str(error.value) and "model.chat_template" in str(error.value)


def test_a_template_without_end_of_turn_is_refused(smollm2_tokenizer):
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    tokenizer = _with_template(smollm2_tokenizer, template)
    with pytest.raises(TemplateError, match="end-of-turn"):
        tokenize_conversation(tokenizer, SHAPES["multi_turn"], 512)


def test_a_template_that_reorders_turns_still_masks_right(smollm2_tokenizer):
    """No prefix of the conversation renders as a prefix of the whole here (newest turn first),
    which defeated rendering prefix by prefix; locating each reply does not need it."""
    template = ("{% for m in messages | reverse %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                "{% endfor %}")
    tokenizer = _with_template(smollm2_tokenizer, template)
    row = tokenize_conversation(tokenizer, SHAPES["multi_turn"], 512)
    assert sorted(masked_runs(tokenizer, row)) == sorted(expected_runs(FAMILIES["smollm2"], SHAPES["multi_turn"]))


def test_model_chat_template_replaces_the_tokenizers_own(smollm2_tokenizer, tmp_path):
    """params model.chat_template: a .jinja file or the template text itself."""
    from conftest import CHAT_TEMPLATES
    from stages.lib.modeling import ResolvedModel, load_tokenizer

    smollm2_tokenizer.save_pretrained(tmp_path / "tok")
    gemma = (CHAT_TEMPLATES / "gemma.jinja").read_text(encoding="utf-8")
    for value in (str(CHAT_TEMPLATES / "gemma.jinja"), gemma):
        tokenizer = load_tokenizer(ResolvedModel(str(tmp_path / "tok"), None, False, "x", value))
        assert tokenizer.chat_template == gemma
