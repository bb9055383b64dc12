"""Target metrics against independent references: a model whose answer we control, and padding-free logits."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rigsa.config import compose
from rigsa.evaluate import answer_logits, target_accuracy
from rigsa.models import load_model
from rigsa.readout import AnswerToken

from conftest import TINY

CPU = torch.device("cpu")


class AlwaysAnswers(nn.Module):
    """Logits that put the largest score on a token that is no answer, and among the ten answer tokens the
    largest on `digit`: an argmax over the answer tokens reads `digit`, one over the whole vocabulary does not."""

    def __init__(self, vocab_size: int, answer_ids: torch.Tensor, digit: int, distractor: int):
        super().__init__()
        self.scores = torch.zeros(vocab_size)
        self.scores[answer_ids] = torch.arange(10, dtype=torch.float32) / 100  # a fixed order among the answers
        self.scores[answer_ids[digit]] = 5.0
        self.scores[distractor] = 10.0

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, output_hidden_states):
        return SimpleNamespace(logits=self.scores.expand(input_ids.shape[0], logits_to_keep, -1).clone())


def test_accuracy_of_a_model_that_always_answers_3_is_the_share_of_3s(tiny_data, tokenizer):
    answer_ids = tiny_data.label_token_ids
    readout = AnswerToken(answer_ids)
    distractor = tokenizer.convert_tokens_to_ids("A")
    assert distractor not in answer_ids.tolist()
    model = AlwaysAnswers(len(tokenizer), answer_ids, digit=3, distractor=distractor)
    digits = tiny_data.test.classes
    for limit in (13, 0):  # a prefix (1 three in 13) and the whole split (2 in 20)
        n = limit or len(digits)
        result = target_accuracy(model, tiny_data.test, readout, 4, CPU, "float32", limit)
        assert result["accuracy"] == pytest.approx(float((digits[:n] == 3).sum()) / n)
        assert result["answer_counts"] == [0, 0, 0, n, 0, 0, 0, 0, 0, 0] and result["n"] == n
    assert target_accuracy(model, tiny_data.test, readout, 4, CPU, "float32", 13)["accuracy"] == 1 / 13


def absolute_positions_model(vocab_size: int) -> nn.Module:
    """A tiny random GPT-2 (learned absolute position embeddings): a wrong position id changes its logits,
    where a RoPE model (Llama) is blind to a constant shift of a row's positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=512, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batch_gives_the_logits_of_each_prompt_alone(family, tokenizer):
    """Prompts of very different lengths (GLUE and IMDB have them): padding and position ids must not matter."""
    model = load_model(compose(TINY).model, 0)[0] if family == "llama" else absolute_positions_model(len(tokenizer))
    prompts = ["Is this positive? Yes", "Review: " + "the film was long and slow, " * 30 + "Sentiment:", "Hi"]
    batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert max(lengths) > 20 * min(lengths) and tokenizer.padding_side == "left"
    with torch.no_grad():
        together = answer_logits(model, batch)
        for row, prompt in enumerate(prompts):
            alone = answer_logits(model, tokenizer([prompt], add_special_tokens=False, return_tensors="pt"))
            torch.testing.assert_close(together[row], alone[0], rtol=1e-4, atol=1e-4)


def test_a_batch_is_padded_to_its_own_longest_prompt_and_scores_each_prompt_as_alone(tokenizer):
    from rigsa.tasks import Split

    model = load_model(compose(TINY).model, 0)[0]
    prompts = [torch.tensor(tokenizer(text)["input_ids"]) for text in ("a short one", "Review: " + "long " * 90, "hi")]
    split = Split(prompts, torch.tensor([0, 1, 0]), tokenizer.pad_token_id)
    batch = split.batch(torch.tensor([0, 2]))
    assert batch["input_ids"].shape == (2, prompts[0].numel())  # not the split's longest (the 90-word review)
    assert batch["attention_mask"].tolist()[1] == [0] * (prompts[0].numel() - prompts[2].numel()) + [1] * prompts[2].numel()
    with torch.no_grad():
        together = answer_logits(model, split.batch(torch.arange(3)))
        for row, prompt in enumerate(prompts):
            alone = answer_logits(model, split.batch(torch.tensor([row])))
            assert alone.shape[0] == 1 and split.batch(torch.tensor([row]))["input_ids"].shape[1] == prompt.numel()
            torch.testing.assert_close(together[row], alone[0], rtol=1e-4, atol=1e-4)
