"""Train the latent testbed's models (hops.py's task) on this CPU, from a seed.

    python -m cotrt.testbed.latent_train --out DIR --seed S [--quick]

Writes
    DIR/base/     an HF checkpoint (config, safetensors, tokenizer.json): a small Llama trained
                  on full chains (one step per hop, hops.py), with a quarter of its examples in
                  no-CoT form (thinking closed at once, then the answer), so the no-CoT
                  baseline is a trained mode of the same model, not an untrained prompt;
    DIR/coconut/stage_{s}.pt  Coconut (Hao et al. 2024, arXiv 2412.06769) after curriculum
                  stage s: the first s chain steps replaced by c=1 continuous thought each (the
                  final-norm state fed back as the next input embedding), the optimizer reset
                  at each stage, the loss on the remaining tokens; Coconut's checkpoint format
                  for ``cotrt.loaders.load_coconut``. Departures: no ``<|start-latent|>`` (the
                  prompt's ``<think>\n`` opens the thoughts; with it, one-token chain steps,
                  stage 5 fell to 0.085 on validation) and no ``<|end-latent|>`` (the last
                  thought predicts the next step's node; see coconut_latent);
    DIR/ccot/     a CCoT bundle (Cheng & Van Durme 2024, arXiv 2412.13171) for
                  ``cotrt.loaders.load_ccot_bundle``: a contemplation LoRA (one step per
                  hop, the final-norm state fed back as the next input), an END head
                  (final-norm state -> logit) that fires once the question's hops are done,
                  and an answer LoRA, on the frozen base; trained by a Coconut-style
                  curriculum (train_ccot). Departures from the paper: that curriculum in
                  place of its state matching, and final-norm feedback in place of a middle
                  layer's residual (both failed here, see train_ccot);
    DIR/train_log.json  settings, losses, CPU seconds per model.

Training is deterministic on one machine: one thread, ``torch.use_deterministic_algorithms``,
seeded initialisation and seeded data order. Times are ``time.process_time()`` (CPU seconds
of this one-thread process), not wall time.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import hops
from .coconut import coconut_state_dict, next_token_loss, thought_rollout
from .optim import optimizer

FULL = {"hidden": 128, "layers": 4, "heads": 4, "inter": 384, "batch": 32, "lr": 3e-3,
        "base_steps": 1200, "no_cot_frac": 0.25,
        "c": 1, "stage_steps": 200, "final_stage_steps": 400, "coconut_lr": 2e-3,
        "feedback": "final_norm", "lora_r": 16, "latent_batch": 16, "ccot_stage_steps": 200, "ccot_final_steps": 400,
        "ccot_lr": 1e-3}
QUICK = {"hidden": 32, "layers": 2, "heads": 2, "inter": 64, "batch": 8, "lr": 3e-3,
         "base_steps": 6, "no_cot_frac": 0.25,
         "c": 1, "stage_steps": 2, "final_stage_steps": 2, "coconut_lr": 1e-3,
         "feedback": "final_norm", "lora_r": 4, "latent_batch": 4, "ccot_stage_steps": 2, "ccot_final_steps": 2,
         "ccot_lr": 2e-3}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(tok, cfg: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
                       num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                       num_key_value_heads=cfg["heads"], max_position_embeddings=256, rope_theta=10000.0,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)


def _enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _pad(rows: list[list[int]], starts: list[int], pad: int):
    """ids / labels ``[B, T]`` right-padded; labels -100 before ``starts[i]`` and on padding."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, starts)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, s: len(r)] = torch.tensor(r[s:])
    return ids, labels


def _lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def _step(opt, sched, params, loss) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def _log(label: str, step: int, steps: int, loss: float, t0: float, every: int = 50) -> None:
    if step % every == 0 or step == steps - 1:
        print(f"[{label}] step {step:5d}  loss {loss:.4f}  {time.process_time() - t0:6.1f} cpu-s",
              file=sys.stderr, flush=True)


