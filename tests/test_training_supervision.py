"""reports/train.json's supervision figures, and the train stage's refusal to train on nothing."""
import json

import pytest

from stages.lib.training import TrainError, supervision_stats, tokenize_records

SHORT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]}
LONG_PROMPT = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}


def test_supervised_share_is_the_masked_share_of_each_example(smollm2_tokenizer):
    rows, stats = tokenize_records([SHORT, LONG_PROMPT], smollm2_tokenizer, max_length=4096)
    shares = [sum(r["assistant_masks"]) / len(r["assistant_masks"]) for r in rows]
    assert stats["examples"] == 2 and stats["dropped_no_assistant_token"] == 0
    assert stats["supervised_share_min"] == round(min(shares), 4)
    assert stats["supervised_share_mean"] == round(sum(shares) / 2, 4)
    # "Hello there!<|im_end|>" is a handful of tokens; the long prompt's reply a sliver of its row.
    assert 0 < stats["supervised_share_min"] < 0.05 < stats["supervised_share_mean"] < 0.5
    assert stats["supervised_tokens"] == sum(sum(r["assistant_masks"]) for r in rows)


def test_truncation_that_leaves_no_assistant_token_is_counted(smollm2_tokenizer):
    rows, stats = tokenize_records([SHORT, LONG_PROMPT, LONG_PROMPT], smollm2_tokenizer, max_length=64)
    assert stats["examples"] == 1 and stats["dropped_no_assistant_token"] == 2
    assert supervision_stats([], 3)["supervised_share_min"] == 0.0


def test_train_stage_fails_clearly_when_no_token_is_supervised(smollm2_tokenizer, tmp_path):
    from stages.lib.params import Params
    from stages.lib.training import run_training

    smollm2_tokenizer.save_pretrained(tmp_path / "model")  # a tokenizer is all it gets to read
    train_path = tmp_path / "train.jsonl"
    train_path.write_text("".join(json.dumps(LONG_PROMPT) + "\n" for _ in range(3)))
    model_dir = str(tmp_path / "model")  # model.files names the same directory, as issue 20 requires
    params = Params.model_validate({"model": {"base": model_dir, "files": model_dir}, "train": {"max_length": 32}})
    with pytest.raises(TrainError, match=r"all 3 training examples lost every assistant token.*train.max_length=32"):
        run_training(params, train_path=train_path, validation_path=tmp_path / "none.jsonl",
                     adapter_dir=tmp_path / "adapter", live_dir=tmp_path / "live",
                     checkpoint_root=tmp_path / "checkpoints")
