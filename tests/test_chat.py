"""The assistant-only loss mask, on SmolLM2's real chat template."""

from stages.lib.chat import tokenize_conversation


def _masked_text(tokenizer, row):
    return tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m])


def test_mask_covers_exactly_the_answer_and_its_end_of_turn(smollm2_tokenizer):
    messages = [{"role": "system", "content": "Reply in JSON."},
                {"role": "user", "content": "My invoice is wrong é"},
                {"role": "assistant", "content": '{"category": "billing"}'}]
    row = tokenize_conversation(smollm2_tokenizer, messages, max_length=512)
    # The ids are the template's own tokenisation: training sees what generation will see.
    assert row["input_ids"] == smollm2_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    masked = _masked_text(smollm2_tokenizer, row)
    # The end-of-turn token is trained on, so the tuned model learns to stop.
    assert masked.strip() == '{"category": "billing"}<|im_end|>'
    assert len(row["input_ids"]) == len(row["assistant_masks"])


def test_every_assistant_turn_is_trained_in_multi_turn(smollm2_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]
    masked = _masked_text(smollm2_tokenizer, tokenize_conversation(smollm2_tokenizer, messages, 512))
    assert "Hello!" in masked and "Goodbye!" in masked
    assert "Hi" not in masked.replace("Hello", "") and "Bye" not in masked.replace("Goodbye", "")
    assert "user" not in masked and "system" not in masked


def test_truncation_that_removes_the_answer_drops_the_example(smollm2_tokenizer):
    messages = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    assert tokenize_conversation(smollm2_tokenizer, messages, max_length=32) is None
    row = tokenize_conversation(smollm2_tokenizer, messages, max_length=4096)
    assert sum(row["assistant_masks"]) >= 2

# Templates that render prefixes inconsistently, rewrite replies or end them without an end-of-turn
# token: tests/test_chat_families.py (real templates of 20 families, and the refusals).
