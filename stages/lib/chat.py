"""Chat templating in one place: the conversation as the model's own chat template renders it,
the assistant-only loss mask that training and the evaluation loss share, and the token ids
generation stops at (evaluation, the generate command and export all use `stop_ids`).

Kept apart from training and generation so that neither imports the other: `evaluate_base`
depends on this module, not on the training code, and stays cached when training changes.

How the loss mask is found (`assistant_spans`): the conversation is rendered once as it is, and
once per assistant turn with that turn's content replaced by a sentinel. Whatever the template
writes before the sentinel must be a prefix of the real rendering and whatever it writes after
must be a suffix; what lies between, in the real rendering, is that reply exactly as the template
rendered it (trimmed, its reasoning dropped, ...). This needs no prefix of the conversation to
render consistently, which many templates do not: Qwen3 drops earlier turns' reasoning, Mistral
moves the system prompt into the last user turn, Phi-3 and the first Phi-4 template open the
assistant turn inside the user turn. Templates with `{% generation %}` markers are taken at their
word instead. When neither works the template is refused with a message saying what to set;
a silently wrong mask is the one outcome not allowed.
"""
from __future__ import annotations

# Letters only: survives trim, strip, split on </think>, and is one run of ordinary tokens.
SENTINEL = "QZXREPLYSENTINELQZX"
# What Gemma 3's and Mistral's own templates put between a system prompt they fold into a user
# turn and that turn; used where the template cannot place the system prompt itself.
FOLD_SEPARATOR = "\n\n"


class TemplateError(ValueError):
    """The chat template cannot be used to build a correct loss mask; the message says why and
    what to set instead."""


def _template_error(tokenizer, why: str) -> TemplateError:
    name = getattr(tokenizer, "name_or_path", "") or "this model"
    return TemplateError(
        f"{name}: {why}. Set model.chat_template in params.yaml to a template that renders each "
        "assistant reply followed by an end-of-turn token (a .jinja file, or one with "
        "{% generation %} markers around the assistant replies)")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _system_handling(tokenizer) -> str:
    """How the template treats a leading system message: "native" (renders it), "refused" (raises,
    Gemma 1/2: "System role not supported") or "dropped_in_training" (renders it only when the
    chat ends with a user turn: Mistral v0.3 and Nemo put it in the last user turn, so a chat that
    ends with the assistant's reply loses it). Probed once per template."""
    cache = getattr(tokenizer, "_qlora_system_handling", None)
    if cache is not None and cache[0] == tokenizer.chat_template:
        return cache[1]
    system = {"role": "system", "content": "SYSTEMPROBE"}
    user, reply = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}
    try:
        dropped = "SYSTEMPROBE" not in _render(tokenizer, [system, user, reply])
        handling = "dropped_in_training" if dropped else "native"
    except Exception:  # jinja's TemplateError from raise_exception, or anything else it raises
        handling = "refused"
    try:
        tokenizer._qlora_system_handling = (tokenizer.chat_template, handling)
    except AttributeError:
        pass
    return handling


def _fold_system(messages: list[dict], into_last: bool) -> list[dict]:
    system, rest = messages[0], list(messages[1:])
    users = [i for i, m in enumerate(rest) if m["role"] == "user"]
    if not users:
        return [{"role": "user", "content": system["content"]}, *rest]
    if into_last:  # the last user turn before the last reply, where inference would put it
        replies = [i for i, m in enumerate(rest) if m["role"] == "assistant"]
        before = [i for i in users if not replies or i < replies[-1]] or users
        at = before[-1]
    else:
        at = users[0]
    rest[at] = {**rest[at], "content": system["content"] + FOLD_SEPARATOR + rest[at]["content"]}
    return rest


