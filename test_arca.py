"""The method's tests: model.py against transformers, lora.py against PEFT, credit.py and grpo.py against
hand-computed values, math_reward.py against labelled answers. CPU only, nothing downloaded, no child
process; the rest of the suite (sampling, runs, ranks, data, the demo, bench.py) is under tests/.

    python -m pytest -q test_arca.py
"""

import json
import math
import os
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import grpo
import step_log
from conftest import (CharTokenizer, REPO, RecordingLog, SHARED_DATA, StepConfig, TARGETS, boxed, hf_model,
                      input_ids, left_padded, logits, lora_gradient, lora_tiny_model, one_grpo_step,
                      perturbed_lora_model, randomise_adapter, reward_first_token_even, save_tiny_checkpoint,
                      tiny_hf_config, tiny_model)
from credit import (arca_scores, credit_diagnostics, credit_html, credit_page, credit_scores, credit_section,
                    divergence_scores, effective_token_ratio, entropy_reduction_scores, gini,
                    surprisal_scores, token_weights, top_mass, uniform_scores)
from grpo import group_advantages, k3_kl, pack_sequences, policy_loss
from lora import (LoRALinear, RecentAdapters, apply_lora, disable_adapter, load_adapter, lora_layers,
                  merge_adapter, sampling_copies, save_adapter, unmerge_adapter)
from math_reward import extract_boxed, is_equiv, math_reward, normalize_answer, strict_match
from model import Qwen3, Qwen3Config, apply_rotary, load_tokenizer, rotary_cos_sin
from sampling import generate


@pytest.mark.parametrize(
    "name, overrides, shard",
    [
        ("tied", {}, None),
        ("untied", {"tie_word_embeddings": False}, None),
        ("wide-heads", {"num_attention_heads": 8, "head_dim": 16}, None),  # 8 * 16 = 128 != hidden 32
        ("tied-sharded", {}, "20KB"),
        ("untied-sharded", {"tie_word_embeddings": False}, "20KB"),
    ],
)
def test_logits_match_transformers(tmp_path, name, overrides, shard):
    directory, hf_model = save_tiny_checkpoint(tmp_path, max_shard_size=shard, **overrides)
    if shard:
        assert (directory / "model.safetensors.index.json").exists()
    model = Qwen3.from_pretrained(directory, dtype=torch.float32)
    prompts = [[5, 9, 2, 7, 3, 8], [4, 11, 6], [13]]
    ids, mask = left_padded(prompts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model.lm_head(model(ids, attention_mask=mask))
        theirs = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        unpadded = [model.lm_head(model(torch.tensor([p])))[0] for p in prompts]
    real = mask.bool()
    max_diff = (ours[real] - theirs[real]).abs().max().item()
    print(f"{name}: max |logit diff| vs transformers = {max_diff:.2e}")
    assert max_diff < 1e-4
    for row, prompt in enumerate(prompts):  # a padded row equals its unpadded sequence
        torch.testing.assert_close(ours[row, -len(prompt):], unpadded[row], atol=1e-5, rtol=1e-5)


def test_rope_matches_transformers():
    from transformers.models.qwen3.modeling_qwen3 import (
        Qwen3RotaryEmbedding,
        apply_rotary_pos_emb,
    )

    config = tiny_hf_config(head_dim=16)
    positions = torch.tensor([[0, 1, 2, 3, 40], [7, 8, 9, 10, 200]])
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos_ref, sin_ref = Qwen3RotaryEmbedding(config)(q, positions)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    cos, sin = rotary_cos_sin(positions, 16, config.rope_parameters["rope_theta"], torch.float32)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_ref)
    torch.testing.assert_close(apply_rotary(k, cos, sin), k_ref)


def test_config_reads_head_dim_and_both_config_styles(tmp_path):
    official = {  # Qwen3-0.6B-Base's config.json (transformers 4 style): q is wider than hidden
        "model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "intermediate_size": 3072, "num_hidden_layers": 28, "rope_theta": 1000000,
        "rope_scaling": None, "torch_dtype": "bfloat16", "tie_word_embeddings": True, "vocab_size": 151936,
    }
    (tmp_path / "config.json").write_text(json.dumps(official))
    config = Qwen3Config.from_json(tmp_path / "config.json")
    assert (config.head_dim, config.hidden_size, config.rope_theta) == (128, 1024, 1000000)
    with torch.device("meta"):
        model = Qwen3(config)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (2048, 1024)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    new_style = dict(official, rope_parameters={"rope_type": "default", "rope_theta": 5.0}, dtype="float32")
    del new_style["rope_theta"], new_style["torch_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(new_style))
    config = Qwen3Config.from_json(tmp_path / "config.json")
    assert (config.rope_theta, config.torch_dtype) == (5.0, "float32")


def test_entropy_is_positive_and_hand_computed():
    from sampling import token_logprobs

    logprobs, entropies = token_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]))  # uniform over 4
    torch.testing.assert_close(entropies, torch.full((2,), math.log(4)))  # 1.386; a flipped sign gives -1.386
    torch.testing.assert_close(logprobs, torch.full((2,), -math.log(4)))
    p = torch.tensor([0.7, 0.2, 0.1])
    _, entropy = token_logprobs(p.log()[None], torch.tensor([0]))
    torch.testing.assert_close(entropy, -(p * p.log()).sum()[None])


def test_rms_norm_puts_eps_inside_the_root():
    from model import RMSNorm

    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8) * 1e-3  # mean(x^2) ~ 1e-6 ~ eps, where the placement matters
    expected = norm.weight * x / torch.sqrt((x ** 2).mean(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected)
    reference = transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm(8, eps=1e-6)
    reference.weight.data.copy_(norm.weight.data)
    torch.testing.assert_close(norm(x), reference(x))


def test_loader_errors_name_the_problem(tmp_path, tiny_checkpoint):
    import shutil

    from safetensors.torch import load_file, save_file

    source = tiny_checkpoint[0]

    def copy(name):
        target = tmp_path / name
        shutil.copytree(source, target)
        return target

    with pytest.raises(FileNotFoundError, match="config.json"):
        (lambda d: (d.joinpath("config.json").unlink(), Qwen3.from_pretrained(d)))(copy("noconfig"))

    directory = copy("llama")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(ValueError, match="'llama'"):
        Qwen3.from_pretrained(directory)

    def with_tensors(name, edit):
        directory = copy(name)
        tensors = load_file(directory / "model.safetensors")
        edit(tensors)
        save_file(tensors, directory / "model.safetensors")
        return directory

    with pytest.raises(ValueError, match=r"missing tensor.*model\.norm\.weight"):
        Qwen3.from_pretrained(with_tensors("missing", lambda t: t.pop("model.norm.weight")))
    extras = {f"model.extra{i}.weight": torch.zeros(2) for i in range(7)}
    with pytest.raises(ValueError,
                       match=r"unexpected tensor\(s\) \['model\.extra0\.weight', .*\.\.\. \(7 in all\)"):
        Qwen3.from_pretrained(with_tensors("unexpected", lambda t: t.update(extras)))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has dtype I32, expected floating point"):
        integer_norm = {"model.norm.weight": torch.ones(64, dtype=torch.int32)}
        Qwen3.from_pretrained(with_tensors("int", lambda t: t.update(integer_norm)))
    different_head = lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1})
    with pytest.raises(ValueError, match=r"ties lm_head.*different lm_head\.weight"):
        Qwen3.from_pretrained(with_tensors("tied-with-head", different_head))
    same_head = lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()})
    Qwen3.from_pretrained(with_tensors("tied-with-same-head", same_head))  # a redundant copy is fine

    for name, content in (("empty", b""), ("html", b"<!DOCTYPE html><html>404</html>"), ("truncated", None)):
        directory = copy(name)
        weights = directory / "model.safetensors"
        weights.write_bytes(content if content is not None else weights.read_bytes()[:1000])
        with pytest.raises(ValueError, match=re.escape(str(weights)) + ": not a readable safetensors file"):
            Qwen3.from_pretrained(directory)
    bad_shape = lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(65, 32)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(65, 32\).*\(64, 32\)"):
        Qwen3.from_pretrained(with_tensors("shape", bad_shape))

    directory = copy("lfs")
    (directory / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid "
                                                 "sha256:abc\nsize 12\n")
    with pytest.raises(ValueError, match="git-lfs pointer"):
        Qwen3.from_pretrained(directory)

    directory = copy("shards")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        Qwen3.from_pretrained(directory)
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="plain file name"):
        Qwen3.from_pretrained(directory)

    # two shards: a tensor in both, or an index that names the wrong shard for a tensor
    directory = copy("two-shards")
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    first = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    save_file(first, directory / "a.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"],
               "model.embed_tokens.weight": tensors["model.embed_tokens.weight"]},
              directory / "b.safetensors")
    weight_map = {**{k: "a.safetensors" for k in first}, "model.norm.weight": "b.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"b\.safetensors: its tensors differ from what "
                                         r"model\.safetensors\.index\.json assigns"):
        Qwen3.from_pretrained(directory)  # b also holds the embedding, which the index puts in a
    weight_map["model.embed_tokens.weight"] = "b.safetensors"
    save_file({k: v for k, v in first.items()}, directory / "a.safetensors")  # ... and a still holds it too
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"a\.safetensors: its tensors differ"):
        Qwen3.from_pretrained(directory)

    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        Qwen3.from_pretrained(tmp_path / "does-not-exist")


def test_config_without_tie_word_embeddings_is_untied_as_in_transformers(tmp_path):
    directory, reference = save_tiny_checkpoint(tmp_path / "untied", tie_word_embeddings=False)
    config = json.loads((directory / "config.json").read_text())
    del config["tie_word_embeddings"]
    (directory / "config.json").write_text(json.dumps(config))
    ours = Qwen3.from_pretrained(directory, dtype=torch.float32)
    assert not ours.config.tie_word_embeddings
    ids = torch.tensor([[3, 11, 4, 13]])
    with torch.no_grad():
        torch.testing.assert_close(ours.lm_head(ours(ids)), reference(input_ids=ids).logits, atol=1e-5,
                                   rtol=1e-5)
    # a tied checkpoint whose config lost the key: the missing head is named, with the reason
    tied, _ = save_tiny_checkpoint(tmp_path / "tied")
    config = json.loads((tied / "config.json").read_text())
    del config["tie_word_embeddings"]
    (tied / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError,
                       match=r"lm_head\.weight.*untied \(tie_word_embeddings is false or missing"):
        Qwen3.from_pretrained(tied)


def test_tokenizer_knows_eos_and_pad(tmp_path, tiny_checkpoint):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "[UNK]": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)  # no config.json: <|endoftext|>
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.vocab_size) == (0, 0, 4)
    assert loaded.encode("a b a") == [1, 2, 1]
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert load_tokenizer(tmp_path).eos_token_id == 2


@pytest.mark.skipif(not (SHARED_DATA / "qwen3-tokenizer").exists(), reason="needs ../shared/data")
def test_real_qwen3_tokenizer_ids():
    tokenizer = load_tokenizer(SHARED_DATA / "qwen3-tokenizer")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.vocab_size) == (151643, 151643, 151669)
    text = "Solve: \\boxed{\\frac{1}{2}}"
    ids = tokenizer.encode(text)
    assert ids == [50, 3948, 25, 1124, 79075, 35702, 37018, 90, 16, 15170, 17, 3417]
    assert tokenizer.decode(ids) == text


def test_lora_linear_computes_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, alpha=6)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 4, 6)
    expected = x @ base.weight.T + base.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * 6 / 3
    torch.testing.assert_close(layer(x), expected)
    assert not base.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad


def test_lora_dropout_drops_the_input_not_the_update():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.5).train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    torch.manual_seed(1)
    ours = layer(x)
    # the same mask, drawn by hand on the input (PEFT: lora_B(lora_A(dropout(x))) * scaling)
    torch.manual_seed(1)
    expected = base(x) + F.linear(F.linear(F.dropout(x, 0.5, training=True), layer.lora_A),
                                  layer.lora_B) * 2.0
    torch.testing.assert_close(ours, expected)
    # and PEFT's own layer, same weights, same random numbers
    peft_model = get_peft_model(nn.Sequential(nn.Linear(16, 8)),
                                LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["0"]))
    peft_layer = peft_model.base_model.model[0]
    with torch.no_grad():
        peft_layer.base_layer.weight.copy_(base.weight)
        peft_layer.base_layer.bias.copy_(base.bias)
        peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    peft_model.train()
    torch.manual_seed(1)
    torch.testing.assert_close(ours, peft_model(x))
    layer.eval()
    # eval: no dropout
    torch.testing.assert_close(layer(x), base(x) + F.linear(F.linear(x, layer.lora_A), layer.lora_B) * 2.0)


