"""The packed attention's CPU fallback keeps the examples of a packed row apart."""
import pytest


def test_packed_attention_fallback_keeps_examples_apart():
    """On CPU the registered attention builds a block-diagonal mask from restarting position_ids:
    the logits of a packed row equal those of each example alone."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from stages.lib.packing import PACKED_ATTENTION, register_packed_attention

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    model = transformers.LlamaForCausalLM(config).eval()
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    lengths = [5, 9, 3]
    ids = [torch.randint(0, 64, (n,)) for n in lengths]
    packed_ids = torch.cat(ids)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(input_ids=packed_ids, position_ids=positions).logits[0]
        alone = torch.cat([model(input_ids=i[None]).logits[0] for i in ids])
        # The trap docs/design.md#packed-rows describes: an all-ones mask makes SDPA attend across examples.
        model.set_attn_implementation("sdpa")
        leaky = model(input_ids=packed_ids, position_ids=positions,
                      attention_mask=torch.ones_like(packed_ids)).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    assert (leaky - alone).abs().max() > 1e-2  # the check can see attention across examples
