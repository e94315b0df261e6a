"""memory.py: the activations a training forward keeps, measured and fitted, and the planned peak.
"""

import pytest
import torch

import memory
import train
from conftest import run_args
from lora import apply_lora
from model import Qwen3, Qwen3Config


def small_model_and_config():
    model_config = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               tie_word_embeddings=True)
    config, _, _ = train.parse_args(["--preset", "paper", "--rank", "8", "--max-prompt-tokens", "48",
                                     "--max-new-tokens", "40"])
    return model_config, config


def test_the_memory_plan_predicts_what_the_training_forward_keeps():
    """memory.activation_profile's fit (1 and 2 layers, two lengths) predicts the bytes a 3-layer model
    keeps at a third length, with and without gradient checkpointing; the planned peak counts the model's
    own parameters."""
    model_config, config = small_model_and_config()
    cpu = torch.device("cpu")
    profiles = {setting: memory.activation_profile(model_config, config, cpu, setting)
                for setting in (False, True)}
    for setting, profile in profiles.items():
        measured = memory.saved_activation_bytes(model_config, config, cpu, 3, setting, 2, 48, 40)
        predicted = profile["constant"] + profile["per_token"] * 2 * (48 + 40 - 1)
        # the shared attention bias grows as T x S: nearly linear
        assert predicted == pytest.approx(measured, rel=0.02), setting
    # checkpointed: each layer's bf16 input alone
    assert profiles[True]["layer_per_token"] == pytest.approx(2 * 64, rel=0.05)
    assert profiles[False]["layer_per_token"] > 10 * profiles[True]["layer_per_token"]
    with torch.device("meta"):
        model = apply_lora(Qwen3(model_config), rank=8, alpha=16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.lora_parameter_count(model_config, 8) == trainable
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert memory.weight_count(model_config) == frozen
    without = memory.planned_peak(model_config, config, cpu, False, dict(profiles))
    assert without["weights"] == pytest.approx(2 * memory.weight_count(model_config) / 2**30)


def test_gradient_checkpointing_on_makes_the_run_models_forward_keep_what_the_plan_says(char_run_setup):
    """--gradient-checkpointing on and off, through train.load_model (the model a run trains): the bytes
    its training forward keeps are what memory.activation_profile, the plan's measure, predicts for each."""
    cpu, measured, predicted = torch.device("cpu"), {}, {}
    for setting in ("on", "off"):
        args = run_args(char_run_setup, "unused", "--gradient-checkpointing", setting)
        config, _, _ = train.parse_args(args)
        model, _ = train.load_model(config, cpu, rank=0, ranks=1)
        measured[setting] = memory.forward_saved_bytes(model.train(), rows=2, prompt=24, completion=16)
        profile = memory.activation_profile(model.config, config, cpu, checkpointing=setting == "on")
        predicted[setting] = profile["constant"] + profile["per_token"] * 2 * (24 + 16 - 1)
    assert measured == pytest.approx(predicted, rel=0.05)
    assert measured["off"] > 3 * measured["on"]  # the flag changes what is kept


def test_auto_checkpointing_keeps_a_margin_and_leaves_the_random_numbers_alone(monkeypatch):
    """--gradient-checkpointing auto turns it on exactly when the planned peak without it plus the stated
    margin (the CUDA context, the allocator's slack, a no-grad pass's transients) passes the device's
    memory, faked here on both sides of that line; measuring the plan draws random numbers (LoRA's
    initialisation, dropout), and the generators are as they were afterwards."""
    model_config, config = small_model_and_config()
    cpu = torch.device("cpu")
    without = memory.planned_peak(model_config, config, cpu, False)
    margin = memory.unplanned_margin_gb(model_config, config, without)
    assert margin >= memory.CUDA_CONTEXT_GB + memory.ALLOCATOR_SLACK * without["peak"]
    needed = (without["peak"] + margin) * 2**30
    sizes = ((needed * 0.99, "on"), (needed * 1.01, "off"), (without["peak"] * 2**30 / 0.8, "on"))
    for available, expected in sizes:
        monkeypatch.setattr(memory, "device_memory_bytes", lambda device: available)
        torch.manual_seed(123)
        before = torch.get_rng_state()
        assert memory.resolve_gradient_checkpointing(model_config, config, cpu) == expected, available
        assert torch.equal(torch.get_rng_state(), before)  # the measuring passes left no trace
    given = train.dataclasses.replace(config, gradient_checkpointing="off")
    assert memory.resolve_gradient_checkpointing(model_config, given, cpu) == "off"
