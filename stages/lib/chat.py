"""Chat templating in one place: the conversation as the model's own chat template renders it,
the assistant-only loss mask that training and the evaluation loss share, and the token ids
generation stops at (evaluation, the generate command and export all use `stop_ids`).

Kept apart from training and generation so that neither imports the other: `evaluate_base`
depends on this module, not on the training code, and stays cached when training changes.
"""
from __future__ import annotations


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation as the chat template renders it, followed by the generation prompt (the
    text that opens an assistant turn): what the model continues at evaluation and generation."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class TemplateError(ValueError):
    """The chat template does not render conversations prefix by prefix, so masks cannot be built."""


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> dict | None:
    """Token ids of the conversation in the model's own chat template, with a mask that is 1
    exactly on the assistant turns' tokens, end-of-turn token included (so the model learns to
    stop). Returns None when truncation to `max_length` leaves no assistant token to learn from.

    The spans come from rendering the conversation prefix by prefix: the text an assistant turn
    adds is what lies between "everything before it + generation prompt" and "everything up to
    and including it". This works for any template that renders prefixes consistently (ChatML,
    Llama 3, Mistral, ...) without `{% generation %}` markers, which most templates lack.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False,
                                               add_generation_prompt=True) if index else ""
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise TemplateError("the chat template does not render conversation prefixes "
                                "consistently; cannot locate assistant turns for the loss mask")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in encoded["offset_mapping"]]
    input_ids = encoded["input_ids"][:max_length]
    mask = mask[:max_length]
    if not any(mask):
        return None
    return {"input_ids": input_ids, "assistant_masks": mask}


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos plus the special token the chat
    template writes right after an assistant message (<|im_end|> for ChatML, <|eot_id|> for
    Llama 3). Without the latter in generation_config.json, tools that stop at `eos_token_id`
    only would let the model run on into a made-up next user turn."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    probe = "XQZPROBE"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False)
    except Exception:  # a template that refuses this shape: fall back to eos alone
        text = ""
    if probe in text:
        after = text[text.rindex(probe) + len(probe):]
        following = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        special = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        if following and following[0] in special:
            ids.append(following[0])
    return sorted(set(ids))


def stop_ids(model, tokenizer) -> list[int]:
    """Every id generation should stop at: the generation config's eos ids and the turn ends."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*configured, *end_of_turn_ids(tokenizer)] if isinstance(i, int)})
