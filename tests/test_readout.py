"""Readouts: the classification head's start, what `method=head` trains, a saved head's reload; special tokens."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from rigsa.apply import apply_adapter
from rigsa.config import compose
from rigsa.methods import Calibration, build_method
from rigsa.models import load_model
from rigsa.readout import AnswerToken, ClassifierHead, build_readout
from rigsa.run import run
from rigsa.tasks import build_task, render_prompts

from conftest import TINY, train_steps

CPU = torch.device("cpu")


def head_setup(tokenizer, *overrides: str):
    cfg = compose(TINY + ["task.readout=classifier_head", "task.train_size=32", "task.test_size=20", *overrides])
    model, _ = load_model(cfg.model, 0)
    data = build_task(cfg.task, tokenizer, 1024)
    return cfg, model, data, build_readout(cfg.task, data, model, tokenizer, cfg.seed)


def test_the_head_starts_as_the_lm_head_rows_of_the_label_words_and_scores_as_the_answer_token(tokenizer):
    _, model, data, readout = head_setup(tokenizer)
    assert isinstance(readout, ClassifierHead) and readout.trainable_parameters()[0].requires_grad
    lm_head = model.get_output_embeddings().weight
    assert torch.equal(readout.head.weight, lm_head[data.label_token_ids])
    batch = data.test.batch(torch.arange(8))
    with torch.no_grad():
        torch.testing.assert_close(readout.scores(model, batch), AnswerToken(data.label_token_ids).scores(model, batch),
                                   rtol=1e-5, atol=1e-5)  # the hidden state read is the one the LM head reads


def test_a_random_head_has_the_papers_std_and_follows_the_seed(tokenizer):
    _, model, _, readout = head_setup(tokenizer, "task.head_init=random")
    weight = readout.head.weight.detach()
    assert weight.std().item() == pytest.approx(0.06 / math.sqrt(64), rel=0.1)
    _, _, _, again = head_setup(tokenizer, "task.head_init=random")
    _, _, _, other = head_setup(tokenizer, "task.head_init=random", "seed=1")
    assert torch.equal(again.head.weight, weight) and not torch.equal(other.head.weight, weight)


def test_method_head_with_the_classifier_readout_changes_nothing_but_the_head(tokenizer, tmp_path):
    cfg, model, data, readout = head_setup(tokenizer, "method=head")
    before = copy.deepcopy(model.state_dict())
    start = readout.head.weight.detach().clone()
    method = build_method(cfg.method)
    model = method.attach(model, Calibration([], readout.loss, readout.kind))
    assert method.trainable_parameters() == []
    result = train_steps(model, method, cfg, data, tmp_path / "state.pt", steps=4, lr=1e-2, readout=readout)
    assert result.losses[-1] < result.losses[0]
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[name], before[name]) for name in before)
    assert not torch.equal(readout.head.weight, start)


@pytest.mark.parametrize("method_name", ["sparta", "lora"])
def test_a_saved_head_reloads_to_identical_scores(method_name, tokenizer, tmp_path):
    cfg, model, data, readout = head_setup(tokenizer, f"method={method_name}", "method.budget.density=0.1"
                                           if method_name == "sparta" else "method.r=4")
    method = build_method(cfg.method)
    model = method.attach(model, Calibration([], readout.loss, readout.kind))
    train_steps(model, method, cfg, data, tmp_path / "state.pt", steps=3, lr=1e-2, readout=readout)
    batch = data.test.batch(torch.arange(len(data.test)))
    model.eval()
    with torch.no_grad():
        trained = readout.scores(model, batch)
    method.save(tmp_path / "adapter")
    readout.save(tmp_path / "adapter")
    reloaded = apply_adapter(load_model(cfg.model, 0)[0], tmp_path / "adapter")
    assert reloaded.classifier_head.label_words == data.label_words
    with torch.no_grad():
        again = ClassifierHead(reloaded.classifier_head, data.label_words).scores(reloaded.eval(), batch)
    torch.testing.assert_close(again, trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained, AnswerToken(data.label_token_ids).scores(load_model(cfg.model, 0)[0], batch))


# ---------------------------------------------------------------- special tokens without a chat template
def with_special_tokens(tokenizer, template: str):
    """A copy of the tokenizer with no chat template whose post-processor writes `template` (Llama-style BOS)."""
    from tokenizers.processors import TemplateProcessing

    other = copy.deepcopy(tokenizer)
    other.chat_template = None
    specials = [("<|im_start|>", tokenizer.convert_tokens_to_ids("<|im_start|>")),
                ("<|im_end|>", tokenizer.convert_tokens_to_ids("<|im_end|>"))]
    other.backend_tokenizer.post_processor = TemplateProcessing(single=template, special_tokens=specials)
    return other


def test_a_tokenizer_with_a_bos_token_and_no_chat_template_gets_its_bos_before_every_prompt(tokenizer):
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    llama_like = with_special_tokens(tokenizer, "<|im_start|> $A")
    assert llama_like("hi")["input_ids"][0] == bos and llama_like.chat_template is None
    plain = llama_like("Which digit?\nAnswer: ", add_special_tokens=False)["input_ids"]
    assert render_prompts(["Which digit?"], llama_like, chat_template=True)[0].tolist() == [bos] + plain
    # a tokenizer that also appends a token (an EOS) gets only the leading one: the answer follows the prompt
    both = with_special_tokens(tokenizer, "<|im_start|> $A <|im_end|>")
    assert render_prompts(["Which digit?"], both, chat_template=True)[0].tolist() == [bos] + plain
    assert render_prompts(["Which digit?"], tokenizer, chat_template=False)[0].tolist() == plain  # SmolLM2: none
    data = build_task(compose(TINY + ["task.test_size=10"]).task, llama_like, 1024)  # every task and readout
    assert all(prompt[0].item() == bos and (prompt == bos).sum() == 1 for prompt in data.test.prompts)


def test_a_head_only_run_with_the_classifier_readout_saves_and_reloads_the_head_alone(tiny_cfg, tmp_path,
                                                                                       private_cache, tokenizer):
    cfg = tiny_cfg("method=head", "task.readout=classifier_head", "train.lr=1e-2", "eval=target")
    results = run(cfg, tmp_path / "run")
    assert results["trainable_params"] == results["target"]["head_params"] == 10 * 64  # classes x hidden size
    base, _ = load_model(cfg.model, 0)
    reloaded = apply_adapter(load_model(cfg.model, 0)[0], tmp_path / "run" / "adapter")
    head = reloaded._modules.pop("classifier_head")
    assert all(torch.equal(value, base.state_dict()[name]) for name, value in reloaded.state_dict().items())
    data = build_task(cfg.task, tokenizer, 1024)
    readout = ClassifierHead(head, data.label_words)
    from rigsa.evaluate import target_accuracy

    assert target_accuracy(reloaded, data.test, readout, 8, CPU, "float32") == {
        key: results["target"][key] for key in ("accuracy", "metrics", "answer_counts")} | {"n": 40}


def test_training_with_the_head_resumes_from_a_checkpoint_bit_for_bit(tokenizer, tmp_path):
    def trained(stops: list[int], folder):
        cfg, model, data, readout = head_setup(tokenizer, "method=lora", "method.r=2")
        method = build_method(cfg.method)
        torch.manual_seed(0)  # LoRA's initialisation, as run() seeds it
        model = method.attach(model, Calibration([], readout.loss, readout.kind))
        for steps in stops:  # each call resumes from the checkpoint the previous one left
            train_steps(model, method, cfg, data, folder / "state.pt", steps=steps, lr=1e-2, readout=readout)
        return readout.head.weight.detach().clone(), [p.detach().clone() for p in method.trainable_parameters()]

    head, adapter = trained([4], tmp_path / "straight")
    resumed_head, resumed_adapter = trained([2, 4], tmp_path / "resumed")
    assert torch.equal(resumed_head, head) and all(torch.equal(a, b) for a, b in zip(resumed_adapter, adapter))
    assert not torch.equal(head, trained([2], tmp_path / "short")[0])  # the test can tell 2 steps from 4
