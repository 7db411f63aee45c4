"""`llmos chat --agent NAME` talks to the running server's agents API when there is one."""

import os
import subprocess
import sys
from pathlib import Path

from llmos.server import create_app
from tests.server.scripted_server import scripted_system, serve

LLMOS = str(Path(sys.executable).with_name("llmos"))


def test_chat_agent_uses_the_running_server(tmp_path):
    system = scripted_system(tmp_path)
    server, thread, url = serve(create_app(system=system))
    system.publish(url)
    try:
        env = {**os.environ, "LLMOS_HOME": str(tmp_path)}
        env.pop("LLMOS_URL", None)
        env.pop("LLMOS_API_KEY", None)
        r = subprocess.run([LLMOS, "chat", "--agent", "sam"], input="hello\n\nhow are you\n/exit\n",
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"Agent sam on {url}" in r.stdout
        assert "sam> ok 1" in r.stdout and "sam> ok 2" in r.stdout  # each line is one message on the server
        (agent,) = _agents(url, system.local_key)
        runs = [p for p in system.kernel.ps() if p.name == agent["id"]]  # kernel processes of the server
        assert agent["name"] == "sam" and len(runs) == 2 and all(p.exit_reason == "exited" for p in runs)
        # a second chat finds the same agent instead of creating another
        r = subprocess.run([LLMOS, "chat", "--agent", "sam"], input="again\n", capture_output=True,
                           text=True, env=env, timeout=120)
        assert r.returncode == 0 and "sam> ok 3" in r.stdout
        assert [a["name"] for a in _agents(url, system.local_key)] == ["sam"]
    finally:
        system.unpublish()
        server.should_exit = True
        thread.join(timeout=10)


def _agents(url: str, key: str) -> list[dict]:
    import httpx

    return httpx.get(f"{url}/v1/agents/", headers={"Authorization": f"Bearer {key}"}).json()
