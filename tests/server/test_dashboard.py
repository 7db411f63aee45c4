"""The dashboard: snapshots of the running OS per user over HTTP, and the page in a real headless Chromium."""

import json
import os
import re
import struct
import time
from pathlib import Path

import pytest

from llmos.kernel.users import UserStore
from llmos.server.system import boot
from tests.server.test_service import Served

CHROMIUM = Path("/usr/bin/chromium")
COUNT = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]
NOTES = [  # two messages that overflow a 640-token window between them
    "My notes for today: a process is a program in execution, with its own address space, registers and "
    "open files. The scheduler decides which process runs next; round robin gives each a quantum in turn. "
    "Paging splits memory into fixed-size pages so that a process needs no contiguous memory. Please keep "
    "these notes for me.",
    "More notes: virtual memory lets a process use more memory than the machine has, by keeping some pages "
    "on disk and bringing them back on a page fault. A context switch saves one process's registers and "
    "loads another's. Thrashing is when the system spends its time paging instead of working. Thanks!",
]


@pytest.fixture
def served(llm, tmp_path):
    s = Served(boot(tmp_path / "home", llm=llm, policy="rr", quantum=8, max_running=2))
    yield s
    s.close()


async def _talker(sys, max_tokens: int = 96, then_sleep: float = 0.0):
    """An agent that generates `max_tokens` tokens (one LLM call), then optionally stays alive."""
    await sys.tool_call("calculator", {"expression": "6*7"})
    await sys.llm_chat(COUNT, max_tokens=max_tokens)
    if then_sleep:
        await sys.sleep(then_sleep)


def _spawn(served: Served, name: str, owner: str = "local", **args) -> int:
    async def go():
        return await served.system.kernel.spawn(_talker, name, owner=owner, args=args)

    return served.run(go())