def _hop_batches(seed: int, batch: int, banned: set):
    """Endless batches of ``batch`` problems sharing a hop count (so every row has the same
    token lengths), the hop count of each batch drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    streams = {h: hops.train_stream(seed * 1000 + h, exclude=banned, hops=h)
               for h in range(hops.MIN_HOPS, hops.MAX_HOPS + 1)}
    while True:
        h = rng.randint(hops.MIN_HOPS, hops.MAX_HOPS)
        yield h, [next(streams[h]) for _ in range(batch)]


# ------------------------------------------------------------------------------ base (CoT)

def train_base(out: Path, seed: int, cfg: dict, banned: set) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tok = hops.build_tokenizer()
    hops.check_tokenizer(tok)
    model = LlamaForCausalLM(model_config(tok, cfg))
    stream = hops.train_stream(seed, exclude=banned)
    rng = random.Random(seed ^ 0x5EED)
    params = list(model.parameters())
    opt, sched = optimizer(params, cfg["lr"], cfg["base_steps"])
    model.train()
    losses, t0 = [], time.process_time()
    for step in range(cfg["base_steps"]):
        rows, starts = [], []
        for _ in range(cfg["batch"]):
            p = next(stream)
            prompt = _enc(tok, p.prompt)
            comp = _enc(tok, p.completion(cot=rng.random() >= cfg["no_cot_frac"])) + [tok.eos_token_id]
            rows.append(prompt + comp)
            starts.append(len(prompt))
        ids, labels = _pad(rows, starts, tok.pad_token_id)
        loss = _lm_loss(model(input_ids=ids).logits, labels)  # right padding: no mask needed
        _step(opt, sched, params, loss)
        losses.append(loss.item())
        _log("base", step, cfg["base_steps"], losses[-1], t0)
    secs = time.process_time() - t0
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out / "base")
    tok.save_pretrained(str(out / "base"))
    return {"losses": losses, "cpu_seconds": secs, "params": sum(p.numel() for p in model.parameters())}


# --------------------------------------------------------------------------------- Coconut

def coconut_latent(k: int):
    """The runtime spec of this testbed's Coconut with ``k`` thoughts: no begin token (the
    prompt's ``<think>\n`` opens the latent phase) and no end token: the forward that
    consumed the last thought predicts the first token after the thoughts (the node that
    opens the next chain step, or ``</think>``), so every stage's loss supervises the last
    thought's hop directly (thought_loss). Measured (validation, last stage, seeds 0/1/2):
    0.935/0.975/0.930 without the end token; 0.980/0.060/0.065 with ``<|end-latent|>``
    forced (coconut.latent_loss; seeds 1 and 2 stuck at loss ~0.35 from stage 3)."""
    import cotrt

    return cotrt.Latent(steps=k, begin_token=None, insert_begin=False, end_token=None)


def thought_loss(model, prefix, suffix, k: int):
    """Cross-entropy of ``suffix`` ``[B, S]`` after ``prefix`` ``[B, P]`` and ``k`` continuous
    thoughts (the final-norm state fed back), gradients through the thoughts; no end token:
    the last thought's (or, at k = 0, the prompt's last) final-norm state predicts
    ``suffix[:, 0]``."""
    past, finals = thought_rollout(model, prefix, k)
    return next_token_loss(model, past, finals[:, -1:], suffix)


def coconut_suffix(p: hops.HopProblem, k: int, c: int) -> str:
    """What follows the thoughts when ``k`` of them replace the first ``k // c`` chain steps."""
    return "".join(p.lines()[k // c:]) + f"{hops.END}\nAnswer: {p.answer}\n"


def stage_thoughts(stage: int, n_hops: int, c: int) -> int:
    """Thoughts at ``stage`` for a problem of ``n_hops`` lines: c per replaced line (a problem
    with fewer lines than the stage loses all of them, as in Coconut)."""
    return c * min(stage, n_hops)


def train_coconut(out: Path, seed: int, cfg: dict, banned: set) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed + 2)
    tok = AutoTokenizer.from_pretrained(out / "base")
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    (out / "coconut").mkdir(parents=True, exist_ok=True)
    batches = _hop_batches(seed + 2, cfg["latent_batch"], banned)
    c, log = cfg["c"], {"c": cfg["c"], "losses": {}, "cpu_seconds": {}}
    model.train()
    params = list(model.parameters())
    for stage in range(hops.MAX_HOPS + 1):
        steps = cfg["final_stage_steps"] if stage == hops.MAX_HOPS else cfg["stage_steps"]
        opt, sched = optimizer(params, cfg["coconut_lr"], steps)  # reset at each stage, as Coconut does
        losses, t0 = [], time.process_time()
        for step in range(steps):
            h, probs = next(batches)
            k = stage_thoughts(stage, h, c)
            # No begin or end token (coconut_latent): the thoughts follow the prompt's
            # "<think>\n" directly and the chain's rest follows the last thought.
            prefix = torch.tensor([_enc(tok, p.prompt) for p in probs])
            suf = torch.tensor([_enc(tok, coconut_suffix(p, k, c)) + [tok.eos_token_id] for p in probs])
            loss = thought_loss(model, prefix, suf, k)  # one hop count per batch: equal lengths
            _step(opt, sched, params, loss)
            losses.append(loss.item())
            _log(f"coconut {stage}", step, steps, losses[-1], t0)
        model.eval()
        torch.save(coconut_state_dict(model), out / "coconut" / f"stage_{stage}.pt")
        model.train()
        log["losses"][stage], log["cpu_seconds"][stage] = losses, time.process_time() - t0
    return log


# ------------------------------------------------------------------------------------ CCoT

def _lora(model, cfg: dict):
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"], lora_dropout=0.0, target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    peft = get_peft_model(model, lcfg, adapter_name="contemplate")
    peft.add_adapter("answer", lcfg)
    return peft


def _adapter_params(peft, names) -> list:
    """The LoRA weights of adapters ``names``, made trainable; every other weight frozen."""
    out = []
    for n, p in peft.named_parameters():
        p.requires_grad_(any(f".{name}." in n for name in names))
        if p.requires_grad:
            out.append(p)
    return out


def _activate(peft, name: str) -> None:
    """Route every LoRA layer's forward through adapter ``name``, leaving ``requires_grad``
    alone. PEFT's ``set_adapter`` also freezes the other adapters, which would cut the
    answer loss's gradient off from the contemplation LoRA that built the cache it reads."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in peft.modules():
        if isinstance(m, BaseTunerLayer):
            m._active_adapter = [name]


def _end_loss(head, finals):
    """END head's binary cross-entropy on the final-norm states ``[B, k + 1, H]`` (after the
    prompt and after each step): fire after step k, not before (the runtime asks the head
    after the prompt and after each step, and stops at the first firing)."""
    logit = head(finals)[..., 0]
    want = torch.zeros_like(logit)
    want[:, -1] = 1.0
    return F.binary_cross_entropy_with_logits(logit, want)


def _feedback(value: str, layers: int):
    """``--set feedback=...``: "final_norm", or a decoder layer index (negative from the end)."""
    if value == "final_norm":
        return value
    try:
        layer = int(value)
    except ValueError:
        raise ValueError(f"feedback must be 'final_norm' or a decoder layer index, got {value!r}") from None
    if not -layers <= layer < layers:
        raise ValueError(f"feedback: layer {layer} is out of range for {layers} decoder layers")
    return layer % layers


def ccot_suffix(tok, p: hops.HopProblem, k: int, end_id: int) -> list[int]:
    """What the answer LoRA reads after ``k`` contemplation steps: the chain steps not
    replaced, then ``</think>`` and the answer. With every hop contemplated (``k`` =
    hops) the suffix opens with ``</think>``, which the runtime forces when the END head
    fires, so it is an input, not a target (ccot_loss)."""
    rest = _enc(tok, "".join(p.lines()[k:]))
    return rest + [end_id] + _enc(tok, f"\nAnswer: {p.answer}\n") + [tok.eos_token_id]


def ccot_loss(peft, head, prompt, suffix, k: int, n_hops: int, layer):
    """One curriculum batch: the prompt and ``k`` contemplation steps under the contemplation
    LoRA (the state ``layer`` names fed back, as the runtime does: coconut.thought_rollout), then
    ``suffix`` (ccot_suffix) under the answer LoRA reading their cache; the answer's loss
    backpropagates into every step. Before the last stage (``k`` < ``n_hops``) the last
    step's final-norm state also predicts the node that opens the first chain step left, through
    the LM head, as Coconut's last thought does (coconut_latent): the direct signal that
    teaches the step just added its hop. With every hop contemplated, the END head learns
    to fire after the last step (and not before); its loss reaches the contemplation LoRA
    too (as a probe on detached states it stayed at 0.45 and did not fire in time: seed 1,
    8.3 steps for 4.0 hops). Returns (token loss, END loss or None)."""
    _activate(peft, "contemplate")
    past, finals = thought_rollout(peft, prompt, k, layer)
    _activate(peft, "answer")
    if k < n_hops:
        return next_token_loss(peft, past, finals[:, -1:], suffix), None
    return next_token_loss(peft, past, None, suffix), _end_loss(head, finals)  # </think> is given


def train_ccot(out: Path, seed: int, cfg: dict, banned: set) -> dict:
    """CCoT by a Coconut-style curriculum. The base model stays frozen; what trains is the
    contemplation LoRA, the answer LoRA and the END head. At stage s (0 .. MAX_HOPS, the
    optimizer reset at each, ``ccot_stage_steps`` steps, the last ``ccot_final_steps``), the
    first min(s, hops) chain steps are replaced by as many contemplation steps (the state
    ``feedback`` names fed back as the next input, under the contemplation LoRA, the prompt
    too, as in the runtime); the answer LoRA writes the rest of the chain and the answer
    from their cache (ccot_loss). The END head trains on the batches whose every hop is
    contemplated.

    What failed first (seed 0, 200 validation problems; CoT 1.000, no-CoT 0.045):

    - CCoT's own recipe, state matching: the contemplation LoRA regressed onto the base
      model's layer-l states at each hop's node (or the position predicting it; layers 0-3,
      r 16 and 64, on its own rollout or teacher-forced: relative MSE 0.10-0.14), then end
      to end with the answer LoRA: 0.045-0.075, though the END head stopped after the right
      step. A close state match can still carry no node: the node-dependent part is a
      small share of the state's energy.
    - This curriculum with the raw residual after the last layer fed back (its RMS is ~160x
      the embeddings'), r 16, lr 3e-3: 0.045. The node the last step predicts stayed near
      chance from stage 2 on (cross-entropy 2.5-2.8 nats, ln 16 = 2.77; lr 1e-2 the same),
      and neither a learned projection of the fed state (starting at the scale that matches
      the embeddings) nor r 64 lowered the stage losses (runs stopped at stage 3-4). With
      the final-norm state fed back, that node's loss fell below 0.01 in 150 steps.
    - The final-norm state at lr 3e-3: 1.000 / 0.030 / 0.935 on seeds 0 / 1 / 2; seed 1's
      last stage diverged within 100 steps of the optimizer reset (token loss 0.002 ->
      0.33, stuck at 0.40). At lr 1e-3 (adopted): 1.000 / 0.980 on seeds 0 / 1.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cotrt.loaders import save_ccot_bundle

    torch.manual_seed(seed + 3)
    tok = AutoTokenizer.from_pretrained(out / "base")
    student = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    layer, H = _feedback(cfg["feedback"], student.config.num_hidden_layers), student.config.hidden_size
    peft = _lora(student, cfg)
    head = torch.nn.Linear(H, 1)
    end_id = tok.convert_tokens_to_ids(hops.END)
    batches = _hop_batches(seed + 3, cfg["latent_batch"], banned)
    log = {"feedback": layer, "losses": {}, "cpu_seconds": {}}
    params = _adapter_params(peft, ["contemplate", "answer"]) + list(head.parameters())
    peft.train()
    for stage in range(hops.MAX_HOPS + 1):
        steps = cfg["ccot_final_steps"] if stage == hops.MAX_HOPS else cfg["ccot_stage_steps"]
        opt, sched = optimizer(params, cfg["ccot_lr"], max(steps, 1))  # reset at each stage
        losses, t0 = [], time.process_time()
        for step in range(steps):
            h, probs = next(batches)
            k = min(stage, h)
            prompt = torch.tensor([_enc(tok, p.prompt) for p in probs])
            suffix = torch.tensor([ccot_suffix(tok, p, k, end_id) for p in probs])  # one hop count: equal lengths
            tok_loss, end = ccot_loss(peft, head, prompt, suffix, k, h, layer)
            _step(opt, sched, params, tok_loss if end is None else tok_loss + end)
            losses.append([tok_loss.item(), None if end is None else end.item()])
            _log(f"ccot {stage}", step, steps, tok_loss.item(), t0)
        log["losses"][stage], log["cpu_seconds"][stage] = losses, time.process_time() - t0
    peft.eval()

    tmp = out / "ccot_adapters"
    for name in ("contemplate", "answer"):
        peft.save_pretrained(str(tmp), selected_adapters=[name])
    save_ccot_bundle(out / "ccot", contemplate=tmp / "contemplate", answer=tmp / "answer", end_head=head,
                     feedback_layer=layer, max_steps=2 * hops.MAX_HOPS, base="../base",
                     tokens={"begin": None, "end": hops.END, "latent": None}, name="hops-ccot", overwrite=True)
    import shutil

    shutil.rmtree(tmp)
    return log


# ------------------------------------------------------------------------------------ main

def run(out: Path, seed: int, cfg: dict, only=None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    banned = hops.excluded(seed)
    log_path = out / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() and only else {}
    log.update({"seed": seed, "config": cfg, "torch": torch.__version__, "threads": torch.get_num_threads()})
    todo = only or ("base", "coconut", "ccot")
    if "base" in todo:
        log["base"] = train_base(out, seed, cfg, banned)
    if "coconut" in todo:
        log["coconut"] = train_coconut(out, seed, cfg, banned)
    if "ccot" in todo:
        log["ccot"] = train_ccot(out, seed, cfg, banned)
    log_path.write_text(json.dumps(log))
    return log


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m cotrt.testbed.latent_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a tiny model and a few steps (pipeline tests)")
    ap.add_argument("--only", nargs="*", choices=("base", "coconut", "ccot"), default=None,
                    help="train only these (the others must already be in --out)")
    ap.add_argument("--set", nargs="*", default=(), metavar="KEY=VALUE", help="override a config entry")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for kv in args.set:
        key, _, val = kv.partition("=")
        if key not in cfg:
            raise ValueError(f"--set: unknown key {key!r} (known: {', '.join(cfg)})")
        cfg[key] = type(cfg[key])(val)
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:  # process-wide settings: give them back (main() also runs inside tests)
        return run(args.out, args.seed, cfg, args.only)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


if __name__ == "__main__":
    main()
