"""answer_loss runs the LM head on the labelled (assistant) positions only, to keep the evaluate
stage's memory low; it must give the same loss as the full-logits cross-entropy, for a plain
model and for a PEFT model (whose adapters must count)."""
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _full_logits_loss(model, tokenizer, conversations):
    from stages.lib.chat import tokenize_conversation

    total, count = 0.0, 0
    with torch.no_grad():
        for conversation in conversations:
            row = tokenize_conversation(tokenizer, conversation, 512)
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([[t if m else -100 for t, m in zip(row["input_ids"], row["assistant_masks"])]])
            logits = model(input_ids=ids).logits.float()
            total += torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100,
                                                       reduction="sum").item()
            count += int((labels[0, 1:] != -100).sum())
    return total / count


@pytest.mark.parametrize("with_adapter", [False, True])
def test_labelled_positions_loss_equals_full_logits_loss(smollm2_tokenizer, with_adapter):
    from stages.lib.generation import answer_loss

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    if with_adapter:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear",
                                                           init_lora_weights=False)).eval()
    conversations = [[{"role": "user", "content": "Where is my order #1234?"},
                      {"role": "assistant", "content": '{"category": "shipping"}'}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello! How can I help you today?"}]]
    smollm2_tokenizer.pad_token = smollm2_tokenizer.pad_token or smollm2_tokenizer.eos_token
    mean, perplexity = answer_loss(model, smollm2_tokenizer, conversations, max_length=512, batch_size=2)
    expected = _full_logits_loss(model, smollm2_tokenizer, conversations)
    assert mean == pytest.approx(expected, rel=1e-5)
    assert perplexity == pytest.approx(math.exp(expected), rel=1e-4)