def prepare_messages(tokenizer, messages: list[dict]) -> list[dict]:
    """The messages as the template can take them, the system prompt kept in the prompt and out
    of the loss mask. A template without a system role gets it folded into the first user turn
    (as Gemma 3's template does itself); a template that drops it from a chat ending with a reply
    (Mistral v0.3, Nemo) gets it folded into the last user turn, where the template itself puts
    it at inference, so training sees the prompt generation will see."""
    if not messages or messages[0]["role"] != "system":
        return messages
    handling = _system_handling(tokenizer)
    if handling == "refused":
        return _fold_system(messages, into_last=False)
    if handling == "dropped_in_training" and messages[-1]["role"] == "assistant":
        return _fold_system(messages, into_last=True)
    return messages


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text the model continues at evaluation and generation: exactly what precedes a reply
    in the text it was trained on (the conversation rendered with one more assistant turn, cut
    where that reply starts). Usually that is the template's generation prompt; where it is not,
    training wins: Qwen3 and GLM-4.5 put an empty think block before a reply without reasoning,
    GPT-OSS opens the final channel, Command R7B writes <|START_RESPONSE|>. A template that
    refuses a trailing assistant turn gets its own generation prompt."""
    try:
        probe = prepare_messages(tokenizer, [*messages, {"role": "assistant", "content": SENTINEL}])
        rendered = _render(tokenizer, probe)
    except Exception:  # e.g. a template that checks the last turn is the user's
        rendered = ""
    if rendered.count(SENTINEL) == 1:
        return rendered[: rendered.index(SENTINEL)]
    return _render(tokenizer, prepare_messages(tokenizer, messages), add_generation_prompt=True)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `render_prompt` (the template writes bos itself where the model wants it)."""
    return list(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])


def render_conversation(tokenizer, messages: list[dict]) -> str:
    """The whole conversation as the chat template renders it for training."""
    return _render(tokenizer, prepare_messages(tokenizer, messages))


def has_generation_markers(template: str | None) -> bool:
    import re

    return bool(template) and re.search(r"{%-?\s*generation\s*-?%}", template) is not None


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant reply in it, as the
    template rendered the reply (see the module docstring for the method)."""
    messages = prepare_messages(tokenizer, messages)
    text = _render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"] if isinstance(message["content"], str) else ""
        # A reply with its reasoning ("<think>...</think>answer"): the probe keeps the reasoning,
        # so the template renders (or drops) it exactly as in the real text; only the answer is
        # replaced. Where the template kept the reasoning, it joins the span below.
        reasoning = content[: content.rindex(THINK_CLOSE) + len(THINK_CLOSE)] if THINK_CLOSE in content else ""
        probe = list(messages)
        probe[index] = {**message, "content": reasoning + SENTINEL}
        rendered = _render(tokenizer, probe)
        at = rendered.find(SENTINEL)
        if at < 0 or rendered.count(SENTINEL) != 1:
            raise _template_error(tokenizer, f"the chat template does not render assistant turn {index} "
                                             "as its content")
        before, after = rendered[:at], rendered[at + len(SENTINEL):]
        if len(before) + len(after) > len(text) or not (text.startswith(before) and text.endswith(after)):
            raise _template_error(tokenizer, f"the text around assistant turn {index} depends on the "
                                             "reply's content, so the reply cannot be located")
        start, end = len(before), len(text) - len(after)
        reply = text[start:end]
        answer = content[len(reasoning):]
        # The template may trim the reply or drop its reasoning, never change or add to it.
        if reply.strip() not in answer or (answer.strip() and not reply.strip()):
            raise _template_error(tokenizer, f"the chat template rewrites assistant turn {index} "
                                             f"(renders {reply[:40]!r} for {answer[:40]!r})")
        if reasoning:
            start = _kept_reasoning_start(before, reasoning, floor=spans[-1][1] if spans else 0) or start
        spans.append((start, end))
    return text, spans


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _kept_reasoning_start(before: str, reasoning: str, floor: int) -> int | None:
    """Where the think block the template rendered for this reply starts, if it kept one: the
    last "<think>" before the reply, after the previous reply, whose body is this reasoning."""
    thought = reasoning[: -len(THINK_CLOSE)].split(THINK_OPEN)[-1].strip()
    opening = before.rfind(THINK_OPEN, floor)
    if opening < 0:
        return None
    block = before[opening + len(THINK_OPEN):]
    closing = block.rfind(THINK_CLOSE)
    if closing < 0 or block[:closing].strip() != thought or block[closing + len(THINK_CLOSE):].strip():
        return None
    return opening


def special_ids(tokenizer) -> set[int]:
    """Control tokens: the tokenizer's special tokens and added tokens marked special."""
    return set(tokenizer.all_special_ids) | {
        i for i, token in tokenizer.added_tokens_decoder.items() if token.special}