def test_adapter_stays_fp32_on_a_bf16_base():
    layer = LoRALinear(nn.Linear(8, 4, bias=False).to(torch.bfloat16), rank=2, alpha=4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_a_bf16_adapter_keeps_no_fp32_copy_of_its_input():
    """compute_dtype bf16 on a bf16 layer: backward keeps x itself (no fp32 copy); fp32 (PEFT's way) keeps
    one. The gradients still reach fp32 A and B, and the output is the fp32 computation's to bf16
    rounding."""
    from model import InputDtypeLinear  # the model's linear layer: computes in its input's dtype

    torch.manual_seed(0)
    base = InputDtypeLinear(64, 32, bias=False).to(torch.bfloat16)
    x = torch.randn(4, 10, 64).to(torch.bfloat16).requires_grad_()
    kept, outputs = {}, {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(1)  # the same A and B for both
        layer = LoRALinear(base, rank=8, alpha=16, compute_dtype=dtype)
        nn.init.normal_(layer.lora_B, std=0.1)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            outputs[dtype] = layer(x)
        # an fp32 copy of the input
        kept[dtype] = [t for t in saved if t.numel() == x.numel() and t.dtype == torch.float32]
        outputs[dtype].float().sum().backward()
        assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_A.grad.abs().sum() > 0
    assert kept[torch.bfloat16] == [] and len(kept[torch.float32]) == 1
    torch.testing.assert_close(outputs[torch.bfloat16].float(), outputs[torch.float32].float(), atol=0.05,
                               rtol=0.02)
    # an fp32 pass computes the update in fp32
    exact = LoRALinear(base, rank=8, alpha=16, compute_dtype=torch.bfloat16)
    assert exact(x.detach().float()).dtype == torch.float32


def test_sampling_copies_compute_the_update_in_the_base_dtype():
    torch.manual_seed(0)
    for dtype, tolerance in [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)]:
        layer = LoRALinear(nn.Linear(64, 32).to(dtype), rank=8, alpha=16).eval()
        nn.init.normal_(layer.lora_B, std=0.2)  # an update about as large as the base output
        x = torch.randn(3, 5, 64).to(dtype)
        w, b = layer.base.weight.float(), layer.base.bias.float()
        exact = x.float() @ w.T + b + (x.float() @ layer.lora_A.T @ layer.lora_B.T) * 2.0  # (3, 5, 32), fp32
        assert (exact - (x.float() @ w.T + b)).abs().mean() > 0.3 * exact.abs().mean()  # the update matters
        with torch.no_grad(), sampling_copies(nn.Sequential(layer)):
            assert layer.sampling_B.dtype == dtype
            assert torch.equal(layer.sampling_B, (layer.lora_B * 2.0).to(dtype))
            assert "sampling_A" not in layer.state_dict()  # not saved with the model
            lean = layer(x)
        assert lean.dtype == dtype and lean.shape == exact.shape
        scale = exact.abs().max().item()
        torch.testing.assert_close(lean.float(), exact, atol=tolerance * scale, rtol=0)
        with torch.no_grad():
            # the training path
            torch.testing.assert_close(lean.float(), layer(x).float(), atol=tolerance * scale, rtol=0)
    model = nn.Sequential(layer)
    with sampling_copies(model), pytest.raises(RuntimeError, match="torch.no_grad"):
        layer(x)  # gradients would not reach A and B
    assert not layer.sampling  # the training path again on exit, after an error too
    address = layer.sampling_B.data_ptr()
    with torch.no_grad():
        layer.lora_B.zero_()  # an optimiser step: the next block copies the new B
        with sampling_copies(model):
            torch.testing.assert_close(layer(x), layer.base(x))
    assert layer.sampling_B.data_ptr() == address  # refilled in place: a CUDA graph reads the same buffer
    with sampling_copies(model), pytest.raises(RuntimeError, match="already active"):
        with sampling_copies(model):
            pass


def test_sampling_copies_give_the_same_completions(checkpoint_dir):
    model = randomise_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8))
    prompts = [[5, 9, 2, 7], [4, 11], [3]]
    sampling = dict(temperature=1.0, top_p=0.9, eos_token_id=[1], return_logprobs=True)
    plain = generate(model, prompts, 16, generator=torch.Generator().manual_seed(0), **sampling)
    with sampling_copies(model):
        lean = generate(model, prompts, 16, generator=torch.Generator().manual_seed(0), **sampling)
    assert torch.equal(plain[0], lean[0]) and torch.equal(plain[1], lean[1])
    torch.testing.assert_close(plain[2], lean[2], atol=1e-5, rtol=0)
    with disable_adapter(model):
        assert not torch.equal(generate(model, prompts, 16, generator=torch.Generator().manual_seed(0),
                                        **sampling)[0], plain[0])


def test_fresh_adapter_leaves_logits_unchanged(checkpoint_dir):
    model = tiny_model(checkpoint_dir)
    ids = input_ids()
    before = logits(model, ids)
    apply_lora(model, rank=4, alpha=8, dropout=0.05)
    assert len(lora_layers(model)) == 2 * len(TARGETS)
    assert not any(layer.training for layer in lora_layers(model).values())  # eval, as the model was
    assert torch.equal(logits(model, ids), before)


def test_unmatched_target_lists_the_linear_layers(checkpoint_dir):
    model = tiny_model(checkpoint_dir)
    with pytest.raises(ValueError, match="'qkv_proj' matches no linear layer") as error:
        apply_lora(model, rank=4, alpha=8, targets=("q_proj", "qkv_proj"))
    for name in TARGETS + ("lm_head",):
        assert repr(name) in str(error.value)


def test_apply_lora_on_meta_then_materialise(checkpoint_dir):
    with torch.device("meta"):
        model = Qwen3(Qwen3Config.from_json(checkpoint_dir / "config.json"))
    apply_lora(model, rank=4, alpha=8)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.is_meta and layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (32, 4)
    model.to_empty(device="cpu")
    for layer in lora_layers(model).values():
        layer.reset_parameters()
    assert layer.lora_A.abs().sum() > 0 and torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


# Qwen3-1.7B-Base's config.json, the fields the model reads.
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)


@pytest.mark.parametrize("rank, expected", [(4, 4_358_144), (16, 17_432_576), (64, 69_730_304)])
def test_trainable_parameter_count_on_qwen3_1_7b(rank, expected):
    with torch.device("meta"):
        model = Qwen3(Qwen3Config(**QWEN3_1_7B))
    apply_lora(model, rank=rank, alpha=2 * rank)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_A" in name or ".lora_B" in name for name, _ in trainable)
    assert sum(p.numel() for _, p in trainable) == expected  # the paper's 4.36M / 17.4M / 69.7M


def test_disabled_adapter_gives_exact_base_logits(checkpoint_dir):
    model = tiny_model(checkpoint_dir)
    ids = input_ids()
    base = logits(model, ids)
    randomise_adapter(apply_lora(model, rank=4, alpha=8))
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3
    with disable_adapter(model):
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), adapted)


def test_disable_adapter_restores_after_an_exception(checkpoint_dir):
    model = randomise_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8))
    ids = input_ids()
    adapted = logits(model, ids)
    with pytest.raises(KeyError):
        with disable_adapter(model):
            raise KeyError("boom")
    assert all(layer.enabled for layer in lora_layers(model).values())
    assert torch.equal(logits(model, ids), adapted)


def test_disable_adapter_nests(checkpoint_dir):
    model = tiny_model(checkpoint_dir)
    ids = input_ids()
    base = logits(model, ids)
    randomise_adapter(apply_lora(model, rank=4, alpha=8))
    adapted = logits(model, ids)
    with disable_adapter(model):
        with disable_adapter(model):
            assert torch.equal(logits(model, ids), base)
        assert torch.equal(logits(model, ids), base)  # the inner exit leaves the outer block disabled
    assert torch.equal(logits(model, ids), adapted)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_one_step_moves_every_B_and_no_base_weight(checkpoint_dir, gradient_checkpointing):
    model = apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8).train()
    model.gradient_checkpointing = gradient_checkpointing
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    ids = input_ids()
    out = logits(model, ids[:, :-1])  # (B, T-1, V)
    F.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()
    for name, layer in lora_layers(model).items():
        assert (layer.lora_B != 0).all(), f"{name}.lora_B has entries still at zero"
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} changed"
            assert p.grad is None, f"{name} got a gradient"
    assert len(trainable) == 2 * len(lora_layers(model))


def test_merge_matches_unmerged_and_unmerge_restores_the_base(checkpoint_dir):
    model = randomise_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8))
    ids = input_ids()
    unmerged = logits(model, ids)
    weights = {name: layer.base.weight.detach().clone() for name, layer in lora_layers(model).items()}
    merge_adapter(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        with disable_adapter(model):
            pass
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        logits(model.train(), ids)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_adapter(model)
    unmerge_adapter(model.eval())
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base.weight, weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)


def readme_snippet(heading):
    """The first ```python block after `heading` in README.md."""
    text = (REPO / "README.md").read_text()
    return text[text.index(heading):].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_snippet_computes_arca_as_the_step_does(checkpoint_dir, tmp_path):
    """README's "ARCA in your own loop", read out of the file and run on transformers + PEFT: its weights and
    loss equal this project's (our Qwen3 and LoRA, the same adapter) and its gradient reaches the
    adapter."""
    code = readme_snippet("## ARCA in your own loop")
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    reference = get_peft_model(transformers.Qwen3ForCausalLM.from_pretrained(checkpoint_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)  # a trained adapter: ARCA's weights are not uniform
    reference.save_pretrained(tmp_path / "adapter")
    prompts = [[5, 9, 2, 7], [4, 11, 6, 3]]
    completions, mask = torch.tensor([[7, 8, 9, 1],
                                      [3, 4, 1, 1]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    advantages = torch.tensor([1.0, -1.0])
    names = dict(model=reference, input_ids=torch.cat([torch.tensor(prompts), completions], dim=1), P=4,
                 mask=mask, attention_mask=torch.ones(2, 8, dtype=torch.long), advantages=advantages)
    exec(code, names)

    ours = apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8)
    load_adapter(ours, tmp_path / "adapter")
    with torch.no_grad():
        logprobs, _, h_adapted = grpo.completion_forward(ours, prompts, completions, mask)
        with disable_adapter(ours):
            h_base = grpo.completion_hidden(ours, prompts, completions, mask)
    weights = token_weights(arca_scores(h_adapted, h_base), mask, power=2.0)
    assert weights.max() > 0.4  # not uniform: the check below can fail
    torch.testing.assert_close(names["weights"], weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(names["loss"], grpo.policy_loss(logprobs, advantages, weights, 2), atol=1e-5,
                               rtol=1e-4)
    lora_b = [p for n, p in reference.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_peft_loads_our_adapter(checkpoint_dir, tmp_path):
    model = randomise_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8))
    ids = input_ids()
    ours = logits(model, ids)
    save_adapter(model, tmp_path, base_model_name_or_path=str(checkpoint_dir))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in saved

    with disable_adapter(model):
        assert (ours - logits(model, ids)).abs().max() > 1e-2  # the adapter matters

    peft_model = PeftModel.from_pretrained(hf_model(checkpoint_dir), tmp_path).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    print(f"PEFT loading our adapter: max |logit difference| = {(theirs - ours).abs().max():.3e}")
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    reloaded = load_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8), tmp_path)
    assert torch.equal(logits(reloaded, ids), ours)


def test_we_load_a_peft_adapter(checkpoint_dir, tmp_path):
    lora_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS),
                             task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf_model(checkpoint_dir), lora_config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(tmp_path)
    ids = input_ids()
    with torch.no_grad():
        theirs = peft_model.eval()(ids).logits
        with peft_model.disable_adapter():
            assert (theirs - peft_model(ids).logits).abs().max() > 1e-2  # the adapter matters

    model = load_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8), tmp_path)
    ours = logits(model, ids)
    print(f"our load_adapter on PEFT's adapter: max |logit difference| = {(theirs - ours).abs().max():.3e}")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_load_adapter_errors_name_what_differs(checkpoint_dir, tmp_path):
    save_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8), tmp_path, "tiny")
    with pytest.raises(ValueError, match="r is 4 in the adapter, but the model has 8"):
        load_adapter(apply_lora(tiny_model(checkpoint_dir), rank=8, alpha=8), tmp_path)
    with pytest.raises(ValueError, match="target_modules is .* in the adapter, but the model has "
                                         "\\['q_proj', 'v_proj'\\]"):
        load_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8, targets=("q_proj", "v_proj")),
                     tmp_path)

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[key] = torch.zeros(4, 31)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"{key} has shape \\(4, 31\\), but the model expects \\(4, 32\\)"):
        load_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8), tmp_path)

    del tensors[key]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"missing \\['{key}'\\]"):
        load_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8), tmp_path)


def full_mask(B, T):
    return torch.ones(B, T, dtype=torch.bool)


def lengths_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)


def test_uniform_weights_have_gini_0_and_effn_1():
    w = torch.full((1, 7), 1 / 7)
    assert gini(w, full_mask(1, 7)).item() == pytest.approx(0.0, abs=1e-6)
    assert effective_token_ratio(w, full_mask(1, 7)).item() == pytest.approx(1.0, abs=1e-6)


def test_gini_never_negative_at_uniform():
    # in float32 the sum (2i - T - 1) / T over uniform weights rounds to about -1e-8 for many T
    lengths = list(range(1, 65))
    mask = lengths_mask(lengths, 64)
    w = mask / mask.sum(dim=1, keepdim=True)  # (64, 64) uniform on each row's valid tokens
    assert (gini(w, mask) >= 0).all()


def test_one_hot_weights_have_gini_t_minus_1_over_t_and_effn_1_over_t():
    T = 5
    w = torch.zeros(1, T)
    w[0, 2] = 1.0
    assert gini(w, full_mask(1, T)).item() == pytest.approx((T - 1) / T, abs=1e-6)
    assert effective_token_ratio(w, full_mask(1, T)).item() == pytest.approx(1 / T, abs=1e-6)
    assert top_mass(w, full_mask(1, T)).item() == pytest.approx(1.0, abs=1e-6)


