"""What a newcomer meets first: `llmos chat` in a real terminal, `llmos generate` on an instruct model."""

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

LLMOS = str(Path(sys.executable).with_name("llmos"))
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x01\x02]")


class Terminal:
    """A command on a pseudo-terminal: type into it, read what the screen shows."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.pid, self.fd = pty.fork()  # the child's controlling terminal: Ctrl-C is a SIGINT
        if self.pid == 0:
            os.execve(argv[0], argv, env)
        self.seen = ""
        self.status: int | None = None

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if it is still running after `timeout` seconds."""
        deadline = time.time() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            elif time.time() >= deadline:
                break
            else:
                time.sleep(0.1)
        return self.status

    def expect(self, pattern: str, timeout: float = 240) -> str:
        """Read until `pattern` (a regex) appears in the output since the last match; returns that text."""
        deadline = time.time() + timeout
        while True:
            m = re.search(pattern, _ANSI.sub("", self.seen))
            if m:
                text = _ANSI.sub("", self.seen)[:m.end()]
                self.seen = _ANSI.sub("", self.seen)[m.end():]
                return text
            left = deadline - time.time()
            assert left > 0, f"no {pattern!r} in {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the command ended
                    assert re.search(pattern, _ANSI.sub("", self.seen)), self.seen[-2000:]

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())


def test_chat_in_a_terminal_edits_lines_keeps_history_and_survives_ctrl_c(tmp_path):
    env = {**os.environ, "LLMOS_HOME": str(tmp_path), "TERM": "xterm", "COLUMNS": "120"}
    t = Terminal([LLMOS, "chat", "--temperature", "0", "--max-tokens", "120"], env)
    try:
        t.expect(r"you> ")
        t.type("/help\r")
        shown = t.expect(r"you> ")
        assert "/clear" in shown and "/exit" in shown and "llmos>" not in shown  # the model was not asked
        t.type("What is the capital of France?\r")
        assert "The capital of France is Paris." in t.expect(r"you> ")
        # Up recalls the last line (readline), not "^[[A"; the model answers the recalled question
        t.type("\x1b[A\r")
        recalled = t.expect(r"you> ")
        assert "^[[A" not in recalled and "What is the capital of France?" in recalled
        assert "Paris" in recalled
        t.type("/clear\r")
        assert "conversation cleared" in t.expect(r"you> ")
        # Ctrl-C in the middle of a long reply stops the reply, not the session
        t.type("Write a long story about a dragon who learns to cook.\r")
        t.expect(r"llmos> \S+ \S+")
        t.type("\x03")
        assert "(reply stopped)" in t.expect(r"you> ")
        assert t.wait(0) is None
        t.type("/nope\r")
        assert "unknown command /nope; /help lists the commands" in t.expect(r"you> ")
        t.type("\x04")  # Ctrl-D ends the session
        assert t.wait(60) == 0
    finally:
        if t.wait(0) is None:
            os.kill(t.pid, 9)
            t.wait(10)
        os.close(t.fd)
    history = (tmp_path / "chat_history").read_text()
    assert "What is the capital of France?" in history and "/clear" in history


def test_generate_uses_the_chat_template_says_it_is_loading_and_reports_speed():
    r = subprocess.run([LLMOS, "generate", "What is the capital of France?", "--max-tokens", "20"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0
    assert r.stdout.strip() == "The capital of France is Paris."
    lines = r.stderr.splitlines()
    assert lines[0] == "loading smollm2-135m-instruct ..."
    assert re.fullmatch(r"8 tokens in \d+\.\d\d s, \d+\.\d tok/s \(prompt \d+ tokens, chat template\)",
                        lines[-1]), lines
    r = subprocess.run([LLMOS, "generate", "--raw", "The capital of France is", "--max-tokens", "3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith(" Paris")
    assert re.fullmatch(r"3 tokens in \d+\.\d\d s, \d+\.\d tok/s \(prompt 5 tokens, raw text\)",
                        r.stderr.splitlines()[-1])
