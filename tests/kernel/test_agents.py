"""The built-in agents: ReAct answers malformed model output with an error, never a crash;
both agents run end to end on the embedded model; the kernel drives a remote OpenAI server."""

import asyncio

from llmos.agents import chat, react
from llmos.engine import AsyncLLM
from llmos.kernel import ChatResult, EngineBackend, Kernel, OpenAIBackend
from llmos.tools import builtin_tools
from tests.server.conftest import start_server
from tests.stub_backend import StubBackend


class ReplayBackend(StubBackend):
    """Replays fixed model replies and keeps the prompts it was sent."""

    def __init__(self, replies: list[str]) -> None:
        self.replies, self.prompts = list(replies), []

    async def complete(self, call, prompt, params, on_tokens) -> ChatResult:
        self.prompts.append(list(prompt))
        return ChatResult(self.replies.pop(0), "stop", 0, 1)


def test_react_corrects_malformed_replies_and_uses_tools(tmp_path):
    backend = ReplayBackend([
        "I think the answer is 42",
        '{"tool": "teleport", "arguments": {}}',
        '{"tool": "calculator", "arguments": "6*7"}',
        '{"tool": "calculator", "arguments": {"expression": "6 * 7"}} trailing words',
        '{"tool": "write_file", "arguments": {"path": "answer.txt", "content": "42"}}',
        '{"answer": "42"}',
    ])

    async def main():
        kernel = Kernel(backend, home=tmp_path, tools=builtin_tools())
        pid = await kernel.spawn(react.main, "react", args={"task": "What is 6 * 7?", "constrained": False})
        answer = await kernel.wait(pid)
        await kernel.shutdown()
        return kernel, pid, answer

    kernel, pid, answer = asyncio.run(main())
    assert answer == "42" and kernel.process(pid).exit_reason == "exited"
    feedback = [p[-1]["content"] for p in backend.prompts[1:]]
    assert feedback == [
        "Error: your reply has no JSON object. Reply with one JSON action.",
        "Error: there is no tool 'teleport'; the tools are calculator, list_files, read_file, write_file. "
        "Reply with one JSON action.",
        'Error: "arguments" must be a JSON object. Reply with one JSON action.',
        "Result of calculator: 42\nDo the next step of the task, or answer.",
        "Result of write_file: wrote 2 bytes to answer.txt\nDo the next step of the task, or answer.",
    ]
    assert (tmp_path / "scratch" / str(pid) / "answer.txt").read_text() == "42"


def test_react_schema_offers_the_answer_only_after_a_tool_ran():
    specs = builtin_tools().specs(react.DEFAULT_TOOLS)
    first = react.action_schema(specs, may_answer=False)
    later = react.action_schema(specs)
    assert len(first["anyOf"]) == 4 and len(later["anyOf"]) == 5
    assert later["anyOf"][-1]["required"] == ["answer"]


def test_chat_and_react_on_the_embedded_model(llm, tmp_path):
    async def main():
        kernel = Kernel(EngineBackend(llm), home=tmp_path, tools=builtin_tools())
        a = await kernel.spawn(chat.main, "chat", args={"prompts": ["Name a color."], "max_tokens": 12})
        b = await kernel.spawn(react.main, "react", args={"max_steps": 3, "max_tokens": 48})
        await kernel.wait(a)
        await kernel.wait(b)
        log = kernel.table.syscall_log(b)
        await kernel.shutdown(close_backend=False)
        return kernel.process(a), kernel.process(b), log

    chat_proc, react_proc, log = asyncio.run(main())
    assert chat_proc.exit_reason == "exited" and chat_proc.output[0].startswith("Q: Name a color.\nA: ")
    assert react_proc.exit_reason == "exited"
    # Constrained decoding: every reply was a valid action, so the first is a tool call.
    assert [e["name"] for e in log[:2]] == ["llm_chat", "tool_call"]


def test_the_kernel_drives_an_openai_compatible_server(tmp_path):
    remote = AsyncLLM("smollm2-135m-instruct", kv_budget="32MiB")
    server, thread, url = start_server(remote)

    async def agent(sys) -> list[str]:
        chat_reply = await sys.llm_chat([{"role": "user", "content": "Say yes."}], max_tokens=6)
        text_reply = await sys.llm_generate("The capital of France is", max_tokens=4)
        return [chat_reply.text, text_reply.text, chat_reply.completion_tokens]

    async def reference() -> list[str]:
        from llmos.engine import SamplingParams

        ids = remote.tokenizer.encode_chat([{"role": "user", "content": "Say yes."}])
        outs = []
        for prompt, n in ((ids, 6), ("The capital of France is", 4)):
            async for o in remote.generate(prompt, SamplingParams(max_tokens=n, temperature=0)):
                final = o
            outs.append(final.outputs[0].text)
        return outs

    async def main():
        kernel = Kernel(OpenAIBackend(f"{url}/v1", model="smollm2-135m-instruct"), home=tmp_path)
        pid = await kernel.spawn(agent)
        result = await kernel.wait(pid)
        assert kernel.process(pid).exit_reason == "exited"
        assert kernel.process(pid).tokens_used > 10
        await kernel.shutdown()
        return result

    try:
        result = asyncio.run(main())
        expected = asyncio.run(reference())
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        remote.shutdown()
    assert result[:2] == expected and 1 <= result[2] <= 6
