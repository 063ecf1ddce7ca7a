"""load_base refuses a base model whose logits are not W_out·h (everything reads log pi1 = log_softmax(W_out·h)),
with one line that names the model and the cause: a config's softcap or logit scale, a bias, or the probe."""
import pytest
import torch
import torch.nn as nn
import transformers
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from support import loading
from tests.conftest import NO_WEIGHTS, embedded_model_installed

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)


def saved(model, tmp_path):
    """A tiny random model saved as a local model folder: load_base's path, no tokenizer needed to refuse it."""
    torch.manual_seed(0)
    model.save_pretrained(tmp_path)
    return str(tmp_path)


def refused(load, *args, **kwargs):
    """The one-line message of the SystemExit that load(*args) raises."""
    with pytest.raises(SystemExit) as e:
        load(*args, **kwargs)
    message = str(e.value.code)
    assert message.startswith("error: base model ") and "\n" not in message
    return message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_llama_passes(tiny_path, dtype):
    model, _ = loading.load_base(tiny_path, dtype=dtype)
    assert model.dtype == dtype


def test_the_embedded_default_passes():
    if not embedded_model_installed():
        pytest.skip(NO_WEIGHTS)
    loading.check_output_layer(loading.load_base()[0], loading.EMBEDDED)


def test_a_softcapped_gemma2_is_refused_by_name(tmp_path):
    path = saved(Gemma2ForCausalLM(Gemma2Config(**SMALL, final_logit_softcapping=30.0)), tmp_path)
    message = refused(loading.load_base, path)
    assert repr(path) in message and "softcapping" in message and "final_logit_softcapping=30.0" in message


def test_gemma2_without_the_softcap_passes():
    """The refusal is the softcap's, not the family's: the probe finds logits = W_out·h."""
    loading.check_output_layer(Gemma2ForCausalLM(Gemma2Config(**SMALL, final_logit_softcapping=None)).eval(), "g")


@pytest.mark.skipif(not hasattr(transformers, "CohereForCausalLM"), reason="no Cohere in this transformers")
def test_a_cohere_logit_scale_is_refused_by_name(tmp_path):
    path = saved(transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL)), tmp_path)  # logit_scale 0.0625
    message = refused(loading.load_base, path)
    assert repr(path) in message and "logit scale" in message and "logit_scale=0.0625" in message


def test_an_output_layer_with_a_bias_is_refused_by_name():
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    model.lm_head = nn.Linear(64, 128, bias=True)  # what from_pretrained cannot load into a Llama: set it here
    message = refused(loading.check_output_layer, model, "llama-with-bias")
    assert "'llama-with-bias'" in message and "bias" in message


class ScaledLlama(LlamaForCausalLM):
    """Logits = 0.5·W_out·h, and no config attribute says so."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 0.5 * out.logits
        return out


def test_an_unannounced_change_of_the_logits_is_refused_by_the_probe():
    message = refused(loading.check_output_layer, ScaledLlama(LlamaConfig(**SMALL)).eval(), "scaled-llama")
    assert "'scaled-llama'" in message and "differ from W_out·h by 50.00%" in message
