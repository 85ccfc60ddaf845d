"""This project's own skyrl-gym environments (registered as `say_word` and `calculator`).

`say_word` is one a random-init model can learn: after the model's first turn the environment
names a positive word, and each later turn scores how positive it is and whether it said it. `calculator`
shows function tools in the plain template's tool format: the model calls
`<tool_call>{"name": "calculator", "arguments": {"expression": "17*23"}}</tool_call>` (the
Hermes form that Qwen's and most tool-calling chat templates emit), the environment answers with
a `tool` message holding the result, and a turn ending in `#### <answer>` is scored.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import zlib
from typing import Any

from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput

from common.rewards import explicit_pos

WORDS = ("good", "happy", "great", "love")


class SayWordEnv(BaseTextEnv):
    """Turn 1 is free; then the environment says `Say <word>.`, a positive word that depends on
    the prompt and the turn, and scores each later turn by how positive it is (VADER's compound
    score, as the `explicit_pos` reward) plus 1 if it says `<word>`, scaled so that a perfect
    episode scores 1. Graded, so that a random-init model finds the signal; the word itself can
    only be said every time by reading the observation."""

    def __init__(self, env_config: Any = None, extras: dict | None = None):
        super().__init__()
        self.max_turns = max(2, int((extras or {}).get("max_turns", 2)))
        self.key = ""
        self.word = ""

    def init(self, prompt):
        self.key = json.dumps(prompt)
        return prompt, {}

    def step(self, action: str) -> BaseTextEnvStepOutput:
        self.turns += 1
        reward = 0.0
        if self.word:
            said = self.word in re.findall(r"[a-z]+", action.lower())
            positive = explicit_pos([""], [action])[0]
            reward = (positive + float(said)) / 2 / (self.max_turns - 1)
        done = self.turns >= self.max_turns
        self.word = WORDS[zlib.crc32(f"{self.key}:{self.turns}".encode()) % len(WORDS)]
        observations = [] if done else [{"role": "user", "content": f"Say {self.word}."}]
        return BaseTextEnvStepOutput(observations=observations, reward=reward, done=done, metadata={})


CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression of numbers, + - * / ** and brackets.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]},
    },
}
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
             ast.Div: operator.truediv, ast.Pow: operator.pow, ast.USub: operator.neg}


def tool_prompt(tools: list[dict]) -> str:
    """The system message that offers `tools` in the plain template's tool format."""
    listed = "\n".join(json.dumps(t["function"]) for t in tools)
    return (f"You may call these tools:\n{listed}\nTo call one, write "
            '<tool_call>{"name": NAME, "arguments": {...}}</tool_call>; its result comes back as a '
            "Tool message.")


def calculate(expression: str) -> float:
    """The value of an arithmetic expression, without `eval`."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")

    return value(ast.parse(expression, mode="eval").body)


class CalculatorEnv(BaseTextEnv):
    """Arithmetic with a calculator tool. The question is the row's `expression` column (or two
    numbers drawn from the prompt); each model turn either calls the tool, answered with a
    `tool` message, or ends the episode, scored 1 if it ends with `#### <value>`."""

    def __init__(self, env_config: Any = None, extras: dict | None = None):
        super().__init__()
        extras = extras or {}
        self.max_turns = int(extras.get("max_turns", 4))
        self.expression = extras.get("expression")
        self.tool_calls = 0

    def init(self, prompt):
        if self.expression is None:
            seed = zlib.crc32(json.dumps(prompt).encode())
            self.expression = f"{seed % 90 + 10}*{seed // 90 % 90 + 10}"
        question = {"role": "user", "content": f"What is {self.expression}? End with #### <answer>."}
        return [{"role": "system", "content": tool_prompt([CALCULATOR])}, question], {}

    def step(self, action: str) -> BaseTextEnvStepOutput:
        self.turns += 1
        call = TOOL_CALL.search(action)
        if call and self.turns < self.max_turns:
            self.tool_calls += 1
            try:
                request = json.loads(call.group(1))
                result = str(calculate(request["arguments"]["expression"]))
            except Exception as e:  # the model's call is malformed: say so, as a tool would
                result = f"error: {e}"
            return BaseTextEnvStepOutput(observations=[{"role": "tool", "content": result}],
                                         reward=0.0, done=False, metadata={})
        answer = re.search(r"####\s*(-?[\d.]+)\s*$", action.strip())
        correct = answer is not None and math_equal(answer.group(1), calculate(self.expression))
        return BaseTextEnvStepOutput(observations=[], reward=float(correct), done=True, metadata={})

    def get_metrics(self) -> dict:
        return {"tool_calls": self.tool_calls}


def math_equal(text: str, value: float) -> bool:
    try:
        return abs(float(text) - value) < 1e-6
    except ValueError:
        return False
