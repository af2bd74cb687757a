"""A small, honest testbed: tiny reasoning models trained here, on a synthetic arithmetic
task, by the methods cotrt serves, and an evaluation that drives them through the runtime.

task.py (problems, chains, tokenizer), train.py (base model + CoT-Valve LoRA),
evaluate.py (accuracy vs think tokens per control). See issue 8.
"""
