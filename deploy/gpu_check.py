"""First run on GPUs: in a few minutes, checks that this machine's vLLM, NCCL and GPUs do what a
training run needs. One line per check; it stops, and exits 1, at the first that fails.

    python -m deploy.gpu_check                                   # on this node's GPUs
    python -m deploy.gpu_check --model.name EleutherAI/pythia-410m-deduped
    python -m deploy.gpu_check --learner.num-ranks 2              # a sharded learner, a GPU each
    python -m deploy.gpu_check --cluster.device cpu --model.name tiny   # the same checks on a CPU
    python -m deploy.gpu_check --skip run                        # all but the short training run

Any deploy.train field can be set, as on its command line. The checks: vLLM loads the model; a
broadcast of changed weights (NCCL on GPUs) makes each of the engine's greedy tokens the
learner's first choice; vLLM's log-probs agree with the learner's; both within the dtype's
tolerance; one learner step at the run's learning rate changes the weights the engine receives;
a short run of `deploy.train` completes. The tests marked `gpu` run the same checks.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common import config_loading
from common import data, models
from common.config import Config
from common.errors import RunError
from deploy.train import cause_of
from deploy.weight_check import TOLERANCE
from learner.sharding import reshard

RUN_STEPS = 5
GREEDY_TOKENS = 8  # few enough that 16-bit kernels are not yet left to near-ties


class CheckFailed(RunError):
    """A check that did not pass; its message says what was seen."""


def command_line(argv: list[str]) -> list[str]:
    """deploy.train's arguments for the checks: one engine, small batches, the broadcast
    transport and, on GPUs, the reference model with a GPU for the learner and one for the
    engine; then `argv`, which may change any of them."""
    base = ["--rollout.num-workers", "1", "--cluster.weight-sync", "broadcast", "--grpo.group-size",
            "4", "--grpo.batch-size", "8", "--rollout.max-tokens", "16", "--logging.progress", "lines"]
    if config_loading.parse(argv).cluster.device == "gpu":  # said so, or `auto` found CUDA and vLLM's CUDA build
        base += ["--cluster.device", "gpu", "--model.name", "EleutherAI/pythia-410m-deduped"]
    return [*base, *argv]


@dataclass
class Checks:
    """A learner and one engine, joined by the run's own weight transport."""

    argv: list[str]
    """deploy.train's command line (see `command_line`)."""

    def __post_init__(self):
        self.cfg: Config = config_loading.from_args(self.argv)
        self.push = None

    def start(self) -> str:
        import ray

        from deploy.clients import LearnerClient
        from deploy.launch import init_ray, launch
        from deploy.weight_push import weight_push
        from deploy.workers import RolloutWorkers

        started = time.perf_counter()
        init_ray(self.cfg)
        self.actors = launch(self.cfg, self.cfg.cluster.call_timeout_s)
        self.workers = RolloutWorkers(self.actors.workers, self.cfg)
        self.workers.start()
        learner = LearnerClient(self.actors.learner, self.cfg.cluster.call_timeout_s)
        self.push = weight_push(self.cfg, self.actors, learner, self.workers, self.actors.run_id)
        self.dtype = self._learner(lambda learner: learner.compute_dtype)
        tokenizer = models.tokenizer_for(self.cfg.model.name, self.cfg.model.cache_dir)
        self.prompts = data.load_prompts(self.cfg.data, tokenizer).train[:4]
        vllm = ray.get(self.actors.workers[0].__ray_call__.remote(_vllm_version))
        return (f"vLLM {vllm} runs {self.cfg.model.name} in {_name(self.dtype)} on "
                f"{self.cfg.cluster.device} ({time.perf_counter() - started:.0f} s to start)")

    def broadcast(self) -> str:
        ids = self.prompts[0].token_ids
        before = self._engine(_engine_greedy, ids)
        self._learner(_perturb)  # the update must change greedy output for the check to mean much
        self.push.push(self._learner(lambda learner: learner.version))
        engine = self._engine(_engine_greedy, ids)
        # Each of the engine's tokens must be the learner's first choice, up to the dtype's
        # tolerance: in 16 bits a near-tie may go either way, and after it the two continue
        # from different prefixes, so token-for-token equality would fail for rounding alone.
        gap = self._learner(_greedy_gap, ids, engine)
        tolerance = TOLERANCE[_name(self.dtype)]
        if not gap <= tolerance:
            raise CheckFailed(f"after a {self.push.name} of changed weights the engine's greedy "
                              f"tokens {engine} are not the learner's: one is {gap:.3g} below the "
                              f"learner's first choice in log-prob ({_name(self.dtype)} allows {tolerance:g})")
        moved = "changed the engine's greedy output" if engine != before else \
            "left the engine's greedy output as it was"
        return (f"{self.push.name} of changed weights ({moved}): each of the engine's "
                f"{GREEDY_TOKENS} greedy tokens is the learner's first choice within {gap:.2g}")

    def logprobs(self) -> str:
        groups = self._generate()
        diff = self._learner(_logprob_difference, groups)
        tolerance = TOLERANCE[_name(self.dtype)]  # the run's own weight-check defaults
        if not diff["mean"] <= tolerance:
            raise CheckFailed(f"vLLM's log-probs differ from the learner's by {diff['mean']:.3g} per "
                              f"token on average (worst {diff['max']:.3g}); {_name(self.dtype)} allows "
                              f"{tolerance:g}")
        return (f"log-probs: vLLM and the learner agree within {diff['mean']:.2g} per token on "
                f"average (worst {diff['max']:.2g}, {diff['tokens']} tokens; {_name(self.dtype)} "
                f"allows {tolerance:g})")

    def update(self) -> str:
        import ray

        metrics = ray.get(self.actors.learner.train.remote(self._generate()))
        self.push.push(metrics["step"])
        changed = metrics["engine_weights_changed"]
        if not changed > 0:
            raise CheckFailed(f"a learner step at lr {self.cfg.learner.learning_rate:g} changed none of the "
                              f"weights the engines receive in {_name(self.dtype)}")
        return (f"a step at lr {self.cfg.learner.learning_rate:g} changed {100 * changed:.2f}% of the weights "
                f"the engine receives, and it loaded them")

    def run(self) -> str:
        self.close()
        with tempfile.TemporaryDirectory() as run_dir:
            started = time.perf_counter()
            argv = [*self.argv, "--steps", str(RUN_STEPS), "--run-dir", f"{run_dir}/run",
                    "--learner.checkpoint-every", "0"]
            proc = subprocess.run([sys.executable, "-m", "deploy.train", *argv], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
                raise CheckFailed(f"a {RUN_STEPS}-step run exited {proc.returncode}: {tail[0]}")
        return f"a {RUN_STEPS}-step run of deploy.train completed ({time.perf_counter() - started:.0f} s)"

    def close(self) -> None:
        import ray

        from deploy.launch import shutdown

        if self.push is not None:
            self.push.close()
            shutdown(self.actors)
            self.push = None
        ray.shutdown()

    # --- helpers ---------------------------------------------------------------------------

    def _learner(self, fn: Callable, *args):
        """`fn(learner, *args)` on every learner rank (a sharded model's forward needs them
        all); rank 0's result."""
        import ray

        ranks = [self.actors.learner, *self.actors.learner_ranks]
        return ray.get([rank.__ray_call__.remote(fn, *args) for rank in ranks])[0]

    def _engine(self, fn: Callable, *args):
        import ray

        return ray.get(self.actors.workers[0].__ray_call__.remote(fn, *args))

    def _generate(self) -> list:
        import ray

        return ray.get(self.actors.workers[0].generate.remote(self.prompts, 0))[0]


# Run inside the actors (with __ray_call__): what a check needs to see there.

def _vllm_version(worker) -> str:
    import vllm

    return vllm.__version__


PERTURBATION = 0.1  # noise of this fraction of each tensor's RMS: a change, not a new model


def _perturb(learner) -> None:
    """Move the learner's weights as a few steps of training would, each tensor by noise in
    proportion to its own scale (one size for all would swamp small weights and miss large
    ones). The same noise on every rank; a sharded parameter takes its rank's part of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in learner.model.parameters():
            whole = p.full_tensor() if isinstance(p, DTensor) else p
            rms = whole.float().pow(2).mean().sqrt().item()
            noise = (torch.randn(p.shape, generator=generator) * PERTURBATION * rms).to(p.device, p.dtype)
            p.add_(distribute_tensor(noise, p.device_mesh, p.placements) if isinstance(p, DTensor) else noise)
    learner.version += 1


def _engine_greedy(worker, ids: list[int]) -> list[int]:
    from vllm import SamplingParams

    # Exactly GREEDY_TOKENS, end of text or not, as the learner scores them: min_tokens keeps
    # the stop tokens out until then (vllm/v1/sample/logits_processor/builtin.py,
    # MinTokensLogitsProcessor).
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, min_tokens=GREEDY_TOKENS)
    return list(worker.loop.submit(ids, params).result().outputs[0].token_ids)


def _greedy_gap(learner, ids: list[int], tokens: list[int]) -> float:
    """How far below the learner's first choice the worst of `tokens` is, in log-prob, each
    given the prompt `ids` and the tokens before it, computed as the learner trains."""
    sequence = torch.tensor([ids + tokens], device=learner.device)
    with torch.no_grad(), torch.autocast(learner.device, dtype=learner.compute_dtype,
                                         enabled=learner.compute_dtype != torch.float32):
        logits = learner.model(input_ids=sequence).logits[0, len(ids) - 1:-1].float()
    reshard(learner.model)  # a sharded model's weights back to shards
    logp = logits.log_softmax(-1)  # [T, V]
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0]  # [T]
    return (logp.max(-1).values - chosen).max().item()


def _logprob_difference(learner, groups) -> dict:
    from learner.batch import collate

    seqs = [(g.prompt.token_ids, ids, lps) for g in groups for ids, lps in zip(g.completion_ids, g.logprobs)]
    mb = collate(seqs, torch.zeros(len(seqs)), learner.pad_id).to(learner.device)
    with torch.no_grad():
        logp, _ = learner.logprobs(mb)
    reshard(learner.model)  # a sharded model's weights back to shards
    diff = (logp - mb.behaviour_logp)[mb.completion_mask].abs()
    return {"max": diff.max().item(), "mean": diff.mean().item(), "tokens": diff.numel()}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


CHECKS = ("start", "broadcast", "logprobs", "update", "run")


def skipped(argv: list[str]) -> tuple[list[str], set[str]]:
    """`argv` without its `--skip NAME[,NAME]`, and the checks it names (any but `start`, which
    the others need)."""
    if "--skip" not in argv:
        return argv, set()
    i = argv.index("--skip")
    names = set(argv[i + 1].split(",")) if i + 1 < len(argv) else set()
    if not names or not names <= set(CHECKS) - {"start"}:
        raise SystemExit(f"--skip takes checks among {', '.join(CHECKS[1:])}, comma-separated")
    return argv[:i] + argv[i + 2:], names


def main(argv: list[str] | None = None) -> int:
    from common import logs

    logs.console()
    argv, skip = skipped(sys.argv[1:] if argv is None else argv)
    checks = Checks(command_line(argv))
    try:
        for name in CHECKS:
            if name in skip:
                print(f"skip  {name:<10} (--skip)", flush=True)
                continue
            print(f"ok    {name:<10} {getattr(checks, name)()}", flush=True)
    except Exception as e:
        cause = cause_of(e)
        print(f"FAIL  {name:<10} {cause if isinstance(cause, RunError) else repr(cause)}", flush=True)
        if not isinstance(cause, RunError):
            traceback.print_exc()  # not a finding of the check: what to read is the traceback
        return 1
    finally:
        checks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
