"""A skyrl-gym environment, as the README's "Environments and tools" shows it: run it with
`python -m deploy.train --env.name deploy.examples.repeat_number:RepeatNumber --env.max-turns 3`."""

from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput


class RepeatNumber(BaseTextEnv):
    def __init__(self, env_config=None, extras=None):
        super().__init__()
        self.max_turns = extras["max_turns"]

    def step(self, action: str) -> BaseTextEnvStepOutput:
        self.turns += 1
        reward = float(str(self.turns) in action)  # turn k says k
        done = self.turns >= self.max_turns
        observations = [] if done else [{"role": "user", "content": f"Now say {self.turns + 1}."}]
        return BaseTextEnvStepOutput(observations=observations, reward=reward, done=done, metadata={})
