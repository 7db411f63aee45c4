"""The tool-rule solver, exactly: Letta's JSON shapes in and out, which tools each rule allows next,
when a turn may end, and the reply guarantee's forced steps."""

import pytest

from llmos.agents.tool_rules import Call, Plan, ToolRuleError, ToolRules

TOOLS = ["send_message", "search", "lookup", "save", "think", "finish"]


def rules(*items: dict) -> ToolRules:
    return ToolRules.from_letta(list(items))


def calls(*names: str) -> list[Call]:
    return [Call(n) for n in names]


def allowed(r: ToolRules, history: list[Call], steps_left: int = 10, must_reply: bool = False) -> list[str]:
    return list(r.plan(TOOLS, history, steps_left, must_reply).allowed)


def test_no_rules_allow_everything_and_send_message_ends_the_turn():
    r = ToolRules()
    assert r.plan(TOOLS, [], 10) == Plan(tuple(TOOLS), {}, None)
    assert r.terminal(TOOLS) == ["send_message"]
    assert r.after("send_message", calls("send_message"), heartbeat=False) == "end"
    assert r.after("send_message", calls("send_message"), heartbeat=True) == "end"  # terminal wins
    assert r.after("search", calls("search"), heartbeat=True) == "continue"
    assert r.after("search", calls("search"), heartbeat=False) == "reply"  # yielded without a reply


def test_init_rule_fixes_the_first_call_only():
    r = rules({"type": "run_first", "tool_name": "search"}, {"type": "run_first", "tool_name": "lookup"})
    assert allowed(r, []) == ["search", "lookup"]
    assert allowed(r, calls("search")) == TOOLS


def test_init_rule_args_are_prefilled_for_the_first_call():
    r = rules({"type": "run_first", "tool_name": "search", "args": {"query": "today"}})
    assert r.plan(TOOLS, [], 10).prefill == {"search": {"query": "today"}}
    assert r.plan(TOOLS, calls("search"), 10).prefill == {}


def test_terminal_rules_replace_send_message_as_the_end():
    r = rules({"type": "exit_loop", "tool_name": "finish"})
    assert r.terminal(TOOLS) == ["finish"]
    assert r.after("finish", calls("finish"), heartbeat=True) == "end"
    assert r.after("send_message", calls("send_message"), heartbeat=False) == "reply"
    assert r.plan(TOOLS, [], 1) == Plan(("finish",), {}, "reply")


def test_child_rule_allows_only_the_children_right_after():
    r = rules({"type": "constrain_child_tools", "tool_name": "search", "children": ["lookup", "save"],
               "child_arg_nodes": [{"name": "save", "args": {"tag": "found"}}]})
    assert allowed(r, calls("search")) == ["lookup", "save"]
    assert r.plan(TOOLS, calls("search"), 10).prefill == {"save": {"tag": "found"}}
    assert allowed(r, calls("search", "lookup")) == TOOLS
    assert r.after("search", calls("search"), heartbeat=False) == "continue"  # a child must follow


def test_parent_rule_children_only_right_after_the_parent():
    r = rules({"type": "parent_last_tool", "tool_name": "search", "children": ["save"]})
    assert "save" not in allowed(r, [])
    assert "save" not in allowed(r, calls("lookup"))
    assert allowed(r, calls("search")) == ["save"]  # Letta: after the parent, only its children
    assert "save" not in allowed(r, calls("search", "save"))


def test_conditional_rule_maps_the_output_to_the_next_tool():
    r = rules({"type": "conditional", "tool_name": "lookup",
               "child_output_mapping": {"found": "save", "true": "think", "3": "finish"},
               "default_child": "search"})
    assert allowed(r, [Call("lookup", " found\n")]) == ["save"]
    assert allowed(r, [Call("lookup", "TRUE")]) == ["think"]
    assert allowed(r, [Call("lookup", "3.0")]) == ["finish"]
    assert allowed(r, [Call("lookup", "nothing")]) == ["search"]  # the default child
    free = rules({"type": "conditional", "tool_name": "lookup", "child_output_mapping": {"found": "save"}})
    assert allowed(free, [Call("lookup", "nothing")]) == TOOLS  # no default: anything
    strict = rules({"type": "conditional", "tool_name": "lookup", "child_output_mapping": {"found": "save"},
                    "require_output_mapping": True})
    # no tool is left: the reply guarantee offers the terminal tool instead of nothing
    assert strict.plan(TOOLS, [Call("lookup", "nothing")], 10) == Plan(("send_message",), {}, "reply")


