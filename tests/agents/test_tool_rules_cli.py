"""`llmos chat --agent NAME` as a user runs it (a real process, the embedded model, input piped):
every line gets the agent's reply, never "(no message)"."""

import os
import subprocess
import sys
from pathlib import Path

from llmos.memory import MemoryStore

LLMOS = str(Path(sys.executable).with_name("llmos"))


def test_chat_agent_replies_to_every_message(tmp_path):
    r = subprocess.run([LLMOS, "chat", "--agent", "ana", "--context-window", "1024"],
                       input="Hi, I am Ana.\nWhat is my name?\n/exit\n", capture_output=True, text=True,
                       timeout=300, env={**os.environ, "LLMOS_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "(no message)" not in r.stdout and r.stdout.count("ana>") == 2
    store = MemoryStore(tmp_path / "memory.db")
    sent = [row[0] for row in store.query(
        "SELECT json_extract(content, '$.arguments.message') FROM messages WHERE agent = 'ana' "
        "AND role = 'assistant' AND name = 'send_message' ORDER BY id")]
    store.close()
    assert len(sent) == 2 and all(s.strip() for s in sent)
    shown = " ".join(r.stdout.split())  # the terminal may wrap a long reply
    assert all(" ".join(s.split()) in shown for s in sent)