def test_weights_proportional_to_1234():
    w = torch.tensor([[3.0, 1.0, 4.0, 2.0]]) / 10
    assert gini(w, full_mask(1, 4)).item() == pytest.approx(0.25, abs=1e-6)
    assert effective_token_ratio(w, full_mask(1, 4)).item() == pytest.approx(1 / (4 * 0.30), abs=1e-6)
    assert top_mass(w, full_mask(1, 4)).item() == pytest.approx(0.4, abs=1e-6)  # ceil(0.4) = 1 token


def test_top_mass_takes_ceil_of_ten_percent():
    assert top_mass(torch.full((1, 30), 1 / 30), full_mask(1, 30)).item() == pytest.approx(0.1, abs=1e-6)
    # 7% of 100 is 7 tokens even though 0.07 * 100 = 7.000000000000001 in float64
    uniform_100 = torch.full((1, 100), 1 / 100)
    assert top_mass(uniform_100, full_mask(1, 100), fraction=0.07).item() == pytest.approx(0.07, abs=1e-6)
    assert top_mass(torch.full((1, 15), 1 / 15), full_mask(1, 15)).item() == pytest.approx(2 / 15, abs=1e-6)
    assert top_mass(torch.full((1, 3), 1 / 3), full_mask(1, 3)).item() == pytest.approx(1 / 3, abs=1e-6)


def test_diagnostics_are_permutation_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(4, 12, generator=g) ** 3  # (4, 12) uneven weights
    mask = full_mask(4, 12)
    perm = torch.randperm(12, generator=g)
    for f in (gini, effective_token_ratio, top_mass):
        ref = f(w, mask)
        assert not torch.allclose(ref, ref[:1].expand(4))  # the rows differ: the check has teeth
        torch.testing.assert_close(f(w[:, perm], mask), ref)
        torch.testing.assert_close(f(7.3 * w, mask), ref)


def test_padding_changes_nothing():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(1, 6, generator=g)  # (1, 6)
    padded = torch.cat([scores, torch.tensor([[float("nan"), float("inf"), 1e30, -5.0]])], dim=1)  # (1, 10)
    mask = lengths_mask([6], 10)
    for power in (1.0, 2.0):
        w = token_weights(scores, full_mask(1, 6), power=power)
        w_padded = token_weights(padded, mask, power=power)
        torch.testing.assert_close(w_padded[:, :6], w)
        assert torch.equal(w_padded[:, 6:], torch.zeros(1, 4))
    # diagnostics ignore whatever sits on padding
    garbage = torch.cat([w, torch.tensor([[0.9, 0.0, 3.0, 0.5]])], dim=1)  # (1, 10)
    for f in (gini, effective_token_ratio, top_mass):
        torch.testing.assert_close(f(garbage, mask), f(w, full_mask(1, 6)))


def test_token_weights_hand_values():
    scores = torch.tensor([[1.0, 3.0, 9.9]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(token_weights(scores, mask, power=1.0), torch.tensor([[0.25, 0.75, 0.0]]))
    torch.testing.assert_close(token_weights(scores, mask, power=2.0), torch.tensor([[0.1, 0.9, 0.0]]))


def test_token_weights_add_eps_before_the_power():
    mask = full_mask(1, 2)
    # README, The method (2): (alpha + eps)^p; with eps 1, p 2: (0 + 1)^2 : (1 + 1)^2 = 1 : 4 (eps after the
    # power: 1 : 2)
    torch.testing.assert_close(token_weights(torch.tensor([[0.0, 1.0]]), mask, eps=1.0, power=2.0),
                               torch.tensor([[0.2, 0.8]]))
    torch.testing.assert_close(token_weights(torch.tensor([[1.0, 3.0]]), mask, eps=1.0, power=1.0),
                               torch.tensor([[1 / 3, 2 / 3]]))


def test_token_weights_sum_to_one_on_every_valid_row():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(5, 9, generator=g) * 10  # (5, 9)
    mask = lengths_mask([9, 4, 1, 0, 7], 9)
    for power in (1.0, 2.0):
        w = token_weights(scores, mask, power=power)
        assert w.dtype == torch.float32
        torch.testing.assert_close(w.sum(dim=1), torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0]))
        assert (w >= 0).all() and torch.equal(w[~mask], torch.zeros(int((~mask).sum())))


def test_token_weights_fall_back_to_uniform_when_scores_vanish():
    mask = lengths_mask([4, 2], 5)
    expected = torch.tensor([[0.25] * 4 + [0.0], [0.5, 0.5, 0.0, 0.0, 0.0]])
    for eps in (1e-8, 0.0):
        for power in (1.0, 2.0):
            torch.testing.assert_close(token_weights(torch.zeros(2, 5), mask, eps=eps, power=power), expected)


def test_token_weights_no_nan_or_inf_on_empty_rows_zero_and_huge_scores():
    scores = torch.tensor([
        [0.0, 0.0, 0.0],
        [1e30, 1e30, 0.0],  # (1e30)^2 overflows float32 without the row-max normalisation
        [float("inf"), 1.0, 2.0],  # a -log p of -inf
        [5.0, 5.0, 5.0],  # no valid token
    ])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0]])
    for eps in (1e-8, 0.0):
        for power in (1.0, 2.0):
            w = token_weights(scores, mask, eps=eps, power=power)
            assert torch.isfinite(w).all()
            torch.testing.assert_close(w[1], torch.tensor([0.5, 0.5, 0.0]))
            torch.testing.assert_close(w[2], torch.tensor([1.0, 0.0, 0.0]))
            assert torch.equal(w[3], torch.zeros(3))


def test_token_weights_are_detached():
    scores = torch.rand(2, 3, requires_grad=True)
    assert not token_weights(scores * 2, full_mask(2, 3)).requires_grad


def test_arca_scores_zero_for_equal_states_and_hand_norm():
    h = torch.randn(2, 3, 4)
    assert torch.equal(arca_scores(h, h.clone()), torch.zeros(2, 3))
    h_base = torch.zeros(1, 2, 2)
    h_adapted = torch.tensor([[[3.0, 4.0], [1.0, -1.0]]])
    torch.testing.assert_close(arca_scores(h_adapted, h_base), torch.tensor([[5.0, math.sqrt(2)]]))


def test_arca_scores_in_fp32_from_bf16():
    # both are exact in bf16, their difference 257.0078125 is not (bf16 keeps 8 significant bits)
    h_adapted = torch.tensor([[[1.0078125]]], dtype=torch.bfloat16)
    h_base = torch.tensor([[[-256.0]]], dtype=torch.bfloat16)
    scores = arca_scores(h_adapted, h_base)
    assert scores.dtype == torch.float32
    assert scores.item() == 257.0078125


def test_entropy_reduction_hand_values_last_valid_token_gets_zero():
    entropies = torch.tensor([
        [2.0, 1.5, 1.7, 0.2, 0.0],  # padding after the last valid token: 0.2 - 0.0 would be 0.2
        [1.0, 3.0, 0.5, 2.0, 0.25],  # no padding
        [9.0, float("nan"), 0.0, 0.0, 0.0],
    ])
    mask = lengths_mask([4, 5, 1], 5)
    expected = torch.tensor([
        [0.5, 0.0, 1.5, 0.0, 0.0],
        [0.0, 2.5, 0.0, 1.75, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ])
    assert torch.equal(entropy_reduction_scores(entropies, mask), expected)


def reference_entropy_reduction(entropies, loss_mask):
    """The reference code's entropy-reduction score, restated: rodlaf/tokenweighting,
    experiment/hf/token_weights.py, `_raw_scores`, mode "entropy_reduction" (the same lines in
    `entropy_reduction_weights`). H_{t+1} is the padded tensor's next column whatever it holds; only
    the last column is zeroed; the loss mask is applied afterwards (by `masked_normalize`)."""
    next_entropies = torch.zeros_like(entropies)
    next_entropies[:, :-1] = entropies[:, 1:]
    drops = torch.clamp(entropies - next_entropies, min=0.0)
    drops[:, -1] = 0.0
    return drops * loss_mask


def test_entropy_reduction_follows_the_reference_codes_next_token_rule():
    """A padded batch: a completion that stopped on EOS with padding after it, a truncated one (no EOS, the
    full width) and a short one. With EOS out of the loss (the paper's setting) the last trained token
    gets max(0, H_T - H_EOS), as the reference gives it, and every score equals the reference's. With EOS
    trained, every token but EOS equals the reference's; EOS itself gets 0, where the reference reads the
    entropy of a padding position no token was drawn from."""
    entropies = torch.tensor([
        [2.0, 1.5, 1.7, 0.9, 0.2, 0.1],  # 4 tokens and EOS (0.2), then padding (0.1)
        [1.0, 3.0, 0.5, 2.0, 0.25, 0.4],  # truncated: 6 tokens, no EOS
        [0.8, 0.3, 5.0, 5.0, 5.0, 5.0],  # 1 token and EOS (0.3), then padding
    ])
    generated = lengths_mask([5, 6, 2], 6)  # (B, T) every token the sampler drew
    ends_with_eos = torch.tensor([True, False, True])
    rollout = grpo.Rollout([[1]] * 3, torch.tensor([0, 0, 0]), torch.zeros(3, 6, dtype=torch.long), generated,
                           torch.zeros(3, 6), ends_with_eos, [0, 1, 2])
    eos_out = grpo.loss_mask(rollout, credit_eos=False)
    ours = entropy_reduction_scores(entropies, eos_out, valid=generated)
    torch.testing.assert_close(ours, reference_entropy_reduction(entropies, eos_out.float()), atol=0, rtol=0)
    assert ours[0, 3] == pytest.approx(0.7) and ours[2, 0] == pytest.approx(0.5)  # H_T - H_EOS, both rows
    assert ours[1, 5] == 0  # the truncated completion's last token: no next token
    eos_in = grpo.loss_mask(rollout, credit_eos=True)
    ours = entropy_reduction_scores(entropies, eos_in, valid=generated)
    reference = reference_entropy_reduction(entropies, eos_in.float())
    trained_eos = torch.zeros_like(generated)
    trained_eos[0, 4] = trained_eos[2, 1] = True
    torch.testing.assert_close(ours[~trained_eos], reference[~trained_eos], atol=0, rtol=0)
    assert (ours[trained_eos] == 0).all() and reference[0, 4] > 0  # the reference read padding there
    assert torch.equal(entropy_reduction_scores(entropies, eos_in), ours)  # valid defaults to the mask


def test_surprisal_and_divergence_hand_values():
    logp = torch.tensor([[-0.5, -2.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.0, -3.0]])
    assert torch.equal(surprisal_scores(logp), torch.tensor([[0.5, 2.0, 0.0]]))
    assert torch.equal(divergence_scores(logp, ref), torch.tensor([[0.5, 1.0, 3.0]]))
    assert torch.equal(uniform_scores(torch.tensor([[1, 1, 0]])), torch.tensor([[1.0, 1.0, 0.0]]))


def test_credit_scores_dispatches_and_names_valid_methods():
    g = torch.Generator().manual_seed(3)
    mask = lengths_mask([3, 2], 3)
    logp, ref, ent = (-torch.rand(2, 3, generator=g) for _ in range(3))
    h_a, h_b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    inputs = dict(token_logprobs=logp, entropies=ent, ref_token_logprobs=ref, h_adapted=h_a, h_base=h_b)
    assert torch.equal(credit_scores("uniform", mask, **inputs), uniform_scores(mask))
    assert torch.equal(credit_scores("surprisal", mask, **inputs), surprisal_scores(logp))
    assert torch.equal(credit_scores("entropy", mask, **inputs), entropy_reduction_scores(ent, mask))
    assert torch.equal(credit_scores("divergence", mask, **inputs), divergence_scores(logp, ref))
    assert torch.equal(credit_scores("arca", mask, **inputs), arca_scores(h_a, h_b))
    with pytest.raises(ValueError, match="uniform, surprisal, entropy, divergence, arca"):
        credit_scores("ARCA", mask, **inputs)
    with pytest.raises(ValueError, match="h_base"):
        credit_scores("arca", mask, h_adapted=h_a)


def test_arca_shuffled_moves_arcas_own_weights_to_random_tokens():
    """The control for "non-uniform by the right amount": each row's weights are exactly ARCA's, sorted alike,
    on a uniformly random permutation of its valid tokens; padding stays 0; a row's permutation depends on
    its seed and length alone, not on the batch's padding width; another seed, another permutation."""
    from credit import credit_weights, shuffle_within_rows

    torch.manual_seed(0)
    h_adapted, h_base = torch.randn(3, 9, 16), torch.randn(3, 9, 16)
    mask = lengths_mask([9, 5, 1], 9)
    arca = credit_weights("arca", mask, power=2.0, h_adapted=h_adapted, h_base=h_base)
    shuffled = credit_weights("arca-shuffled", mask, power=2.0, shuffle_seeds=[11, 12, 13],
                              h_adapted=h_adapted, h_base=h_base)
    for row in range(3):
        # the same numbers, bit for bit
        assert torch.equal(shuffled[row].sort().values, arca[row].sort().values)
    assert (shuffled[~mask] == 0).all() and not torch.equal(shuffled[0], arca[0])
    assert torch.equal(gini(shuffled, mask), gini(arca, mask))
    assert torch.equal(top_mass(shuffled, mask), top_mass(arca, mask))
    narrow = shuffle_within_rows(arca[1:2, :5], mask[1:2, :5], [12])  # the same row, trimmed to its length
    assert torch.equal(narrow[0], shuffled[1, :5])
    assert not torch.equal(shuffle_within_rows(arca[:1], mask[:1], [99]), shuffled[:1])
    counts = {}
    for seed in range(3000):  # 3 valid tokens: each of the 6 orders about 1/6 of the time
        order = tuple(shuffle_within_rows(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), lengths_mask([3], 4),
                                          [seed])[0].tolist())
        counts[order] = counts.get(order, 0) + 1
    assert len(counts) == 6 and all(400 < n < 600 for n in counts.values()), counts


