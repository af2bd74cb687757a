"""Real PEFT LoRA adapters with random non-zero A and B, for the valve tests."""
from __future__ import annotations

import copy

import torch


def make_adapter(base, path, seed=1, std=0.3, **lora_kw):
    """A PEFT LoRA on a copy of ``base`` with random A and B (N(0, std²)), saved to
    ``path``. Returns the PEFT model (eval), each LoRA layer remembering its scaling so that
    ``set_peft_alpha`` can scale it."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    pm = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora_kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in pm.modules():
            if isinstance(m, LoraLayer):
                for lin in (m.lora_A["default"], m.lora_B["default"]):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
                m._valve_test_scaling = m.scaling["default"]
    pm.save_pretrained(str(path))
    return pm


def set_peft_alpha(pm, alpha):
    """PEFT's LoRA scaling times ``alpha``: what a valve at ``alpha`` must equal."""
    from peft.tuners.lora import LoraLayer

    for m in pm.modules():
        if isinstance(m, LoraLayer):
            m.scaling["default"] = m._valve_test_scaling * alpha
