"""Think formats: how a model delimits its reasoning, detected from the tokenizer."""
from __future__ import annotations

from dataclasses import dataclass

# Qwen3's recipe for ending thinking early (its model card's "thinking budget" example).
QWEN3_TRANSITION = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on "
    "the thinking directly now.\n"
)
PLAIN_ANSWER_CUE = "\nFinal answer:"


@dataclass(frozen=True)
class ThinkFormat:
    """The markers of the think phase.

    start:      opens thinking ("<think>"); None for a plain CoT model, whose whole output is
                reasoning until ``end``.
    end:        closes thinking ("</think>"); for a plain model, the answer cue that budgets
                force ("\\nFinal answer:").
    transition: text forced before ``end`` when a budget cuts thinking short (Qwen3's
                "Considering the limited time..." phrase); None for none.
    """

    start: str | None = "<think>"
    end: str = "</think>"
    transition: str | None = None

    def __post_init__(self):
        if not isinstance(self.end, str) or not self.end:
            raise ValueError(f"ThinkFormat.end must be a non-empty string, got {self.end!r}")
        if self.start is not None and (not isinstance(self.start, str) or not self.start):
            raise ValueError(f"ThinkFormat.start must be a non-empty string or None, got {self.start!r}")
        if self.start is not None and self.start == self.end:
            raise ValueError("ThinkFormat.start and end must differ")
        if self.transition is not None and not isinstance(self.transition, str):
            raise ValueError(f"ThinkFormat.transition must be a string or None, got {self.transition!r}")

    @property
    def plain(self) -> bool:
        return self.start is None

    @classmethod
    def none(cls) -> "ThinkFormat":
        """A plain CoT model: no markers; budgets force the answer cue."""
        return cls(start=None, end=PLAIN_ANSWER_CUE)

    @classmethod
    def detect(cls, tokenizer) -> "ThinkFormat":
        """From the tokenizer's vocabulary and chat template.

        - ``<think>``/``</think>`` in the vocabulary (R1-distill, QwQ, Qwen3): those markers,
          with Qwen3's transition phrase when the template knows ``enable_thinking``.
        - s1's ``<|im_start|>think`` / ``<|im_start|>answer`` in the chat template.
        - otherwise a plain CoT model.
        """
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        template = getattr(tokenizer, "chat_template", None) or ""
        if not isinstance(template, str):
            template = str(template)
        if "<think>" in vocab and "</think>" in vocab:
            transition = QWEN3_TRANSITION if "enable_thinking" in template else None
            return cls("<think>", "</think>", transition)
        if "<|im_start|>think" in template:
            return cls("<|im_start|>think", "<|im_start|>answer")
        return cls.none()