def test_entropy_top20_puts_equal_weight_on_the_highest_entropy_fifth():
    """1/k on the k = ceil(0.2 T) highest-entropy valid tokens, a tie to the earlier position, exact zeros
    elsewhere (the per-completion variant of the high-entropy-minority rule)."""
    from credit import credit_weights

    entropies = torch.tensor([[0.5, 2.0, 1.0, 2.0, 0.1, 9.0], [3.0, 1.0, 3.0, 3.0, 0.2, 0.1],
                              [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = lengths_mask([5, 6, 0], 6)  # T 5 -> k 1; T 6 -> k 2; an empty row
    weights = credit_weights("entropy-top20", mask, entropies=entropies)
    # padding's 9.0 is never chosen
    assert weights.tolist() == [[0, 1, 0, 0, 0, 0], [0.5, 0, 0.5, 0, 0, 0], [0] * 6]
    assert weights[:2].sum(dim=1).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="needs entropies"):
        credit_weights("entropy-top20", mask)


def trl_high_entropy_mask(entropies, mask, threshold):
    """TRL's GRPOTrainer.get_high_entropy_mask (huggingface/trl, trl/trainer/grpo_trainer.py) restated for
    one process, where its pad-and-gather across processes returns the local entropies unchanged."""
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    entropy_threshold = torch.quantile(local, threshold)
    masked_entropies = entropies * mask.float()
    return (masked_entropies >= entropy_threshold) & mask.bool()


def test_entropy_gate_keeps_the_batchs_top_quantile_hand_computed():
    """rho 0.5 on six valid entropies: the threshold is their median 0.6 (linear interpolation, as
    torch.quantile), each kept token weighs 1/T of its completion, a given threshold replaces the batch's."""
    from credit import credit_weights

    entropies = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.2, 0.8, 5.0, 5.0]])
    mask = lengths_mask([4, 2], 4)  # padding's 5.0 neither counts in the quantile nor is kept
    weights = credit_weights("entropy-gate", mask, entropies=entropies, gate_fraction=0.5)
    torch.testing.assert_close(weights, torch.tensor([[0, 1 / 4, 0, 1 / 4], [0, 1 / 2, 0, 0]]))
    given = credit_weights("entropy-gate", mask, entropies=entropies, gate_threshold=torch.tensor(0.85))
    torch.testing.assert_close(given, torch.tensor([[0, 1 / 4, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="needs entropies"):
        credit_weights("entropy-gate", mask)


@pytest.mark.parametrize("kept_fraction", [0.2, 0.5, 1.0])
def test_entropy_gate_is_trls_mask_over_the_per_sequence_normaliser(kept_fraction):
    """TRL's loss with top_entropy_quantile = rho and loss_type grpo: per_token_loss * entropy_mask,
    summed over each completion and divided by its valid-token count. The same weights, ties included
    (entropies rounded to one decimal), an empty row too."""
    from credit import credit_weights

    generator = torch.Generator().manual_seed(0)
    entropies = (torch.rand(6, 9, generator=generator) * 3).round(decimals=1)  # (B, T) with ties
    mask = lengths_mask([9, 7, 3, 1, 0, 5], 9)
    weights = credit_weights("entropy-gate", mask, entropies=entropies, gate_fraction=kept_fraction)
    trl_mask = trl_high_entropy_mask(entropies, mask, 1 - kept_fraction)
    expected = trl_mask / mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, T)
    torch.testing.assert_close(weights, expected)
    assert 0 < trl_mask.sum() < mask.sum() or kept_fraction == 1.0


def test_a_step_gates_on_its_micro_batchs_training_entropies(tiny_checkpoint):
    """In a step the gate takes the quantile of the micro-batch's own training-forward entropies
    (--entropy-quantile rho), and kept/entropy-gate counts the tokens it keeps."""
    b = STEP_BATCH
    config = StepConfig(credit="entropy-gate", entropy_quantile=0.5)
    model = perturbed_lora_model(tiny_checkpoint[0])
    signals, weights, _, _ = grpo.train_micro_batch(model, b["prompts"], b["tokens"], b["mask"],
                                                    b["advantages"], config, 2)
    trl_mask = trl_high_entropy_mask(signals["entropies"], b["mask"], 0.5)
    torch.testing.assert_close(weights, trl_mask / b["mask"].sum(dim=1, keepdim=True))
    stats, _ = micro_batch_stats(perturbed_lora_model(tiny_checkpoint[0]), b["prompts"], b["tokens"],
                                 b["mask"], b["advantages"], config, 2)
    assert stats["kept/entropy-gate"] == trl_mask.sum().item() == 4  # 7 valid tokens, the top half


def test_credit_diagnostics_leaves_out_rows_without_tokens():
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]])
    d = credit_diagnostics(w, lengths_mask([4, 0], 4))
    assert set(d) == {"weight_gini", "effective_token_ratio", "top10_mass"}
    assert d["weight_gini"] == pytest.approx(0.0, abs=1e-6)
    assert d["effective_token_ratio"] == pytest.approx(1.0, abs=1e-6)  # 0.5 if the empty row counted
    assert d["top10_mass"] == pytest.approx(0.25, abs=1e-6)


def test_credit_html_escapes_tokens_and_shades_uniform_neutral():
    tokens = ["The", " answer", "<script>alert(1)</script>", " is"]
    page = credit_html(tokens,
                       {"uniform": torch.full((4,), 0.25), "one-hot": torch.tensor([0.0, 0.0, 1.0, 0.0])})
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    uniform_row, one_hot_row = page.split("<h3>")[1:]
    assert "Gini 0.000" in uniform_row and "EffN/T 1.000" in uniform_row
    assert "Gini 0.750" in one_hot_row and "EffN/T 0.250" in one_hot_row
    assert set(re.findall(r"rgba\([^)]*, ([0-9.]+)\)", uniform_row)) == {"0.000"}  # uniform: no shade
    assert 'rgba(220, 50, 40, 1.000)" title="w = 1' in one_hot_row  # all the weight: full red
    with pytest.raises(ValueError, match="3 weights for 4 tokens"):
        credit_html(tokens, {"short": torch.ones(3) / 3})


def test_credit_page_explains_itself():
    tokens = ["\\boxed{", "1", "7", "3", "}"]
    weights = {"uniform": torch.full((5,), 0.2), "arca": torch.tensor([0.05, 0.1, 0.6, 0.2, 0.05])}
    facts = {"problem": "82+91=", "gold answer": "173", "reward (symbolic)": "1",
             "advantage (grpo)": "+1.500"}
    page = credit_page("token credit: runs/x, step 20", [credit_section(tokens, weights, facts)], 5)
    assert "<h1>token credit: runs/x, step 20</h1>" in page
    for text in ("82+91=", "173", "reward (symbolic)", "+1.500", "weight scale (T = 5 tokens)",
                 "1/T (uniform)"):
        assert text in page, text
    # the numbers as text, not only colour
    assert "top: \u201c7\u201d 0.600, \u201c3\u201d 0.200, \u201c1\u201d 0.100" in page
    # every token in its own box (2 methods), plus the 5 legend cells
    assert page.count('class="tok"') == 2 * 5 + 5


def test_arca_weights_uniform_for_fresh_adapter_and_not_after_perturbing_b():
    from lora import apply_lora, disable_adapter
    from model import Qwen3, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = apply_lora(Qwen3(config), rank=4, alpha=8).eval()
    input_ids = torch.randint(0, config.vocab_size, (3, 12))  # (B, T)
    mask = lengths_mask([12, 9, 5], 12)  # (B, T)

    def arca_weights():
        with torch.no_grad():
            h_adapted = model(input_ids)  # (B, T, hidden)
            with disable_adapter(model):
                h_base = model(input_ids)  # (B, T, hidden)
        return token_weights(arca_scores(h_adapted, h_base), mask, power=2.0)  # (B, T)

    uniform = mask / mask.sum(dim=1, keepdim=True)  # (B, T)
    assert torch.equal(arca_weights(), uniform.float())  # B = 0: every score is exactly 0

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    w = arca_weights()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3))
    assert not torch.allclose(w, uniform.float(), atol=1e-3)
    g = gini(w, mask)  # (B,)
    assert ((g > 0.01) & (g < 0.99)).all(), g


def test_group_advantages_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    index = torch.arange(3).repeat_interleave(4)
    grpo_adv = group_advantages(rewards, index, "grpo")
    s = 0.5 / (1 / 3) ** 0.5  # (1 - 0.5) / sample std of [1, 0, 0, 1]
    torch.testing.assert_close(grpo_adv[:4], torch.tensor([s, -s, -s, s]))
    assert grpo_adv[4:8].tolist() == [0.0] * 4  # zero spread: 0, not NaN
    # [0, 0, 0, 1]: mean 0.25, sample std 0.5 (population std 0.433 would give [-0.577, ..., 1.732])
    torch.testing.assert_close(grpo_adv[8:], torch.tensor([-0.5, -0.5, -0.5, 1.5]))
    rloo = group_advantages(rewards, index, "rloo")
    torch.testing.assert_close(rloo[:4], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    torch.testing.assert_close(rloo[8:], torch.tensor([-1 / 3, -1 / 3, -1 / 3, 1.0]))
    for adv in (grpo_adv, rloo):
        assert torch.isfinite(adv).all()
        torch.testing.assert_close(adv.view(3, 4).sum(1), torch.zeros(3), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least 2 completions"):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))


def test_pack_sequences_layout():
    ids, mask, P = pack_sequences([[5, 6], [7]], torch.tensor([[8, 1], [9, 1]]),
                                  torch.tensor([[1, 1], [1, 0]]))
    assert ids.tolist() == [[5, 6, 8, 1], [0, 7, 9, 1]]
    assert mask.int().tolist() == [[1, 1, 1, 1], [0, 1, 1, 0]] and P == 2


def test_policy_loss_and_gradient_hand_values():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, 0.0]], requires_grad=True)
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])  # row 2 has 2 valid tokens
    advantages = torch.tensor([1.5, -0.5])
    N = 4  # completions in the whole optimiser step (two more live in other micro-batches)
    loss = policy_loss(logprobs, advantages, weights, N)
    # -(1/4) [1.5 (0.2*-1 + 0.3*-2 + 0.5*-3) + -0.5 (0.5*-0.5 + 0.5*-1.5)] = -(1/4) [-3.45 + 0.5] = 0.7375
    assert abs(loss.item() - 0.7375) < 1e-6
    loss.backward()
    expected = -advantages[:, None] * weights / N  # d loss / d logp_it = -A_i w_it / N
    torch.testing.assert_close(logprobs.grad, expected)


def test_clipped_loss_equals_plain_with_one_update():
    logprobs = torch.randn(3, 5, requires_grad=True)
    weights = torch.softmax(torch.randn(3, 5), -1)
    advantages = torch.tensor([1.0, -2.0, 0.5])
    plain_grad = torch.autograd.grad(policy_loss(logprobs, advantages, weights, 3), logprobs)[0]
    clipped = policy_loss(logprobs, advantages, weights, 3, old_logprobs=logprobs.detach())  # ratio 1
    clipped_grad = torch.autograd.grad(clipped, logprobs)[0]
    torch.testing.assert_close(clipped_grad, plain_grad)
    # the clip does bite once the ratio leaves [1 - eps, 1 + eps] in the direction of the advantage
    far = policy_loss(logprobs, advantages, weights, 3, old_logprobs=logprobs.detach() - 1.0)
    assert not torch.allclose(torch.autograd.grad(far, logprobs)[0], plain_grad)


def test_k3_kl_hand_value():
    mask = torch.ones(1, 1, dtype=torch.bool)
    # r = ref - logp = -2 - (-1) = -1: exp(-1) + 1 - 1 = 0.3679 (the reversed ratio gives e - 2 = 0.7183)
    kl = k3_kl(torch.tensor([[-1.0]]), torch.tensor([[-2.0]]), mask, 1)
    assert kl.item() == pytest.approx(math.exp(-1), abs=1e-6)
    two = (torch.tensor([[-1.0, -3.0, 0.0]]), torch.tensor([[-2.0, -3.0, 5.0]]),
           torch.tensor([[1, 1, 0]]).bool())
    # mean over 2 valid tokens, over N = 2
    assert k3_kl(*two, 2).item() == pytest.approx(math.exp(-1) / 2 / 2, abs=1e-6)