def test_max_count_per_step_counts_calls_in_the_turn():
    r = rules({"type": "max_count_per_step", "tool_name": "search", "max_count_limit": 2})
    assert "search" in allowed(r, calls("search"))
    assert "search" not in allowed(r, calls("search", "lookup", "search"))
    assert allowed(r, calls("search", "search")) == [t for t in TOOLS if t != "search"]


def test_required_before_exit_holds_back_the_terminal_tool():
    r = rules({"type": "required_before_exit", "tool_name": "save"})
    assert "send_message" not in allowed(r, [])
    assert r.after("search", calls("search"), heartbeat=False) == "continue"  # cannot stop yet
    assert "send_message" in allowed(r, calls("save"))
    assert r.after("save", calls("save"), heartbeat=False) == "reply"
    # with two steps left, the first goes to the required tool, the last to the reply
    assert r.plan(TOOLS, calls("search"), 2) == Plan(("save",), {}, "required")
    assert r.plan(TOOLS, calls("search", "save"), 1) == Plan(("send_message",), {}, "reply")


def test_required_terminal_tool_may_end_the_turn_itself():
    r = rules({"type": "required_before_exit", "tool_name": "send_message"})
    assert "send_message" in allowed(r, [])
    assert r.after("send_message", calls("send_message"), heartbeat=False) == "end"


def test_continue_rule_keeps_the_turn_going():
    r = rules({"type": "continue_loop", "tool_name": "think"})
    assert r.after("think", calls("think"), heartbeat=False) == "continue"
    assert r.after("search", calls("search"), heartbeat=False) == "reply"


def test_requires_approval_tools_are_offered_but_never_the_reply():
    """The kernel's approval queue holds each call for a person; the rules only keep such a tool from
    being the turn's terminal tool or holding the turn open."""
    r = rules({"type": "requires_approval", "tool_name": "save"}, {"type": "run_first", "tool_name": "save"})
    assert r.requiring_approval() == ["save"]
    assert allowed(r, []) == ["save"]  # an init rule may name it
    assert "save" in allowed(r, calls("search"))
    with pytest.raises(ToolRuleError, match="no terminal tool can be called"):
        rules({"type": "requires_approval", "tool_name": "send_message"}).check(TOOLS)
    # a required tool that needs approval cannot hold the turn open
    held = rules({"type": "requires_approval", "tool_name": "save"},
                 {"type": "required_before_exit", "tool_name": "save"})
    assert "send_message" in allowed(held, [])
    assert held.after("send_message", calls("send_message"), heartbeat=False) == "end"


def test_reply_guarantee_forces_the_terminal_tool():
    r = rules({"type": "run_first", "tool_name": "search"},
              {"type": "constrain_child_tools", "tool_name": "search", "children": ["lookup"]})
    assert r.plan(TOOLS, [], 1) == Plan(("send_message",), {}, "reply")  # last step beats the init rule
    assert r.plan(TOOLS, calls("search"), 1).allowed == ("send_message",)  # and the child rule
    assert r.plan(TOOLS, calls("think"), 5, must_reply=True).allowed == ("send_message",)
    # on a free step the rules hold
    assert allowed(r, calls("search"), steps_left=2) == ["lookup"]