def _wait(check, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_snapshot_shows_each_user_only_their_own(served):
    users = UserStore.of_home(served.system.home)
    alice, alice_key = users.add("alice")
    _, bob_key = users.add("bob")
    pid = _spawn(served, "alice-agent", owner=alice.id, max_tokens=200, then_sleep=3600)
    with served.client(alice_key) as a, served.client(bob_key) as b, \
            served.client(served.system.local_key) as admin, served.client() as nobody:
        assert nobody.get("/v1/dashboard/snapshot").status_code == 401
        assert nobody.get("/v1/dashboard/events").status_code == 401
        page = nobody.get("/dashboard")  # the page itself holds no data
        assert page.status_code == 200 and 'id="blockmap"' in page.text
        assert nobody.get("/dashboard/dashboard.js").headers["content-type"].startswith("text/javascript")
        assert nobody.get("/dashboard/secret.py").status_code == 401  # only the page's own files are open

        def alice_holds_blocks():
            snap = a.get("/v1/dashboard/snapshot").json()
            e = snap["engine"]
            mine = [h for h in e["holders"] if h["pid"] == pid]
            return snap if mine and any(e["owner"][i] == e["holders"].index(mine[0])
                                        for i in range(e["num_blocks"])) else None

        snap = _wait(alice_holds_blocks, what="alice's request to hold KV blocks")
        e = snap["engine"]
        num_blocks = served.system.llm.engine.blocks.num_blocks
        assert len(e["cells"]) == len(e["owner"]) == e["num_blocks"] == num_blocks
        assert [p["pid"] for p in snap["processes"]] == [pid]
        held = [i for i, o in enumerate(e["owner"]) if o >= 0]
        assert all(e["cells"][i] in "us" for i in held)
        assert e["holders"][e["owner"][held[0]]]["label"] == f"alice-agent (pid {pid})"
        assert [(r["tool"], r["decision"], r["agent"]) for r in snap["audit"]["rows"]] == [
            ("calculator", "allow", "alice-agent"), ("calculator", "done", "alice-agent")]
        assert snap["audit"]["rows"][0]["labels"]["expression"]["trusted"] is True
        assert snap["audit"]["chain"]["status"] == "admin only"

        theirs = b.get("/v1/dashboard/snapshot").json()
        assert theirs["processes"] == [] and theirs["audit"]["rows"] == []
        assert theirs["engine"]["holders"], "bob sees that blocks are held..."
        assert {(h["label"], h["pid"], h["request_id"]) for h in theirs["engine"]["holders"]} == {
            ("other", None, None)}  # ...never whose

        every = admin.get("/v1/dashboard/snapshot").json()
        assert [p["pid"] for p in every["processes"]] == [pid]
        assert every["audit"]["chain"]["ok"] is True and every["audit"]["chain"]["status"] == "ok"

        with a.stream("GET", "/v1/dashboard/events", params={"interval": 0.1}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            times = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    times.append(json.loads(line[6:])["t"])
                if len(times) == 3:
                    break
        assert times == sorted(times) and times[2] - times[0] >= 0.15


def test_an_api_request_is_named_by_the_user_who_sent_it(served):
    users = UserStore.of_home(served.system.home)
    _, alice_key = users.add("alice")
    _, bob_key = users.add("bob")
    owners = served.server.config.app.state.dashboard_owners
    body = {"model": served.system.model_name, "messages": COUNT, "max_tokens": 200, "stream": True}
    with served.client(alice_key) as a, served.client(bob_key) as b, \
            served.client(served.system.local_key) as admin, b.stream("POST", "/v1/chat/completions",
                                                                     json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the request is in the engine

        def labels(client) -> set[tuple]:
            return {(h["label"], h["request_id"] is not None) for h in
                    client.get("/v1/dashboard/snapshot").json()["engine"]["holders"]}

        assert labels(b) == {("API: bob", True)}
        assert labels(admin) == {("API: bob", True)}
        assert labels(a) == {("other", False)}  # alice sees that blocks are held, never whose
        assert len(owners) == 1
    _wait(lambda: len(owners) == 0, what="the finished request to leave the owners' table")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _greedy_quota(served: Served, max_tokens: int) -> int:
    """An llm_tokens quota that a talker generating `max_tokens` uses 95% of (the operator's rule
    fires at 90%, the kernel's at 100%)."""
    return int((served.system.backend.count_tokens(COUNT) + max_tokens) / 0.95)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)")
def test_dashboard_in_a_real_browser(served, tmp_path, monkeypatch):
    playwright = pytest.importorskip("playwright.sync_api")
    from llmos.agents.operator import agent as operator_agent
    from llmos.kernel import Quotas

    monkeypatch.setattr(operator_agent, "default_approvals_path", lambda: tmp_path / "approvals.db")
    users = UserStore.of_home(served.system.home)
    _, key = users.add("viewer", admin=True)
    num_blocks = served.system.llm.engine.blocks.num_blocks
    shot = tmp_path / "dashboard.png"
    http = served.client(key)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{served.url}/dashboard?key={key}&interval=0.2")
            page.wait_for_function("Number(document.body.dataset.snapshots || 0) >= 2", timeout=30000)
            assert page.url == f"{served.url}/dashboard?interval=0.2"  # the key left the address bar
            assert page.locator("#status").inner_text() == "live"
            assert page.locator("#blockmap .cell").count() == num_blocks
            assert page.locator("#procs tbody tr").count() == 0
            assert page.locator("#blockmap .cell.used, #blockmap .cell.shared").count() == 0
            assert page.locator("#contexts .context").count() == 0
            assert "not running" in page.locator("#operator-summary").inner_text()
            assert page.locator("#queue-now").inner_text() == "–"

            # an API agent's messages on a small window: its context appears, changes while a message
            # runs, and pages out (the oldest messages evicted to recall storage and summarized)
            human = {"label": "human", "value": "The user is learning how operating systems work."}
            agent = http.post("/v1/agents", json={"name": "notes", "context_window_limit": 640,
                                                  "memory_blocks": [human]}).json()
            for text in NOTES:
                run = http.post(f"/v1/agents/{agent['id']}/messages/async", json={
                    "messages": [{"role": "user", "content": text}]}).json()
            context = f'#contexts .context[data-agent="{agent["id"]}"]'
            page.wait_for_selector(f"{context} .pill.running", timeout=60000)
            before = page.get_attribute(context, "data-queue"), page.get_attribute(context, "data-tokens")
            assert "notes" in page.locator(context).inner_text()
            assert "learning how operating systems work" in page.locator(f"{context} .core").inner_text()
            assert f"notes ({agent['id'][:14]}…)" in page.locator("#procs").inner_text()  # its process
            page.wait_for_function("[...document.querySelectorAll('#blockmap .cell.used')]"  # its KV blocks
                                   ".some(c => / notes \\(pid \\d+\\)$/.test(c.title))", timeout=60000)
            page.wait_for_function(
                f"(e => e && (e.dataset.queue !== {before[0]!r} || e.dataset.tokens !== {before[1]!r}))"
                f"(document.querySelector('{context}'))", timeout=120000)
            assert int(page.get_attribute(context, "data-tokens")) > 0
            page.wait_for_function(f"Number(document.querySelector('{context}').dataset.evictions) > 0",
                                   timeout=180000)
            summary = page.locator(f"{context} .summary").inner_text()
            assert summary.startswith("summary ") and "none yet" not in summary  # the model's own summary

            # an agent near its token quota; three talkers, two at a time (round robin) on the same
            # prompt, so its blocks are shared
            greedy = served.run(served.system.kernel.spawn(
                _talker, "greedy", args={"max_tokens": 40, "then_sleep": 3600},
                quotas=Quotas(llm_tokens=_greedy_quota(served, 40))))
            pids = [_spawn(served, f"talker-{i}", max_tokens=160, then_sleep=3600) for i in range(3)]
            talkers = "[...document.querySelectorAll('#procs tbody tr')].filter(r => " \
                      "r.textContent.includes('talker-')).length"
            page.wait_for_function(
                f"{talkers} === 3 && "
                "document.querySelectorAll('#blockmap .cell.shared').length > 0 && "
                "document.querySelectorAll('#blockmap .cell.used, #blockmap .cell.shared').length >= 8",
                timeout=60000)
            rows = page.locator("#procs tbody tr")
            shown = {int(rows.nth(i).get_attribute("data-pid")) for i in range(rows.count())}
            assert set(pids) | {greedy} <= shown
            assert page.locator("#queue-running span").count() == 2
            titles = page.eval_on_selector_all("#blockmap .cell.used", "cs => cs.map(c => c.title)")
            assert any("talker-" in t for t in titles)
            page.wait_for_function("document.querySelector('#audit').textContent.includes('calculator')",
                                   timeout=30000)
            # the operator (as `llmos serve --operator` runs it) finds the greedy agent near its quota
            # and suspends it
            served.run(served.system.start_operator())
            page.wait_for_function("document.querySelectorAll('#operator tr.op-finding').length > 0 && "
                                   "document.querySelectorAll('#operator tr.op-acted').length > 0",
                                   timeout=60000)
            assert page.locator("#operator tr.op-acted td").all_inner_texts()[:3] == [
                "acted", f"agent:{greedy}", f"suspend_agent pid={greedy}"]
            _wait(lambda: served.system.kernel.process(greedy).state.value == "suspended",
                  what="the operator's suspension")
            with served.client(users.add("someone")[1]) as someone:  # not an admin: none of it is theirs
                theirs = someone.get("/v1/dashboard/snapshot").json()
            assert (theirs["processes"], theirs["contexts"], theirs["operator"]) == ([], [], None)
            # every agent's calculator call is listed; the operator's run of polls is folded into one row
            calls = page.eval_on_selector_all("#audit tbody tr", "rs => rs.map(r => r.cells[2].textContent + "
                                              "' ' + r.cells[3].textContent + ' ' + r.cells[4].textContent)")
            for name in ("greedy", "talker-0", "talker-1", "talker-2"):
                assert any(c.startswith(f"{name} calculator") for c in calls), calls
            assert any(re.fullmatch(r"operator kernel\.stats ×\d+ allow, done", c) for c in calls), calls
            chain_ok = "document.querySelector('#chain').textContent.startsWith('audit chain: ok')"
            page.wait_for_function(chain_ok, timeout=30000)
            page.wait_for_function("Number(document.querySelector('#tok-now').textContent) > 0 && "
                                   "document.querySelector('#queue-now').textContent.endsWith(' ms') && "
                                   "document.querySelector('#ttft-now').textContent.endsWith(' ms')",
                                   timeout=60000)
            page.screenshot(path=str(shot), full_page=True)

            # the generations end: their blocks are freed (cached prefix or free) and the list changes
            http.post(f"/v1/agents/{agent['id']}/messages/cancel", json={"run_ids": [run["id"]]})
            for pid in [*pids, greedy]:
                served.run(served.system.kernel.kill(pid, "test over"))
            page.wait_for_function(
                "document.querySelectorAll('#procs tbody tr').length === 1 && "  # the operator
                "document.querySelectorAll('#blockmap .cell.used, #blockmap .cell.shared').length === 0",
                timeout=60000)
            assert page.locator("#blockmap .cell.cached").count() > 0  # the prompt's blocks stay cached
            assert page.locator(f"{context} .pill").inner_text() == "idle"  # its context stays listed
            assert http.delete(f"/v1/agents/{agent['id']}").status_code == 200  # until the agent is gone
            page.wait_for_selector("#contexts p.empty", timeout=30000)
            assert page.locator("#contexts .context").count() == 0
        finally:
            browser.close()
            http.close()
    data = shot.read_bytes()
    width, height = _png_size(data)
    assert width == 1280 and height >= 600 and len(data) > 20_000
    if os.environ.get("LLMOS_DASHBOARD_PNG"):  # how docs/img/dashboard.png is regenerated
        Path(os.environ["LLMOS_DASHBOARD_PNG"]).write_bytes(data)