def test_clipped_surrogate_takes_the_minimum():
    weights = torch.ones(1, 1)
    logprobs, old = torch.tensor([[0.0]], requires_grad=True), torch.tensor([[-1.0]])  # ratio e
    # A = 1: min(e * 1, clip(e, 0.8, 1.2) * 1) = 1.2 (max would give e); loss = -1.2, no gradient through the
    # clip
    loss = policy_loss(logprobs, torch.tensor([1.0]), weights, 1, old_logprobs=old, clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert torch.autograd.grad(loss, logprobs)[0].item() == 0.0
    # A = -1: min(-e, -1.2) = -e, loss e, gradient -(-e) = e through the ratio
    loss = policy_loss(logprobs, torch.tensor([-1.0]), weights, 1, old_logprobs=old, clip_eps=0.2)
    assert loss.item() == pytest.approx(math.e)
    assert torch.autograd.grad(loss, logprobs)[0].item() == pytest.approx(math.e)


def test_k3_kl_nonnegative_and_zero_when_equal():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    logprobs = torch.randn(2, 4)
    assert k3_kl(logprobs, logprobs, mask, 2).item() == 0.0
    for _ in range(5):
        assert k3_kl(logprobs, torch.randn(2, 4), mask, 2).item() > 0


def micro_batch_stats(model, prompts, tokens, mask, advantages, config, num_completions, diagnose_all=False,
                      fidelity=False):
    """One micro-batch trained (grpo.train_micro_batch), and its statistics read to the host as grpo_step
    reads them."""
    signals, weights, loss, kl = grpo.train_micro_batch(model, prompts, tokens, mask, advantages, config,
                                                        num_completions)
    stats = step_log.micro_batch_statistics(model, prompts, tokens, mask.bool(), signals["token_logprobs"],
                                            signals, weights, loss, kl, config,
                                        diagnose_all, fidelity)
    return step_log.read_statistics(stats, torch.zeros(())), signals["token_logprobs"]


def test_reference_pass_with_fresh_adapter_gives_uniform_arca_zero_kl(tiny_checkpoint):
    model = lora_tiny_model(tiny_checkpoint[0])
    prompts = [[5, 9, 2], [4, 11]]
    tokens = torch.tensor([[7, 8, 9, 1], [3, 4, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    weights = step_log.all_method_weights(model, prompts, tokens, mask, power=2.0)
    torch.testing.assert_close(weights["arca"], mask / mask.sum(1, keepdim=True))  # step 0: uniform
    assert not torch.allclose(weights["surprisal"], weights["arca"])
    model.train()
    with torch.no_grad():
        logprobs, _, _ = grpo.completion_forward(model, prompts, tokens, mask)
        with disable_adapter(model):
            ref_logprobs, _, _ = grpo.completion_forward(model, prompts, tokens, mask)
    assert k3_kl(logprobs, ref_logprobs, mask, 2).item() == 0.0  # fresh adapter: policy == reference


@pytest.mark.parametrize("loss_type", ["sequence", "token", "dr_grpo"])
def test_micro_batches_give_the_full_batch_gradient(tiny_checkpoint, loss_type):
    """Under every loss type the normaliser is the whole step's (grpo.loss_normaliser), so one micro-batch
    of 4 completions and four of 1 give the same gradient, with and without a KL term."""
    prompts = [[5, 9, 2], [4, 11], [6], [7, 7, 7]]
    tokens = torch.tensor([[7, 8, 9, 1], [3, 4, 1, 1], [5, 5, 5, 5], [9, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    config = StepConfig(loss_type=loss_type, beta=0.1)
    N = grpo.loss_normaliser(mask, config)
    assert float(N) == {"sequence": 4, "token": 13, "dr_grpo": 4 * 6}[loss_type]
    grads = []
    for per_micro_batch in (4, 1):
        model = lora_tiny_model(tiny_checkpoint[0])
        with torch.no_grad():
            for layer in model.modules():
                if hasattr(layer, "lora_B"):
                    layer.lora_B.normal_(0, 0.1)  # a trained adapter, so ARCA's weights are not uniform
        model.train()
        for start in range(0, 4, per_micro_batch):
            rows = slice(start, start + per_micro_batch)
            grpo.train_micro_batch(model, prompts[rows], tokens[rows], mask[rows], advantages[rows],
                                   config, N)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_the_loss_types_normalise_as_trl_and_dr_grpo_do(tiny_checkpoint):
    """On the same completions: the token loss with uniform credit is DAPO's token mean, -(1/sum T) sum_it
    A_i log pi_it; the dr_grpo loss is the token loss times (mean trained length / max_new_tokens); a
    credit method's weights enter the token loss as T_i w_it (the same within-completion shares)."""
    b = STEP_BATCH
    losses = {}
    for loss_type in ("sequence", "token", "dr_grpo"):
        for credit in ("uniform", "arca"):
            model = perturbed_lora_model(tiny_checkpoint[0])
            config = StepConfig(credit=credit, loss_type=loss_type, max_new_tokens=6)
            N = grpo.loss_normaliser(b["mask"], config)
            _, weights, loss, _ = grpo.train_micro_batch(model, b["prompts"], b["tokens"], b["mask"],
                                                         b["advantages"], config, N)
            losses[loss_type, credit] = loss.item(), weights
    with torch.no_grad():
        logprobs, _, _ = grpo.completion_forward(perturbed_lora_model(tiny_checkpoint[0]), b["prompts"],
                                                 b["tokens"], b["mask"])
    lengths = b["mask"].sum(dim=1).float()  # (B,) T_i: 4 and 3
    token_mean = -(b["advantages"][:, None] * logprobs * b["mask"]).sum() / lengths.sum()
    assert losses["token", "uniform"][0] == pytest.approx(token_mean.item(), rel=1e-5)
    per_sequence = -(b["advantages"] * (logprobs * b["mask"]).sum(dim=1) / lengths).sum() / 2
    assert losses["sequence", "uniform"][0] == pytest.approx(per_sequence.item(), rel=1e-5)
    for credit in ("uniform", "arca"):
        ratio = lengths.mean().item() / 6
        assert losses["dr_grpo", credit][0] == pytest.approx(losses["token", credit][0] * ratio, rel=1e-5)
        weights = losses["token", credit][1]
        by_hand = -(b["advantages"][:, None] * lengths[:, None] * weights * logprobs).sum() / lengths.sum()
        assert losses["token", credit][0] == pytest.approx(by_hand.item(), rel=1e-5)
    assert losses["token", "arca"][0] != pytest.approx(losses["sequence", "arca"][0] * 2 / 7, rel=1e-3)


def test_scale_rewards_none_keeps_the_mean_and_drops_the_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    index = torch.arange(2).repeat_interleave(4)
    torch.testing.assert_close(group_advantages(rewards, index, scale="none"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0.75, -0.25, -0.25, -0.25]))
    scaled, centred = group_advantages(rewards, index), group_advantages(rewards, index, scale="none")
    assert not torch.allclose(scaled, centred)


def test_mask_truncated_leaves_truncated_completions_out_of_the_loss(tiny_checkpoint):
    """A completion that hit the length limit without EOS gets no weight (and no KL) with --mask-truncated:
    the loss of a micro-batch with one changes, the loss of one without does not; the sequence loss still
    counts it in N, the token loss drops its tokens from the normaliser."""
    rollout = eos_rollout()  # row 0 stopped on EOS, row 1 truncated
    with_eos = grpo.loss_mask(rollout, True, mask_truncated=True)
    without_eos = grpo.loss_mask(rollout, False, mask_truncated=True)
    assert with_eos.tolist() == [[True, True, True, False], [False] * 4]
    assert without_eos.tolist() == [[True, True, False, False], [False] * 4]

    def loss(rows, mask_truncated, loss_type="sequence"):
        model = perturbed_lora_model(tiny_checkpoint[0])
        config = StepConfig(credit="arca", beta=0.1, mask_truncated=mask_truncated, loss_type=loss_type)
        mask = grpo.loss_mask(rollout, config.credit_eos, mask_truncated)[rows]
        N = grpo.loss_normaliser(mask, config)
        _, _, value, _ = grpo.train_micro_batch(model, [rollout.prompts[i] for i in range(2)][rows],
                                                rollout.tokens[rows], mask, torch.tensor([1.0, -1.0])[rows],
                                                config, N)
        return value.item(), float(N)

    assert loss(slice(0, 2), True) != pytest.approx(loss(slice(0, 2), False))  # a truncated one: it changes
    assert loss(slice(0, 1), True) == loss(slice(0, 1), False)  # none truncated: the same loss
    assert loss(slice(0, 2), True)[1] == 2 and loss(slice(0, 2), True, "token")[1] == 3  # N: 2; tokens: 3


def test_micro_batch_without_completion_tokens_does_not_crash(tiny_checkpoint):
    model = lora_tiny_model(tiny_checkpoint[0]).train()
    tokens, mask = torch.tensor([[1, 1]]), torch.zeros(1, 2, dtype=torch.bool)
    for credit in ("uniform", "surprisal", "entropy", "divergence", "arca"):
        stats, _ = micro_batch_stats(model, [[5, 9]], tokens, mask, torch.tensor([1.0]),
                                     StepConfig(credit=credit, beta=0.1), 4)
        assert stats["loss"] == 0.0 and stats["rows"] == 0


STEP_BATCH = dict(
    prompts=[[5, 9, 2], [4, 11]],
    tokens=torch.tensor([[7, 8, 9, 1], [3, 4, 1, 1]]),
    mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool(),
    advantages=torch.tensor([1.0, -1.0]),
)


def test_reference_pass_switches_the_adapter_off(tiny_checkpoint):
    """ARCA's h_base and the KL's pi_ref must come from the base model: checked against a model loaded without
    LoRA."""
    b = STEP_BATCH
    model = perturbed_lora_model(tiny_checkpoint[0])
    stats, _ = micro_batch_stats(model, b["prompts"], b["tokens"], b["mask"], b["advantages"],
                                 StepConfig(credit="arca", beta=0.1), 2)
    # the oracle: no adapter at all
    base_model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    with torch.no_grad():
        logprobs, _, h_adapted = grpo.completion_forward(model, b["prompts"], b["tokens"], b["mask"])
        ref_logprobs, _, h_base = grpo.completion_forward(base_model, b["prompts"], b["tokens"], b["mask"])
    expected_norms = arca_scores(h_adapted, h_base)[b["mask"]]  # (valid tokens,)
    expected_kl = k3_kl(logprobs, ref_logprobs, b["mask"], 2).item()
    # the adapter matters: with it on, both would be 0
    assert expected_norms.sum() > 1.0 and expected_kl > 1e-3
    assert stats["arca_norm_sum"] == pytest.approx(expected_norms.sum().item(), rel=1e-5)
    assert stats["arca_norm_max"] == pytest.approx(expected_norms.max().item(), rel=1e-5)
    assert stats["kl"] == pytest.approx(expected_kl, rel=1e-4)


def test_beta_adds_the_kl_gradient(tiny_checkpoint):
    b = STEP_BATCH
    grads = {}
    for beta in (0.0, 1.0):
        model = perturbed_lora_model(tiny_checkpoint[0])
        grpo.train_micro_batch(model, b["prompts"], b["tokens"], b["mask"], b["advantages"],
                               StepConfig(credit="uniform", beta=beta), 2)
        grads[beta] = lora_gradient(model)
    model = perturbed_lora_model(tiny_checkpoint[0])  # the KL term's gradient alone, by autograd
    logprobs, _, _ = grpo.completion_forward(model, b["prompts"], b["tokens"], b["mask"])
    with torch.no_grad(), disable_adapter(model):
        ref_logprobs, _, _ = grpo.completion_forward(model, b["prompts"], b["tokens"], b["mask"])
    k3_kl(logprobs, ref_logprobs, b["mask"], 2).backward()
    kl_grad = lora_gradient(model)
    assert kl_grad.abs().sum() > 1e-3
    torch.testing.assert_close(grads[1.0] - grads[0.0], kl_grad, atol=1e-6, rtol=1e-4)


def eos_rollout():
    """Two completions: one stops on EOS (id 1) at its third token, one is truncated at 4 tokens."""
    tokens = torch.tensor([[7, 8, 1, 1], [3, 4, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    return grpo.Rollout([[5, 9, 2], [4, 11]], torch.tensor([0, 0]), tokens, mask, torch.zeros(2, 4),
                        grpo.eos_positions(tokens, mask, 1), [0, 1])


def test_eos_positions_are_read_at_the_last_valid_token():
    rollout = eos_rollout()
    assert rollout.ends_with_eos.tolist() == [True, False]
    # a completion whose EOS falls in the last slot stopped; it is not truncated
    stopped = grpo.eos_positions(torch.tensor([[3, 4, 5, 1]]), torch.ones(1, 4, dtype=torch.bool), 1)
    assert stopped.tolist() == [True]
    assert grpo.eos_positions(torch.tensor([[3, 1, 1]]), torch.ones(1, 3, dtype=torch.bool),
                              []).tolist() == [False]


def test_no_credit_eos_leaves_eos_out_of_weights_and_gradient(tiny_checkpoint):
    rollout = eos_rollout()
    with_eos, without_eos = grpo.loss_mask(rollout, True), grpo.loss_mask(rollout, False)
    assert torch.equal(with_eos, rollout.mask)
    # the truncated row is unchanged
    assert without_eos.tolist() == [[True, True, False, False], [True, True, True, True]]
    weights = token_weights(torch.rand(2, 4), without_eos)
    assert weights[0, 2] == 0 and weights.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])

    def gradient(eos_id, mask, credit="surprisal"):  # the EOS slot holds eos_id; its log-prob changes with it
        model = perturbed_lora_model(tiny_checkpoint[0])
        tokens = rollout.tokens.clone()
        tokens[0, 2] = eos_id
        grpo.train_micro_batch(model, rollout.prompts, tokens, mask, torch.tensor([1.0, -1.0]),
                               StepConfig(credit=credit, beta=0.1), 2)
        return lora_gradient(model)

    assert torch.equal(gradient(1, without_eos), gradient(12, without_eos))
    assert not torch.allclose(gradient(1, with_eos), gradient(12, with_eos))  # the test can fail


def test_every_signal_is_diagnosed_on_the_same_completions(tiny_checkpoint):
    b = STEP_BATCH
    model = perturbed_lora_model(tiny_checkpoint[0])
    config = StepConfig(credit="uniform")
    stats, _ = micro_batch_stats(model, b["prompts"], b["tokens"], b["mask"], b["advantages"], config, 2)
    # no adapter-off pass ran
    assert {"gini/uniform", "gini/surprisal", "gini/entropy"} <= set(stats) and "gini/arca" not in stats
    stats, _ = micro_batch_stats(model, b["prompts"], b["tokens"], b["mask"], b["advantages"], config, 2,
                                 diagnose_all=True)
    # eval mode, its own passes
    oracle = step_log.all_method_weights(model, b["prompts"], b["tokens"], b["mask"], power=2.0)
    model.train()
    for method, weights in oracle.items():
        expected = credit_diagnostics(weights, b["mask"])
        for name, diagnostic in (("gini", "weight_gini"), ("effective_token_ratio", "effective_token_ratio"),
                                 ("top10_mass", "top10_mass")):
            mean = stats[f"{name}/{method}"] / stats["rows"]
            assert mean == pytest.approx(expected[diagnostic], abs=1e-5), (name, method)
    assert stats["gini/arca"] > 0.01 and stats["gini/uniform"] == 0.0  # the adapter shows in ARCA's weights


def bf16_and_rounded_fp32_models(directory, b_scale, seed=0):
    """The same LoRA model twice: bf16 base weights, and fp32 holding exactly those bf16 values."""
    models = []
    for dtype in (torch.bfloat16, torch.float32):
        model = Qwen3.from_pretrained(directory, dtype=dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().to(dtype))
        torch.manual_seed(seed)
        apply_lora(model, rank=4, alpha=8)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.copy_(b_scale * torch.randn(layer.lora_B.shape, generator=generator))
        models.append(model.train())
    return models


def exact_arca_oracle(model, prompts, tokens, mask):
    """||h_adapted - h_base|| per valid token on an fp32 model, eval mode."""
    model.eval()
    with torch.no_grad():
        h_adapted = grpo.completion_hidden(model, prompts, tokens, mask)
        with disable_adapter(model):
            h_base = grpo.completion_hidden(model, prompts, tokens, mask)
    model.train()
    return arca_scores(h_adapted, h_base)[mask]


def test_exact_arca_equals_an_fp32_model_where_bf16_is_off(tiny_checkpoint):
    b = STEP_BATCH
    bf16_model, fp32_model = bf16_and_rounded_fp32_models(tiny_checkpoint[0], b_scale=1e-4)
    expected = exact_arca_oracle(fp32_model, b["prompts"], b["tokens"], b["mask"])  # (valid tokens,)
    stats = {}
    for precision in ("exact", "bf16"):
        config = StepConfig(credit="arca", arca_precision=precision)
        stats[precision], _ = micro_batch_stats(bf16_model, b["prompts"], b["tokens"], b["mask"],
                                                b["advantages"], config, 2, fidelity=True)
    assert stats["exact"]["arca_norm_sum"] == pytest.approx(expected.sum().item(), rel=1e-5)
    assert stats["exact"]["arca_norm_max"] == pytest.approx(expected.max().item(), rel=1e-5)
    # bf16 mostly measures rounding here
    assert abs(stats["bf16"]["arca_norm_sum"] / expected.sum().item() - 1) > 0.5
    assert stats["exact"]["arca_exact_corr"] == pytest.approx(1.0, abs=1e-6)
    assert stats["bf16"]["arca_exact_corr"] < 0.9 and stats["bf16"]["arca_floor_ratio"] > 1.5
    # the same figure
    assert stats["exact"]["arca_floor_ratio"] == pytest.approx(stats["bf16"]["arca_floor_ratio"], rel=0.05)


def test_exact_and_bf16_arca_are_zero_and_uniform_at_b_zero(tiny_checkpoint):
    b = STEP_BATCH
    bf16_model, _ = bf16_and_rounded_fp32_models(tiny_checkpoint[0], b_scale=0.0)
    for precision in ("exact", "bf16"):
        config = StepConfig(credit="arca", arca_precision=precision)
        stats, _ = micro_batch_stats(bf16_model, b["prompts"], b["tokens"], b["mask"], b["advantages"],
                                     config, 2)
        assert stats["arca_norm_sum"] == 0.0 and stats["arca_norm_max"] == 0.0
        # 2 rows, each EffN/T 1
        assert stats["weight_gini"] == 0.0 and stats["effective_token_ratio"] == pytest.approx(2.0)


def test_exact_arca_keeps_the_kl_and_divergence_on_the_bf16_pair(tiny_checkpoint):
    """--arca-precision exact with bf16 weights: at B = 0 the KL is exactly 0 and divergence's weights uniform
    (the policy and reference passes differ by the adapter alone), and with beta > 0 the KL still has its
    gradient."""
    b = STEP_BATCH
    bf16_model, _ = bf16_and_rounded_fp32_models(tiny_checkpoint[0], b_scale=0.0)
    for credit in ("arca", "divergence"):
        config = StepConfig(credit=credit, arca_precision="exact", beta=0.1)
        stats, _ = micro_batch_stats(bf16_model, b["prompts"], b["tokens"], b["mask"], b["advantages"],
                                     config, 2, diagnose_all=True)
        assert stats["kl"] == 0.0 and stats["arca_norm_sum"] == 0.0, credit
        assert stats["gini/divergence"] / stats["rows"] < 1e-6, credit
    grads = {}  # on the fp32 twin, where a gradient difference is not bf16 noise: the same code path
    for beta in (0.0, 1.0):
        _, model = bf16_and_rounded_fp32_models(tiny_checkpoint[0], b_scale=1e-2)
        grpo.train_micro_batch(model, b["prompts"], b["tokens"], b["mask"], b["advantages"],
                               StepConfig(credit="arca", arca_precision="exact", beta=beta), 2)
        grads[beta] = lora_gradient(model)
    # the KL term's gradient alone, by autograd
    _, model = bf16_and_rounded_fp32_models(tiny_checkpoint[0], b_scale=1e-2)
    logprobs, _, _ = grpo.completion_forward(model, b["prompts"], b["tokens"], b["mask"])
    with torch.no_grad(), disable_adapter(model):
        ref_logprobs, _, _ = grpo.completion_forward(model, b["prompts"], b["tokens"], b["mask"])
    k3_kl(logprobs, ref_logprobs, b["mask"], 2).backward()
    assert lora_gradient(model).abs().sum() > 1e-4
    torch.testing.assert_close(grads[1.0] - grads[0.0], lora_gradient(model), atol=1e-5, rtol=1e-3)


def test_a_step_gives_the_token_before_eos_the_reference_codes_entropy_score(tiny_checkpoint):
    """With EOS out of the loss, grpo_step hands the entropy signal every generated token, so the last
    trained token of a completion that stopped scores max(0, H_T - H_EOS): the step's entropy weights are
    the reference code's rule on the step's own entropies."""
    model = lora_tiny_model(tiny_checkpoint[0])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    tokenizer = CharTokenizer()
    tokenizer.eos_token_id = list(range(1, 13))  # an EOS in about 1 of 8 draws: some completions stop
    config = StepConfig(credit="entropy", credit_eos=False, max_new_tokens=8, diagnose_all=True)
    log = RecordingLog(model, tokenizer, config, lr=0.0)
    rollout, _ = grpo.grpo_step(model, optimizer, scheduler, [[5, 9, 2], [4, 11]], ["0", "0"], tokenizer,
                                reward_first_token_even, config, torch.Generator().manual_seed(0), log)
    before_eos = 0
    for rows, mask, inputs, weights in log.seen:
        scores = reference_entropy_reduction(inputs["entropies"], mask.float())
        torch.testing.assert_close(weights, token_weights(scores, mask, power=2.0), atol=1e-7, rtol=0)
        lengths = mask.sum(dim=1)  # (B,) trained tokens
        stopped = rollout.ends_with_eos[rows] & (lengths > 0)
        for row in stopped.nonzero().flatten().tolist():
            before_eos += bool(scores[row, lengths[row] - 1] > 0)
    assert before_eos > 0  # a stopped completion whose last trained token scored H_T - H_EOS > 0


def test_arca_shuffled_weights_do_not_depend_on_the_micro_batch_split_and_change_each_step(tiny_checkpoint):
    """A completion's shuffle comes from its prompt's seed (train.step_batch's, as a run draws them): the
    step's 4 prompts in 1, 2 or 4 micro-batches give every completion the same weights, each ARCA's
    weights permuted by the completion's own seed, and the next step's seeds are all new."""
    import torch.nn.functional as F

    from credit import credit_weights, shuffle_within_rows
    from train import step_batch

    model = perturbed_lora_model(tiny_checkpoint[0])  # an adapter that matters: ARCA is not uniform
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    rows = [{"prompt_ids": ids, "answer": "0"} for ids in ([5, 9, 2], [4, 11], [6, 3], [7, 7, 7])]
    weights, seeds = {}, {}
    for per_micro_batch in (4, 2, 1):
        config = StepConfig(credit="arca-shuffled", prompts_per_micro_batch=per_micro_batch,
                            micro_batches=4 // per_micro_batch, seed=0)
        for step in (0, 1):
            prompts, golds, prompt_seeds = step_batch(rows, step, config, rank=0, ranks=1)
            log = RecordingLog(model, CharTokenizer(), config, lr=0.0)
            rollout, _ = grpo.grpo_step(model, optimizer, scheduler, prompts, golds, CharTokenizer(),
                                        reward_first_token_even, config, None, log, prompt_seeds=prompt_seeds)
            for rows_of, mask, inputs, shuffled in log.seen:
                arca = credit_weights("arca", mask, config.credit_eps, config.power, **inputs)  # (B, T)
                torch.testing.assert_close(shuffled, shuffle_within_rows(arca, mask, rollout.seeds[rows_of]))
            # (N, max_new_tokens): each micro-batch's columns, padded back to the step's width
            weights[per_micro_batch, step] = torch.cat([F.pad(w, (0, config.max_new_tokens - w.shape[1]))
                                                        for *_, w in log.seen])
            seeds[per_micro_batch, step] = rollout.seeds
    assert gini(weights[4, 0], weights[4, 0] > 0).mean() > 0.05  # not uniform: a permutation shows
    for per_micro_batch in (2, 1):
        for step in (0, 1):
            torch.testing.assert_close(weights[per_micro_batch, step], weights[4, step], atol=1e-6, rtol=0)
    assert set(seeds[4, 0]).isdisjoint(seeds[4, 1]) and len(set(seeds[4, 0])) == 16


def test_arca_recent_equals_arca_until_k_updates_exist(tiny_checkpoint):
    """arca-recent with k larger than the steps taken: its older adapter is the one before the first update
    (B = 0, the base model), so three steps weight every token as ARCA's three steps do and end on the same
    adapter (fp32, dropout 0: the exact passes compute what the training forward computes)."""
    adapters, weights = {}, {}
    for credit in ("arca", "arca-recent"):
        model = lora_tiny_model(tiny_checkpoint[0])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        model.recent_adapters = RecentAdapters(model, optimizer, k=10)
        config = StepConfig(credit=credit, arca_recent_updates=10)
        generator, seen = torch.Generator().manual_seed(0), []
        for _ in range(3):
            log = RecordingLog(model, CharTokenizer(), config, lr=1e-2)
            grpo.grpo_step(model, optimizer, scheduler, [[5, 9, 2], [4, 11]], ["0", "0"], CharTokenizer(),
                           reward_first_token_even, config, generator, log)
            seen += [w for _, _, _, w in log.seen]
        adapters[credit] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        weights[credit] = seen
    assert len(model.recent_adapters.ring) == 3
    assert weights["arca"][-1].max() > 0.4  # not uniform: the comparison can fail
    for arca, recent in zip(weights["arca"], weights["arca-recent"]):
        torch.testing.assert_close(recent, arca, atol=1e-6, rtol=0)
    for arca, recent in zip(adapters["arca"], adapters["arca-recent"]):
        torch.testing.assert_close(recent, arca, atol=1e-6, rtol=0)


def test_arca_recent_scores_what_the_last_update_changed_and_touches_no_live_parameter(tiny_checkpoint):
    """k = 1 after one known update (a gradient on the last layer's down_proj B alone, one SGD step): the
    score is ||h(adapter after) - h(adapter before)||, computed here by two models loaded with each
    adapter, and not ARCA's ||h(after) - h(base)||. The older adapter's pass leaves the live parameters and
    the training forward's gradient bit for bit as they are without it."""
    b = STEP_BATCH
    model = perturbed_lora_model(tiny_checkpoint[0])  # B random: an adapter that already matters
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.recent_adapters = RecentAdapters(model, optimizer, k=1)
    changed = "model.layers.1.mlp.down_proj.lora_B"
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.grad = 0.05 * torch.randn_like(p) if name == changed else torch.zeros_like(p)
    optimizer.step()  # the pre-step hook keeps the adapter as it was
    after = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert not torch.equal(after[changed], before[changed])

    def hidden_with(adapter):  # the oracle: a fresh model holding that adapter
        oracle = lora_tiny_model(tiny_checkpoint[0]).eval()
        with torch.no_grad():
            for name, p in oracle.named_parameters():
                if name in adapter:
                    p.copy_(adapter[name])
            return grpo.completion_hidden(oracle, b["prompts"], b["tokens"], b["mask"], torch.float32)

    config = StepConfig(credit="arca-recent", arca_recent_updates=1)
    model.zero_grad(set_to_none=True)
    inputs, weights, _, _ = grpo.train_micro_batch(model, b["prompts"], b["tokens"], b["mask"],
                                                   b["advantages"], config, 2)
    expected = arca_scores(hidden_with(after), hidden_with(before))
    scores = arca_scores(inputs["h_now"], inputs["h_recent"])  # (B, T)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    with disable_adapter(model), torch.no_grad():
        h_base = grpo.completion_hidden(model, b["prompts"], b["tokens"], b["mask"])
    assert not torch.allclose(expected, arca_scores(hidden_with(after), h_base), atol=1e-3)  # ARCA's differs
    assert all(torch.equal(p, after[name]) for name, p in model.named_parameters() if p.requires_grad)
    extra_pass = lora_gradient(model)
    model.zero_grad(set_to_none=True)  # the same loss with those weights, without any older adapter's pass
    logprobs, _, _ = grpo.completion_forward(model, b["prompts"], b["tokens"], b["mask"])
    grpo.policy_loss(logprobs, b["advantages"], weights, 2).backward()
    assert torch.equal(extra_pass, lora_gradient(model))


def test_grpo_step_updates_lora_only_and_skips_non_finite(tiny_checkpoint):
    model = lora_tiny_model(tiny_checkpoint[0])
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = StepConfig(credit="arca", beta=0.05)
    g = torch.Generator().manual_seed(0)
    metrics, rollout, rewards = one_grpo_step(model, optimizer, scheduler, [[5, 9, 2], [4, 11]], ["0", "0"],
                                              reward_first_token_even, config, g)
    assert rollout.tokens.shape[0] == 8 and rollout.prompt_index.tolist() == [0] * 4 + [1] * 4
    assert 0 < metrics["reward_mean"] < 1 and not metrics["skipped_update"]  # the seed gives a mixed group
    assert metrics["logprob_gap"] < 1e-5  # sampler and training forward agree (fp32, dropout 0)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all((layer.lora_B != 0).any() for layer in model.modules() if hasattr(layer, "lora_B"))
    # a non-finite loss (here from a NaN reward) skips the update, leaves the adapter as it was, and says so
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    nan_rewards = lambda texts, golds: ([float("nan"), 1.0, 0.0, 1.0] * 2, 0)
    metrics, _, _ = one_grpo_step(model, optimizer, scheduler, [[5, 9, 2], [4, 11]], ["0", "0"], nan_rewards,
                                  StepConfig(credit="uniform"), g)
    assert metrics["skipped_update"]
    assert all(torch.equal(a, b) for a, b in zip([p for p in model.parameters() if p.requires_grad], before))


def test_folded_masked_attention_equals_sdpa_gqa(gqa_model):
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        plain = gqa_model(ids)  # no mask: SDPA's causal GQA path
        folded = gqa_model(ids, torch.ones_like(ids))  # a mask: G = 4 query heads folded per KV head
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=1e-5)


MATH_DATA_DIR = SHARED_DATA / "math"


PWNED_FILE = Path("/tmp/arca_math_reward_pwned")  # created only if model text were executed


# (predicted answer, gold answer, equivalent?) -- the prediction is put in a box.
LABELLED = [
    # plain numbers and near-misses
    ("3", "3", True),
    ("3", "3.1", False),
    ("10", "100", False),
    ("1/2", "2", False),
    ("-3", "3", False),
    ("3.0", "3", True),
    ("03", "3", True),
    ("2.50", "2.5", True),
    ("0.5", "\\frac{1}{2}", True),
    (".5", "0.5", True),
    ("-.5", "-\\frac12", True),
    ("0.333", "\\frac{1}{3}", False),
    ("0.3333333333", "\\frac{1}{3}", False),  # exact numbers compare exactly
    ("1.4142135623731", "\\sqrt{2}", True),  # a decimal vs an irrational: relative 1e-9
    ("1.414", "\\sqrt{2}", False),
    ("3.14", "\\pi", False),
    # thousands separators
    ("12441600", "12,\\!441,\\!600", True),
    ("12,441,600", "12441600", True),
    ("23000", "\\$23{,}000", True),
    ("1,000", "1000", True),
    ("1,000", "100", False),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100", True),
    # fractions: \dfrac, \tfrac, shorthand, slash
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("\\tfrac{3}{4}", "\\frac{3}{4}", True),
    ("\\cfrac{3}{4}", "0.75", True),
    ("\\frac 54", "\\frac{5}{4}", True),
    ("\\frac1{72}", "\\frac{1}{72}", True),
    ("5/4", "\\frac{5}{4}", True),
    ("4/5", "\\frac{5}{4}", False),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("-\\frac{1}{9}", "\\frac{-1}{9}", True),
    ("\\frac{1}{9}", "-\\frac{1}{9}", False),
    ("8\\frac47", "\\frac{60}{7}", True),  # mixed numbers
    ("1\\frac{1}{4}", "1.25", True),
    ("-8\\frac47", "-\\frac{60}{7}", True),
    ("8\\frac47", "\\frac{32}{7}", False),
    # roots and pi
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\sqrt8", "2\\sqrt2", True),
    ("2\\sqrt{3}", "\\sqrt{8}", False),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\frac{2\\sqrt{35}}{35}", "\\frac{2}{\\sqrt{35}}", True),
    ("\\sqrt[3]{8}", "2", True),
    ("\\sqrt[3]{4}", "\\sqrt{4}", False),
    ("2\\pi", "\\pi \\cdot 2", True),
    ("72\\pi", "72 \\pi", True),
    ("\\frac{9\\pi}{2}", "4.5\\pi", True),
    ("\\frac{81}{32}\\pi", "\\frac{81\\pi}{32}", True),
    ("3\\pi", "3", False),
    ("18+2\\pi", "2\\pi+18", True),
    ("\\sqrt{185} - 4", "-4+\\sqrt{185}", True),
    ("\\sqrt3-\\sqrt2", "\\sqrt2-\\sqrt3", False),
    ("\\pi r^2", "r^2 \\pi", True),
    # powers
    ("2^{10}", "1024", True),
    ("2^{2008}-2", "2^{2008} -2", True),
    ("2^{2008}-1", "2^{2008}-2", False),
    ("5^{12}", "244140625", True),
    ("5^{12}", "5^{13}", False),
    ("2**10", "1024", True),
    ("x^{-1}", "\\frac{1}{x}", True),
    # factorials, binomials, logs, trig
    ("5!", "120", True),
    ("\\binom{5}{2}", "10", True),
    ("\\dbinom{6}{3}", "20", True),
    ("\\log_2 8", "3", True),
    ("\\ln(e^2)", "2", True),
    ("\\sin^2 x + \\cos^2 x", "1", True),
    ("\\tan 15^\\circ", "2-\\sqrt{3}", True),
    ("\\cos 60^\\circ", "\\frac12", True),
    ("\\cot x", "\\frac{\\cos x}{\\sin x}", True),
    ("\\cot x", "\\tan x", False),
    ("|-3|", "3", True),
    # complex numbers
    ("6-3i", "6 - 3i", True),
    ("-3i+6", "6-3i", True),
    ("6+3i", "6-3i", False),
    ("\\frac{3}{2} + \\frac{3}{2} i", "1.5+1.5i", True),
    ("i^2", "-1", True),
    # polynomials and rational functions
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2", "x^3", False),
    ("x^2+2x", "(x+1)^2", False),
    ("(t-7)(t+7)", "t^2-49", True),
    ("-6t^4 +11t^3 -19t^2 +17t -10", "11t^3-6t^4-19t^2+17t-10", True),
    ("-6t^4 +11t^3 -19t^2 +17t -10", "-6t^4 +11t^3 -19t^2 +17t +10", False),
    ("4x(8x^2-x+5)", "32x^3-4x^2+20x", True),
    ("\\frac{1}{y} + y", "\\frac{y^2+1}{y}", True),
    ("\\frac{11+9a}{20}", "\\frac{11}{20}+\\frac{9a}{20}", True),
    ("\\frac{11+9a}{20}", "\\frac{11+9b}{20}", False),
    ("10p^3 \\sqrt{3p}", "10\\sqrt{3}p^{7/2}", True),
    ("x+y", "y+x", True),
    ("xy", "yx", True),
    ("x-y", "y-x", False),
    ("a_1 + a_2", "a_2 + a_1", True),
    ("a_1", "a_2", False),
    ("\\frac{1}{4m}", "\\frac{1}{4}m", False),
    ("29b(5b+1)", "145b^2+29b", True),
    # tuples, points, vectors
    ("(1,2)", "(1, 2)", True),
    ("(1,2)", "(2,1)", False),
    ("(1,2)", "[1,2]", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
    ("(3, \\frac{\\pi}{2})", "(3, \\frac{3\\pi}{2})", False),
    ("\\left( \\frac{170}{49}, \\frac{78}{49}, \\frac{10}{49} \\right)", "(170/49, 78/49, 10/49)", True),
    ("(1,2,3)", "(1,2)", False),
    ("(0.5, 2)", "(\\frac12, 2)", True),
    ("(-\\tfrac52, -\\tfrac52)", "(-2.5, -2.5)", True),
    # intervals and unions: open and closed ends matter
    ("[0,1)", "[0,1)", True),
    ("[0,1)", "[0,1]", False),
    ("(0,1]", "[0,1]", False),
    ("[-2,2]", "\\left[ -2, 2 \\right]", True),
    ("(-\\infty, 0]", "(-\\infty,0]", True),
    ("(-\\infty, 0)", "(-\\infty,0]", False),
    ("(-\\infty,-5]\\cup[5,\\infty)", "[5,\\infty) \\cup (-\\infty,-5]", True),
    ("(-\\infty,-5)\\cup[5,\\infty)", "(-\\infty,-5]\\cup[5,\\infty)", False),
    ("x \\in [2, 5)", "[2,5)", True),
    ("\\left[ \\frac{1}{2}, \\frac{3}{2} \\right]", "[0.5, 1.5]", True),
    # sets and lists of solutions (order-free)
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\{1,2\\}", "\\{1,3\\}", False),
    ("2,-2", "-2, 2", True),
    ("2, -1", "-1,2", True),
    ("2, -1", "2", False),
    ("1, 1, 2", "1, 2", False),
    ("-2,-1,1,2", "1,2,-1,-2", True),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", True),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}", False),
    ("\\{1\\pm\\sqrt{5},-2\\}", "\\{-2, 1+\\sqrt5, 1-\\sqrt5\\}", True),
    ("3 - i, -2 + i", "-2+i, 3-i", True),
    ("6, 8, and 10", "6,8,10", True),
    ("19 \\text{ and } 43", "43, 19", True),
    ("4^\\circ, 20^\\circ", "20, 4", True),
    # matrices
    ("\\begin{pmatrix} 1 \\\\ 4 \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix}1\\\\4\\\\3\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ 4 \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 3 \\\\ 4 \\end{pmatrix}",
     False),
    ("\\begin{bmatrix} 1/5 \\\\ -3/5 \\end{bmatrix}", "\\begin{pmatrix} 0.2 \\\\ -0.6 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 1/\\sqrt{2} & 1/\\sqrt{2} \\\\ -1/\\sqrt{2} & 1/\\sqrt{2} \\end{pmatrix}",
     "\\begin{pmatrix} \\frac{\\sqrt2}{2} & \\frac{\\sqrt2}{2} \\\\ -\\frac{\\sqrt2}{2} & \\frac{\\sqrt2}{2} "
     "\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix} 1 & 3 \\\\ 2 & 4 \\end{pmatrix}",
     False),
    ("\\begin{pmatrix} 1 & 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    # equations
    ("y = 1-2x", "y=-2x+1", True),
    ("y = 1+2x", "y=-2x+1", False),
    ("x + 2y - 2z - 9 = 0", "2z - x - 2y + 9 = 0", True),
    ("x + 2y - 2z - 9 = 0", "x + 2y - 2z + 9 = 0", False),
    ("20x + 23y + 26z - 69 = 0", "20x+23y+26z=69", True),
    ("3x - y = 2", "y = 3x - 2", True),
    ("3+y = 2x", "y = 2x + 3", False),
    ("x = 5", "5", True),
    ("k=6", "6", True),
    ("b=\\frac{1}{49}", "\\frac{1}{49}", True),
    ("x = \\frac{3}{2}", "1.5", True),
    ("x = 2", "3", False),
    # units, text, degrees, percent, dollars
    ("441", "441\\text{ pounds}", True),
    ("441 pounds", "441", True),
    ("5 inches", "5\\text{ inches}", True),
    ("45", "45 \\text{ units}^2", True),
    ("8\\sqrt{3}", "8\\sqrt{3} \\text { square inches}", True),
    ("480 + 480\\sqrt{3}", "480 + 480\\sqrt{3}\\text{ feet}", True),
    ("20\\text{ miles}", "21", False),
    ("117^\\circ", "117", True),
    ("117^{\\circ}", "117", True),
    ("117°", "117", True),
    ("117 degrees", "117", True),
    ("118^\\circ", "117", False),
    ("44\\%", "44", True),
    ("44%", "44\\%", True),
    ("45\\%", "44\\%", False),
    ("\\$0.25", "0.25", True),
    ("\\$ 139", "139", True),
    ("\\$4813.24", "4813.24", True),
    ("\\$4813.25", "4813.24", False),
    ("\\text{Sunday}", "Sunday", True),
    ("sunday", "\\text{Sunday}", True),
    ("\\text{Monday}", "\\text{Sunday}", False),
    ("\\text{odd}", "odd", True),
    ("\\text{dod}", "\\text{odd}", False),
    ("\\mbox{four}", "four", True),
    ("\\text{(E)}", "E", True),
    ("(E)", "\\text{(E)}", True),
    ("D", "\\text{(E)}", False),
    ("\\textbf{13}", "13", True),
    # spacing, \left/\right, trailing period, dollars around the answer
    ("\\! 1 \\, 2 \\; 3", "123", True),
    ("\\left(1,2\\right)", "(1,2)", True),
    ("5.", "5", True),
    ("$5$", "5", True),
    ("\\displaystyle\\frac{1}{2}", "\\frac12", True),
    ("5\\ \\text{cm}", "5", True),
    # bases
    ("11011100_2", "11011100", True),
    ("141_{13}", "141_{13}", True),
    ("141_{13}", "142", False),
    ("2021_3", "2021", True),
    ("4210_{5}", "4210_{7}", False),
    ("1_6", "1_7", False),
    # repeating decimals
    ("\\frac{1}{3}", "0.\\overline{3}", True),
    ("\\frac16", "0.1\\overline{6}", True),
    ("-\\frac{14}{11}", "-1.\\overline{27}", True),
    ("\\frac{1}{3}", "0.\\overline{6}", False),
    # plain-text math a model may write
    ("sqrt(2)/2", "\\frac{\\sqrt{2}}{2}", True),
    ("3*pi", "3\\pi", True),
    ("1/(2*sqrt(3))", "\\frac{\\sqrt3}{6}", True),
    ("(3 + sqrt(5))/2", "\\frac{3+\\sqrt{5}}{2}", True),
    ("x^2 - 2x + 2", "x^2-10x+41", False),
    # infinity
    ("\\infty", "\\infty", True),
    ("-\\infty", "\\infty", False),
    # no answer
    ("", "5", False),
    ("5", "", False),
]


def test_labelled_cases():
    wrong = [(pred, gold, expected) for pred, gold, expected in LABELLED
             if math_reward(boxed(pred), gold) != float(expected)]
    print(f"\nlabelled cases: {len(LABELLED) - len(wrong)}/{len(LABELLED)} right")
    assert len(LABELLED) >= 150
    assert not wrong


def test_is_equiv_is_symmetric_on_labelled_cases():
    for pred, gold, expected in LABELLED:
        if pred and gold:
            assert is_equiv(gold, pred) == expected, (pred, gold)


EXTRACTION = [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("first \\boxed{1}, then \\boxed{2}", "2"),
    ("answer: $\\boxed 9$.", "9"),
    ("\\boxed {17}.", "17"),
    ("\\fbox{5}", "5"),
    ("\\boxed{\\{1\\pm\\sqrt{5},-2\\}}", "\\{1\\pm\\sqrt{5},-2\\}"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("no box here", None),
    ("\\boxed{1} then \\boxed{2", None),
    ("\\boxed{", None),
    ("\\boxed", None),
    ("\\boxed{}", ""),
]


@pytest.mark.parametrize("text, expected", EXTRACTION)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


NORMALISATION = [
    ("\\left( 3, \\dfrac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("\\$12,\\!441.50", "12441.50"),
    ("x = \\frac12.", "\\frac{1}{2}"),
    ("117^\\circ", "117"),
    ("\\text{(E)}", "E"),
    ("441\\text{ pounds}", "441"),
    ("\\sqrt3", "\\sqrt{3}"),
    (".5", "0.5"),
    ("\\pi r^2", "\\pi r^2"),
    ("a \\leq b", "a\\leq b"),
    ("141_13", "141_{13}"),
    ("0.\\overline{3}", "\\frac{3}{9}"),
]


@pytest.mark.parametrize("answer, expected", NORMALISATION)
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


def test_gold_may_be_a_full_solution():
    solution = "Adding, $(2+2)+(1+3)i=\\boxed{4+4i}$."
    assert math_reward(boxed("4+4i"), solution) == 1.0
    assert math_reward(boxed("4-4i"), solution) == 0.0


ADVERSARIAL = {
    "exponent tower": boxed("9^{9^{9^9}}"),
    "exponent tower with a variable": boxed("x^{x^{x^{x^{x}}}}"),
    "e tower": boxed("e^{e^{e^{e^{100}}}}"),
    "exp tower": boxed("\\exp(\\exp(\\exp(100)))"),
    "sinh tower": boxed("\\sinh(\\cosh(\\sinh(100)))"),
    "huge power of a power": boxed("(10^{10000})^{10000}"),
    "nested powers": boxed("((((2^{100})^{100})^{100})^{100})"),
    "power of a root": boxed("(\\sqrt{2^{9999}})^{9999}"),
    "big integer power": boxed("*".join(["9" * 100] * 9) + "^{9999}"),
    "factorial tower": boxed("(((3!)!)!)!"),
    "double factorial": boxed("1000!!"),
    "factorial of a huge number": boxed("(10^{100})!"),
    "factorial of a variable tower": boxed("((x!)!)!"),
    "big binomial": boxed("\\binom{10^{9}}{5}"),
    "sin of a huge number": boxed("\\sin(10^{10000})"),
    "root of huge index": boxed("\\sqrt[" + "9" * 99 + "]{2}"),
    "million-character answer": boxed("1" * 10**6),
    "million-character sum": boxed("+".join(["x"] * 300_000)),
    "million characters, no box": "a" * 10**6,
    "thousands of nested braces": boxed("{" * 5000 + "1" + "}" * 5000),
    "thousands of nested parentheses": boxed("(" * 5000 + "1" + ")" * 5000),
    "thousands of nested fracs": boxed("\\frac" * 3000 + "1" * 3000),
    "nested tuples": boxed("(" * 40 + "1,2" + ")" * 40),
    "unbalanced braces": "\\boxed{" * 10000,
    "unbalanced inside": boxed("{{{{{1") + "}" * 3,
    "NUL bytes": boxed("1\x002") + "\x00" * 1000,
    "only a NUL in the box": "\x00" * 1000 + boxed("\x00"),
    "python os.system": boxed(f"__import__('os').system('touch {PWNED_FILE}')"),
    "python open": boxed(f"open('{PWNED_FILE}', 'w').write('x')"),
    "python exec": boxed(f"exec(\"open('{PWNED_FILE}', 'w')\")"),
    "sympify lambda": boxed(f"(lambda: open('{PWNED_FILE}', 'w'))()"),
    "many elements": boxed(",".join(str(i) for i in range(2000))),
    "big set": boxed("\\{" + ",".join(f"x^{i}" for i in range(32)) + "\\}"),
    "big matrix": boxed("\\begin{pmatrix}" + "\\\\".join("&".join(["1"] * 32) for _ in range(32))
                        + "\\end{pmatrix}"),
    "many plus-minus": boxed("\\pm" * 500),
    "long subscript": boxed("x_{" + "1" * 900 + "}"),
    "division by zero": boxed("1/0"),
    "zero to a negative power": boxed("0^{-1}"),
    "tan of pi/2": boxed("\\tan(\\pi/2)"),
    "unicode": boxed("π√∞±" * 100),
    # found by fuzzing: each took sympy seconds to minutes before its guard
    "binomial with a huge k": boxed("\\binom{x}{99999999999}"),
    "999th root": boxed("\\frac{\\log_{y}{-1}}{\\sqrt[999]{i\\cdot 99999999999}}"),
    "root of a factorial": boxed("\\sqrt{99999999999+(1000+9)!}"),
    "complex power of a power": boxed("\\frac{\\sqrt[y]{{{y}^{1000}}^{\\sqrt{i}}}}{2}"),
    "tiny exponent": boxed("\\frac{\\sinh(-10^{4})}{99999999999^{1/99999999999^{9}}}"),
}


ADVERSARIAL_GOLDS = ["1", "x", "\\frac{\\sqrt3}{2}", "(1,2)", "\\{1,2\\}", "y = 2x+3",
                     "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"]


def test_adversarial_inputs_are_fast_and_harmless():
    slowest = (0.0, "")
    for name, completion in ADVERSARIAL.items():
        for gold in ADVERSARIAL_GOLDS + [completion]:
            start = time.perf_counter()
            reward = math_reward(completion, gold)
            elapsed = time.perf_counter() - start
            assert reward in (0.0, 1.0), name
            slowest = max(slowest, (elapsed, name))
            assert elapsed < 2.0, (name, elapsed)
    print(f"\nslowest adversarial call: {slowest[0] * 1000:.0f} ms ({slowest[1]})")
    assert not PWNED_FILE.exists()


STRICT_CASES = [  # (completion, gold, strict_match, math_reward)
    ("so \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}", 1.0, 1.0),  # \dfrac -> \frac
    ("\\boxed{\\tfrac{1}{2}}", "\\frac{1}{2}", 1.0, 1.0),
    ("\\boxed{ 12. }", "12", 1.0, 1.0),  # strip, trailing period
    ("\\boxed{x  +\n y}", "x + y", 1.0, 1.0),  # whitespace runs to one space
    ("\\boxed{\\left(3, 4\\right)}", "(3, 4)", 1.0, 1.0),  # \left, \right deleted
    ("\\boxed{5\\,\\text{cm}}", "5\\text{cm}", 1.0, 1.0),  # \, and \text deleted: both sides read "5{cm}"
    ("\\boxed{1} then \\boxed{2}", "2", 1.0, 1.0),  # the last box
    ("\\boxed{a\\{b\\}}", "a\\{b\\}", 1.0, 1.0),  # balanced braces
    # where the reference rejects what the symbolic checker accepts
    ("\\boxed{0.5}", "\\frac{1}{2}", 0.0, 1.0),
    ("\\boxed{x = 5}", "5", 0.0, 1.0),
    ("\\boxed{1,000}", "1000", 0.0, 1.0),
    ("\\boxed{(1,2)}", "(1, 2)", 0.0, 1.0),
    # no lowercasing (the reference's docstring says so, its code does not)
    ("\\boxed{ABC}", "abc", 0.0, 1.0),
    # no answer
    ("no box at all", "5", 0.0, 0.0),
    ("\\boxed{5", "5", 0.0, 0.0),  # the last box never closes
    ("\\boxed{5} and \\boxed{6", "5", 0.0, 0.0),  # ... and neither falls back to an earlier one
]


@pytest.mark.parametrize("completion, gold, strict, symbolic", STRICT_CASES)
def test_strict_match_is_the_reference_codes_check(completion, gold, strict, symbolic):
    assert strict_match(completion, gold) == strict
    # a gold solution: its last box
    assert strict_match(completion, "Solution: so \\boxed{" + gold + "}.") == strict
    assert math_reward(completion, gold) == symbolic  # the two checkers differ exactly where the table says


def test_strict_match_is_linear_on_hostile_text():
    start = time.perf_counter()
    assert strict_match("\\boxed{" * 200_000 + "x", "x") == 0.0
    assert strict_match("{" * 10**6 + "\\boxed{1}", "1") == 1.0
    assert time.perf_counter() - start < 2.0


def test_math_solutions_score_one_against_their_own_answer():
    if not MATH_DATA_DIR.is_dir():
        pytest.skip(f"{MATH_DATA_DIR} not found")
    n_checks, failures = 0, []
    start = time.perf_counter()
    for name in ("test500.jsonl", "test5000.jsonl", "train.jsonl"):
        with open(MATH_DATA_DIR / name) as f:
            for line in f:
                row = json.loads(line)
                assert extract_boxed(row["solution"]) == row["answer"], row["unique_id"]
                if not row["answer"]:  # two train rows have an empty \boxed{}
                    continue
                n_checks += 1
                if math_reward(row["solution"], row["answer"]) != 1.0:
                    failures.append(row["unique_id"])
    elapsed = time.perf_counter() - start
    print(f"\nMATH solutions: {n_checks} checks in {elapsed:.2f} s ({n_checks / elapsed:.0f} per second)")
    assert n_checks == 17_498
    assert not failures


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.text(max_size=50))
def test_math_reward_never_raises_on_arbitrary_text(completion, gold):
    assert math_reward(completion, gold) in (0.0, 1.0)


MATH_ALPHABET = st.sampled_from(list("0123456789xyie+-*/^_!.,=()[]{}| ") + [
    "\\frac", "\\sqrt", "\\pi", "\\infty", "\\pm", "\\cup", "\\{", "\\}", "\\left(", "\\right)",
    "\\text{", "\\sin", "\\exp", "\\log", "\\binom", "^\\circ", "\\%", "\\$", "\\\\", "&",
    "\\begin{pmatrix}", "\\end{pmatrix}", "\\boxed{", "}"])


@settings(max_examples=300, deadline=None)
@given(st.lists(MATH_ALPHABET, max_size=40).map("".join), st.lists(MATH_ALPHABET, max_size=20).map("".join))
def test_math_reward_never_raises_on_math_like_text(completion, gold):
    start = time.perf_counter()
    assert math_reward(boxed(completion), gold) in (0.0, 1.0)
    assert time.perf_counter() - start < 2.0


def test_huge_function_arguments_are_refused_fast():
    start = time.perf_counter()
    for text in ("\\cos(5000! \\cdot 60)", "\\sin(e^{10000})", "\\tan(10^{3000})", "\\log(2^{5000})"):
        assert math_reward(boxed(text), "\\frac{1}{2}") == 0.0
        assert math_reward(boxed(text), text) == 1.0  # the same text still matches as a string
    # ordinary arguments still compare
    assert math_reward(boxed("\\sin(2^{10}) + 1"), "1 + \\sin 1024") == 1.0
    # refused before evaluation: milliseconds, not the minute cos(5000!) could take
    assert time.perf_counter() - start < 5.0