def test_a_whole_turn_of_plans_always_reaches_the_terminal_tool():
    """Whatever the model picks among the allowed tools, the turn ends with a terminal call."""
    r = rules({"type": "run_first", "tool_name": "search"},
              {"type": "constrain_child_tools", "tool_name": "search", "children": ["search", "lookup"]},
              {"type": "required_before_exit", "tool_name": "save"},
              {"type": "max_count_per_step", "tool_name": "lookup", "max_count_limit": 1})
    for pick in (0, -1):  # the first allowed tool each time, or the last
        for max_steps in range(1, 7):
            history: list[Call] = []
            must_reply, ended = False, False
            for i in range(max_steps):
                plan = r.plan(TOOLS, history, max_steps - i, must_reply)
                name = plan.allowed[pick]
                history.append(Call(name))
                after = r.after(name, history, heartbeat=True)
                if after == "end":
                    ended = True
                    break
                must_reply = after == "reply"
            assert history[-1].name == "send_message", (pick, max_steps, history)  # a reply, always
            if max_steps >= 3:  # room for the init call, the required call and the reply: all rules hold
                assert ended and {"search", "save"} <= {c.name for c in history}, (pick, max_steps, history)
                assert history[0].name == "search"


@pytest.mark.parametrize("bad, why", [
    ({"type": "run_last", "tool_name": "x"}, "unknown tool rule type 'run_last'"),
    ({"tool_name": "search"}, "unknown tool rule type None"),
    ({"type": "exit_loop"}, "exit_loop: 'tool_name' must be a non-empty string"),
    ({"type": "constrain_child_tools", "tool_name": "search", "children": []},
     "'children' must be a non-empty"),
    ({"type": "max_count_per_step", "tool_name": "search", "max_count_limit": 0}, "must be an integer >= 1"),
    ({"type": "max_count_per_step", "tool_name": "search", "max_count_limit": True},
     "must be an integer >= 1"),
    ({"type": "conditional", "tool_name": "lookup", "child_output_mapping": {}},
     "child_output_mapping must map"),
    ({"type": "run_first", "tool_name": "search", "args": "q"}, "args must be an object"),
    ({"type": "constrain_child_tools", "tool_name": "search", "children": ["lookup"],
      "child_arg_nodes": [{"name": "save", "args": {}}]}, "names no child of the rule"),
    ("send_message", "a tool rule must be an object"),
])
def test_malformed_rules_are_refused_with_the_reason(bad, why):
    with pytest.raises(ToolRuleError) as e:
        ToolRules.from_letta([bad])
    assert why in str(e.value)


def test_check_refuses_rules_on_tools_the_agent_lacks():
    with pytest.raises(ToolRuleError, match="names tool.s. the agent does not have: fly"):
        rules({"type": "constrain_child_tools", "tool_name": "search", "children": ["fly"]}).check(TOOLS)
    with pytest.raises(ToolRuleError, match="prefills unknown argument.s. of search: depth"):
        rules({"type": "run_first", "tool_name": "search", "args": {"depth": 3}}).check(
            TOOLS, {"search": ["query"]})
    with pytest.raises(ToolRuleError, match="no terminal tool"):
        ToolRules().check(["search"])  # no send_message, no exit_loop rule
    rules({"type": "exit_loop", "tool_name": "finish"}).check(["search", "finish"])


def test_letta_shapes_round_trip_and_client_models_are_accepted():
    from letta_client.types import ChildToolRule, ConditionalToolRule, InitToolRule, MaxCountPerStepToolRule

    given = [
        InitToolRule(tool_name="search", type="run_first", args={"query": "x"}),
        ChildToolRule(tool_name="search", children=["lookup"], type="constrain_child_tools"),
        ConditionalToolRule(tool_name="lookup", child_output_mapping={"a": "save"}, default_child="think",
                            type="conditional"),
        MaxCountPerStepToolRule(tool_name="save", max_count_limit=2, type="max_count_per_step"),
    ]
    r = ToolRules.from_letta(given)
    out = r.to_letta()
    assert out == [
        {"type": "run_first", "tool_name": "search", "prompt_template": None, "args": {"query": "x"}},
        {"type": "constrain_child_tools", "tool_name": "search", "prompt_template": None,
         "children": ["lookup"]},
        {"type": "conditional", "tool_name": "lookup", "prompt_template": None,
         "child_output_mapping": {"a": "save"}, "default_child": "think", "require_output_mapping": False},
        {"type": "max_count_per_step", "tool_name": "save", "prompt_template": None, "max_count_limit": 2},
    ]
    assert ToolRules.from_letta(out).to_letta() == out
    assert r.describe()[1] == "After search, call one of: lookup."
