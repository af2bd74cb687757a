"""Greedy parity against HF ``generate``, with numerical ties reported instead of hidden."""
from __future__ import annotations

import warnings

import torch

TIE_GAP = 1e-4


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos=None) -> list[int]:
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    if eos is not None:
        kwargs["eos_token_id"] = eos
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out[0, len(prompt):].tolist()


def top2_gap(model, seq: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def assert_greedy_match(model, prompt, ours: list[int], ref: list[int], label: str = "") -> None:
    """``ours`` must equal ``ref`` up to ``ref``'s length (HF stops at EOS). A divergence
    is accepted only where the reference's top-2 logit gap is below ``TIE_GAP``, and is
    then reported as a warning, naming the step."""
    n = min(len(ours), len(ref))
    for i in range(n):
        if ours[i] != ref[i]:
            gap = top2_gap(model, list(prompt) + ref[:i])
            if gap < TIE_GAP:
                warnings.warn(f"{label}: numerical tie at step {i} (top-2 gap {gap:.2e}); compared {i} tokens")
                return
            raise AssertionError(
                f"{label}: diverged at step {i}: ours {ours[i]} vs HF {ref[i]} (top-2 gap {gap:.3g})\n"
                f"ours {ours[:i + 3]}\nref  {ref[:i + 3]}"
            )
    assert len(ours) >= len(ref), f"{label}: stopped after {len(ours)} tokens, HF generated {len(ref)}"
