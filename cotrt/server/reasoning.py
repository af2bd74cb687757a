"""The reasoning / content split of a streamed response: ``reasoning_content`` (what
reasoning clients read) apart from ``content``, by the think format's markers."""
from __future__ import annotations


def _partial(buf: str, marker: str) -> int:
    """Length of the longest end of ``buf`` that begins ``marker`` (a marker split over events)."""
    for k in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:k]):
            return k
    return 0


class ReasoningSplitter:
    """Splits streamed text into ("reasoning_content" | "content", text) parts by the think
    format's markers, so that the parts add up to ``Output.reasoning`` / ``Output.answer``
    (markers dropped, each part stripped). A marker split across events is held back until
    it is complete; so is trailing whitespace, which ``strip()`` would remove at the end.
    Text before an opening marker streams as content (``Output`` drops it: it cannot be
    held until we know whether a marker follows)."""

    def __init__(self, fmt, thinking: bool):
        self.start = None if fmt.plain else fmt.start
        self.end = fmt.end
        self.drop_end = not fmt.plain  # a second end marker carries nothing (engine._drop)
        self.phase = "think" if thinking else "pre"
        self.buf, self.pending, self.fresh = "", "", True
        self.out: list[list[str]] = []

    def _markers(self) -> list[str]:
        if self.phase == "think":
            return [self.end]
        ms = [self.start] if self.phase == "pre" and self.start else []
        return ms + ([self.end] if self.drop_end else [])

    def feed(self, text: str) -> list[list[str]]:
        self.out = []
        self.buf += text
        while True:
            marks = self._markers()
            hits = sorted((self.buf.find(m), m) for m in marks if m in self.buf)
            if not hits:
                break
            i, m = hits[0]
            self._emit(self.buf[:i])
            self.buf = self.buf[i + len(m):]
            if self.phase == "pre" and m == self.start:
                self._section("think")
            elif self.phase == "think":
                self._section("answer")
        keep = max((_partial(self.buf, m) for m in self._markers()), default=0)
        self._emit(self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        return self.out

    def flush(self) -> list[list[str]]:
        self.out = []
        self._emit(self.buf)
        self.buf = self.pending = ""
        return self.out

    def _section(self, phase: str) -> None:
        self.phase, self.pending, self.fresh = phase, "", True

    def _emit(self, s: str) -> None:
        if self.fresh:
            s = s.lstrip()
            if not s:
                return
            self.fresh = False
        body = s.rstrip()
        if not body:
            self.pending += s
            return
        kind = "reasoning_content" if self.phase == "think" else "content"
        text = self.pending + body
        self.pending = s[len(body):]
        if self.out and self.out[-1][0] == kind:
            self.out[-1][1] += text
        else:
            self.out.append([kind, text])
