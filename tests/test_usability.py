"""What a new user meets first (issue 14): defaults of the API, the documented CCoT bundle
flow as the README writes it, GPT-2's position limit, the top-level names."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cotrt
from cotrt.testing import tiny_model


@pytest.fixture(scope="module")
def tiny_rt(smol_tokenizer):
    return cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=1), smol_tokenizer, max_batch=2)


def test_generate_and_chat_without_params_use_the_defaults(tiny_rt):
    want = tiny_rt.generate(["a"], cotrt.Params())[0]
    got = tiny_rt.generate(["a"])[0]
    assert got.token_ids == want.token_ids and len(got.token_ids) == cotrt.Params().max_new_tokens
    conv = [{"role": "user", "content": "hi"}]
    assert tiny_rt.chat([conv])[0].token_ids == tiny_rt.chat([conv], cotrt.Params())[0].token_ids


def _gpt2(tok, n_positions):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=n_positions,
                        bos_token_id=1, eos_token_id=2)
    return tf.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("limit,want", [(1024, 1024), (4096, 2048)])
def test_max_len_defaults_to_the_model_limit_up_to_2048(smol_tokenizer, limit, want):
    rt = cotrt.wrap(_gpt2(smol_tokenizer, limit), smol_tokenizer, max_batch=1)
    assert rt.engine.max_len == want and rt.runner.max_len == want
    with pytest.raises(ValueError, match="max_len=2048 exceeds the model's max_position_embeddings=1024"):
        cotrt.wrap(_gpt2(smol_tokenizer, 1024), smol_tokenizer, max_len=2048)
    with pytest.raises(ValueError, match="max_len must be an int >= 2 or None"):
        cotrt.wrap(_gpt2(smol_tokenizer, 1024), smol_tokenizer, max_len=1.5)


def test_builtin_policies_at_top_level():
    from cotrt.control import policies

    for name in ("DEER", "Dynasor", "EAT", "NoWait", "StepLimit", "ValveSchedule"):
        assert getattr(cotrt, name) is getattr(policies, name) and name in cotrt.__all__ and name in dir(cotrt)


def test_ccot_bundle_flow_as_documented(smol_tokenizer, tmp_path):
    """README: ``load_ccot_bundle(path)`` -> ``cotrt.wrap(model, tok)`` ->
    ``Params(latent=latent)``: wrap takes the valves the loader left on the model."""
    peft = pytest.importorskip("peft")
    from cotrt.loaders import load_ccot_bundle, save_ccot_bundle

    base = tiny_model("llama", len(smol_tokenizer), seed=5)
    adapters = {}
    for name, targets in (("contemplate", ["q_proj", "v_proj"]), ("answer", ["o_proj"])):
        torch.manual_seed(len(name))
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        adapters[name] = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    smol_tokenizer.save_pretrained(base_dir)
    head = nn.Linear(64, 1)
    with torch.no_grad():  # never END: the phase runs to max_steps
        head.weight.zero_()
        head.bias.fill_(-10.0)
    save_ccot_bundle(tmp_path / "my-ccot", contemplate=adapters["contemplate"], answer=adapters["answer"],
                     end_head=head, feedback_layer=-1, max_steps=3, base=str(base_dir))

    model, tok, latent = load_ccot_bundle(tmp_path / "my-ccot")
    rt = cotrt.wrap(model, tok)
    assert rt.valves is model.cotrt_valves and rt.valves.names == ["contemplate", "answer"]
    out = rt.generate(["3 + 4 ="], cotrt.Params(latent=latent, max_new_tokens=8))[0]
    assert out.finish_reason != "error", out.error
    assert out.stats["latent_steps"] == 3
    # The valves act: the same request without them (a fresh base) decodes differently.
    plain = cotrt.wrap(*cotrt.load_model(str(base_dir), quiet=True))
    assert plain.generate(["3 + 4 ="], cotrt.Params(max_new_tokens=8))[0].token_ids != \
        rt.generate(["3 + 4 ="], cotrt.Params(max_new_tokens=8, valve={"answer": 1.0}))[0].token_ids


def test_wrap_refuses_a_foreign_valve_set(smol_tokenizer):
    from cotrt.valve import ValveSet

    model = tiny_model("llama", len(smol_tokenizer), seed=2)
    model.cotrt_valves = ValveSet(tiny_model("llama", len(smol_tokenizer), seed=3))
    with pytest.raises(ValueError, match="model.cotrt_valves was built on another model"):
        cotrt.wrap(model, smol_tokenizer)


def test_loading_is_quiet_and_restores_the_progress_bar(smol_tokenizer, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    tiny_model("llama", len(smol_tokenizer), seed=6).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    capfd.readouterr()
    hf_logging.enable_progress_bar()
    cotrt.load_model(str(tmp_path))
    err = capfd.readouterr().err
    assert "Loading weights" not in err and err.startswith("[cotrt] loading")
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is back


def test_peft_futurewarning_is_quiet_while_loading(smol_tokenizer):
    import warnings

    peft = pytest.importorskip("peft")
    from cotrt.models import quiet_loading

    def wrap_with_peft():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with quiet_loading():
                peft.get_peft_model(tiny_model("llama", len(smol_tokenizer), seed=7),
                                    peft.LoraConfig(r=2, target_modules=["q_proj"]))
        return [w for w in seen if "is_gradient_checkpointing" in str(w.message)]

    assert wrap_with_peft() == []
