"""The seed's grokking transformer: shape, parameter count, equality with the seed's modules, causality, training."""

import math

import pytest
import torch
from torch import nn

from benchmarks.grokking.baseline import (
    BaselineSchedule,
    build_baseline_model,
    count_parameters,
    fit_baseline,
    learning_rate_at,
    seed_encoding,
    train_baseline,
)
from fusion_llm.data.grokking import VOCABULARY, task_examples

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


SEED_FORMAT_KEYS = {"final_train_loss", "final_val_loss", "final_train_acc", "final_val_acc", "step_val_acc_99"}


class SeedDecoderBlock(nn.Module):
    """The seed's block as it wrote it: nn.MultiheadAttention, (T, B, C) layout, -inf upper mask."""

    def __init__(self, width, heads):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads)
        self.self_attn_norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.ffn_norm = nn.LayerNorm(width)

    def forward(self, x):
        mask = torch.triu(torch.full((len(x), len(x)), -float("inf")), diagonal=1)
        attended, _ = self.self_attn(x, x, x, attn_mask=mask)
        x = self.self_attn_norm(x + attended)
        return self.ffn_norm(x + self.ffn(x))


class SeedTransformer(nn.Module):
    def __init__(self, vocab_size, output_size):
        super().__init__()
        self.token_embeddings = nn.Embedding(vocab_size, 128)
        self.position_embeddings = nn.Embedding(5, 128)
        self.model = nn.Sequential(SeedDecoderBlock(128, 4), SeedDecoderBlock(128, 4), nn.LayerNorm(128),
                                   nn.Linear(128, output_size))

    def forward(self, inputs):
        x = self.token_embeddings(inputs) + self.position_embeddings(torch.arange(inputs.shape[1]))
        return self.model(x.transpose(0, 1))  # (T, B, classes)


def _seed_names_to_ours(state_dict):
    renamed = {}
    for name, value in state_dict.items():
        for seed_prefix, our_prefix in (("model.0.", "blocks.0."), ("model.1.", "blocks.1."), ("model.2.", "norm."),
                                        ("model.3.", "output.")):
            if name.startswith(seed_prefix):
                name = our_prefix + name[len(seed_prefix):]
        renamed[name] = value
    return renamed


@pytest.mark.parametrize("task, vocab, classes, parameters", [
    ("x_plus_y", 99, 97, 422_625),
    ("x_minus_y", 99, 97, 422_625),
    ("x_div_y", 99, 97, 422_625),
    ("permutation", 122, 120, 428_536),
])
def test_shape_and_parameter_count(task, vocab, classes, parameters):
    torch.manual_seed(0)
    model = build_baseline_model(task)
    assert count_parameters(model) == parameters
    assert count_parameters(SeedTransformer(vocab, classes)) == parameters  # the seed's own module count
    logits = model(torch.randint(0, vocab, (7, 4)))
    assert logits.shape == (7, classes)


def test_same_function_as_the_seeds_modules():
    torch.manual_seed(0)
    seed_model = SeedTransformer(99, 97).eval()
    model = build_baseline_model("x_plus_y").eval()
    model.load_state_dict(_seed_names_to_ours(seed_model.state_dict()))
    inputs = torch.randint(0, 99, (64, 4))
    with torch.no_grad():
        expected = seed_model(inputs)[-1]  # the seed reads the last position
        torch.testing.assert_close(model(inputs), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.output(model.hidden_states(inputs)), seed_model(inputs).transpose(0, 1),
                                   rtol=1e-5, atol=1e-5)


def test_attention_is_causal():
    torch.manual_seed(0)
    model = build_baseline_model("x_plus_y").eval()
    inputs = torch.randint(2, 99, (16, 4))
    with torch.no_grad():
        base = model.hidden_states(inputs)
        for position in (1, 2, 3):
            changed = inputs.clone()
            changed[:, position] = (changed[:, position] - 2 + 1) % 97 + 2  # another element token
            hidden = model.hidden_states(changed)
            torch.testing.assert_close(hidden[:, :position], base[:, :position], rtol=0, atol=1e-6)
            assert (hidden[:, position:] - base[:, position:]).abs().amax() > 1e-3


def test_seed_encoding_maps_shared_ids_to_the_seeds_ids():
    inputs, labels = task_examples("permutation")
    local_inputs, local_labels = seed_encoding("permutation", inputs[:5], labels[:5])
    assert local_inputs[:, 1].tolist() == [0] * 5 and local_inputs[:, 3].tolist() == [1] * 5  # "o", "="
    assert (local_inputs[:, [0, 2]] - 2 == torch.as_tensor(inputs[:5, [0, 2]]).numpy() - VOCABULARY.num_numbers).all()
    assert (local_labels == labels[:5] - VOCABULARY.num_numbers).all()
    with pytest.raises(ValueError, match="outside task"):
        seed_encoding("x_plus_y", inputs[:5], labels[:5])


def test_learning_rate_follows_the_seeds_lambda():
    schedule = BaselineSchedule()
    assert learning_rate_at(0, schedule) == 0.0
    assert learning_rate_at(25, schedule) == pytest.approx(5e-4)
    assert learning_rate_at(50, schedule) == learning_rate_at(7000, schedule) == 1e-3


def test_short_run_lowers_training_loss_and_reports_seed_format():
    points = []
    schedule = BaselineSchedule(batch_size=128, eval_batches=1, eval_batch_size=256)
    result = train_baseline("x_plus_y", seed=0, num_updates=150, eval_every=10, schedule=schedule,
                            callback=points.append)
    assert SEED_FORMAT_KEYS <= set(result)
    assert [p["step"] for p in result["curve"]] == list(range(10, 151, 10)) and points == result["curve"]
    # the seed's schedule warms up over 50 updates, so 150 updates only start memorising:
    # the loss falls clearly and below chance level, ln(97) = 4.575
    assert result["final_train_loss"] < result["curve"][0]["train_loss"] - 0.2
    assert result["final_train_loss"] < math.log(97) - 0.05
    assert result["step_val_acc_99"] == 150  # not reached so early: the number of updates
    assert result["num_parameters"] == 422_625 and result["schedule"]["batch_size"] == 128


def test_training_is_deterministic_given_the_seed():
    runs = [train_baseline("x_minus_y", seed=s, schedule="micro") for s in (1, 1, 2)]
    assert runs[0]["curve"][-1]["train_loss"] == runs[1]["curve"][-1]["train_loss"]
    assert [p["val_loss"] for p in runs[0]["curve"]] == [p["val_loss"] for p in runs[1]["curve"]]
    assert runs[0]["curve"][-1]["train_loss"] != runs[2]["curve"][-1]["train_loss"]


def test_evaluation_settings_do_not_change_training():
    often_model, often = fit_baseline("x_plus_y", seed=3, schedule="micro", eval_every=5)
    rarely_model, rarely = fit_baseline("x_plus_y", seed=3, schedule="micro", eval_every=20)
    assert len(often["curve"]) == 4 and len(rarely["curve"]) == 1
    for name, value in often_model.state_dict().items():
        assert torch.equal(value, rarely_model.state_dict()[name]), name