def _mask_from_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the mask: 1 on every token that overlaps a reply, and on the
    end-of-turn tokens right after it: the control tokens up to and including the first eos
    (Command R7B writes <|END_RESPONSE|><|END_OF_TURN_TOKEN|>), else the first control token
    (<|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>, GLM's <|user|>). A reply that ends the text
    with no end-of-turn token after it (GLM) gets the eos token appended, so the model learns
    to stop; a reply followed by ordinary text is refused."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    control, eos = special_ids(tokenizer), tokenizer.eos_token_id
    mask = [0] * len(ids)
    for number, (start, end) in enumerate(spans):
        inside = [k for k, (lo, hi) in enumerate(offsets) if lo < end and hi > start]
        for k in inside:
            mask[k] = 1
        # The token right after the reply (an empty reply has none of its own: only its end of
        # turn is learned).
        k = inside[-1] + 1 if inside else next((j for j, (lo, _) in enumerate(offsets) if lo >= end), len(ids))
        if k < len(ids) and ids[k] in control:
            first = k
            while k < len(ids) and ids[k] in control and ids[k] != eos:
                k += 1
            last = k if (k < len(ids) and ids[k] == eos) else first
            for j in range(first, last + 1):
                mask[j] = 1
        elif k == len(ids) and number == len(spans) - 1 and eos is not None:
            ids.append(eos)
            offsets.append((len(text), len(text)))
            mask.append(1)
        else:
            raise _template_error(tokenizer, "the chat template writes no end-of-turn token after an "
                                             "assistant reply, so the model could not learn to stop")
    return ids, mask


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> dict | None:
    """Token ids of the conversation in the model's own chat template, with a mask that is 1
    exactly on the assistant replies and the end-of-turn token(s) that stop each one (so the
    model learns to stop), and 0 on system and user text and on role headers. Returns None when
    truncation to `max_length` leaves no assistant token to learn from."""
    if not any(m["role"] == "assistant" for m in messages):
        return None
    if has_generation_markers(tokenizer.chat_template):
        encoded = tokenizer.apply_chat_template(prepare_messages(tokenizer, messages), tokenize=True,
                                                return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
        if not any(mask):
            raise _template_error(tokenizer, "the chat template's {% generation %} markers mark no token")
    else:
        text, spans = assistant_spans(tokenizer, messages)
        ids, mask = _mask_from_spans(tokenizer, text, spans)
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        return None
    return {"input_ids": ids, "assistant_masks": mask}


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos plus the control token the chat
    template writes right after an assistant reply (<|im_end|> for ChatML, <|eot_id|> for Llama 3,
    <end_of_turn> for Gemma, <|end|> for Phi-3 and GPT-OSS's earlier turns), found in a two-turn
    chat. Without them in generation_config.json, tools that stop at `eos_token_id` only would
    let the model run on into a made-up next user turn."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "two"}]
    try:
        row = tokenize_conversation(tokenizer, probe, max_length=1 << 20)
    except Exception:  # a template that refuses this shape: fall back to eos alone
        row = None
    if row is not None:
        control = special_ids(tokenizer)
        ids.update(t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m and t in control)
    return sorted(ids)


def stop_ids(model, tokenizer) -> list[int]:
    """Every id generation should stop at: the generation config's eos ids and the turn ends."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*configured, *end_of_turn_ids(tokenizer)] if isinstance(i, int)})
