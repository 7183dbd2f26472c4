"""An environment for the end-to-end multi-turn test (tests/test_train.py): every episode has two
model turns with a tool message between them, and rows whose answer is even raise at the first
step, as a broken environment would (their episodes fail, counted; the run goes on)."""

from __future__ import annotations

from megarl.agents.environment import Environment, StepResult


class ToolThenAnswer(Environment):
    def reset(self, row):
        self.answer, self.turns = row["answer"], 0
        return None

    def step(self, model_turn):
        self.turns += 1
        if int(self.answer) % 2 == 0:
            raise ValueError(f"no tool result for {self.answer}")
        if self.turns == 1:
            return StepResult([{"role": "tool", "content": self.answer}], info={"tool_calls": 1.0})
        return StepResult(None, reward=float(model_turn.split()[:1] == [self.answer]), done=True)
