"""memory.py: the activations a training forward keeps, measured and fitted, and the planned peak.
"""


import pytest
import torch

from lora import apply_lora
from model import Qwen3, Qwen3Config


def test_the_memory_plan_predicts_what_the_training_forward_keeps(monkeypatch):
    """memory.activation_profile's fit (1 and 2 layers, two lengths) predicts the bytes a 3-layer model keeps at a third
    length, with and without gradient checkpointing; the planned peak counts the model's own parameters; auto
    resolves to on exactly when the plan without checkpointing passes 90% of the device's memory."""
    import memory
    import train

    model_config = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    config, _, _ = train.parse_args(["--preset", "paper", "--rank", "8", "--max-prompt-tokens", "48", "--max-new-tokens", "40"])
    cpu = torch.device("cpu")
    profiles = {setting: memory.activation_profile(model_config, config, cpu, setting) for setting in (False, True)}
    for setting, profile in profiles.items():
        measured = memory.saved_activation_bytes(model_config, config, cpu, 3, setting, 2, 48, 40)
        predicted = profile["constant"] + profile["per_token"] * 2 * (48 + 40 - 1)
        assert predicted == pytest.approx(measured, rel=0.02), setting  # the shared attention bias grows as T x S: nearly linear
    assert profiles[True]["layer_per_token"] == pytest.approx(2 * 64, rel=0.05)  # checkpointed: each layer's bf16 input alone
    assert profiles[False]["layer_per_token"] > 10 * profiles[True]["layer_per_token"]
    with torch.device("meta"):
        model = apply_lora(Qwen3(model_config), rank=8, alpha=16)
    assert memory.lora_parameter_count(model_config, 8) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.weight_count(model_config) == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    without = memory.planned_peak(model_config, config, cpu, False, dict(profiles))
    assert without["weights"] == pytest.approx(2 * memory.weight_count(model_config) / 2**30)
    for available, expected in ((without["peak"] * 2**30 / 0.95, "on"), (without["peak"] * 2**30 / 0.8, "off")):
        monkeypatch.setattr(memory, "device_memory_bytes", lambda device: available)
        assert memory.resolve_gradient_checkpointing(model_config, config, cpu) == expected
