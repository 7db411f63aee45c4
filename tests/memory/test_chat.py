"""`chat_with_agent` (what `llmos chat --agent NAME` runs) as a user runs it: real processes, the
embedded model, and an agent that resumes its memory in the next process."""

import os
import subprocess
import sys

from llmos.memory import MemoryStore

CHAT = "from llmos.commands.memory import chat_with_agent; chat_with_agent('ana', context_window=1024)"


def chat(home, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHAT], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "LLMOS_HOME": str(home)})


def test_agent_resumes_in_the_next_process(tmp_path):
    first = chat(tmp_path, "Hi, I am Ana and I love green tea.\n/exit\nnever read\n")
    assert first.returncode == 0, first.stderr
    assert "Agent ana (smollm2-135m-instruct)" in first.stdout and "ana>" in first.stdout
    second = chat(tmp_path, "What do I like to drink?\n")  # ends at EOF
    assert second.returncode == 0, second.stderr
    store = MemoryStore(tmp_path / "memory.db")
    users = [r[0] for r in store.query("SELECT content FROM messages WHERE agent = 'ana' AND role = 'user' "
                                       "ORDER BY id")]
    assert users == ["Hi, I am Ana and I love green tea.", "What do I like to drink?"]
    # the second process's agent resumed the first's queue: both turns are in main context
    queued = store.query("SELECT count(*) FROM messages WHERE agent = 'ana' AND role = 'user' "
                         "AND in_context = 1")[0][0]
    assert queued == 2
    assert store.agent("ana")["llm_calls"] >= 2 and store.agent("ana")["overflows"] == 0
    store.close()
