"""The learner: the trainable policy, its optimizer and the GRPO update, and the sending side of
every weight transfer. A plain class; `deploy/launch.py` makes it a Ray actor."""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, get_scheduler
from trl.trainer.utils import entropy_from_logits

from common import logs, models
from common.config import Config, GRPOConfig, cpu_threads
from common.errors import one_line
from common.held import remove_unheld
from common.spans import Span, Spans
from common.types import RolloutGroup, RunState, RunSummary
from common.weight_sync import (
    SHARED_WEIGHTS,
    BroadcastChannel,
    SharedMemoryChannel,
    TensorSpec,
    WeightChannel,
    listen_socket,
    specs_of,
)
from learner import checkpoint, sharding
from learner.batch import MicroBatch, collate, flat_sequences, micro_batches, trained_tokens
from learner.grpo import grpo_loss, masked_mean, sampling_mismatch
from learner.sharding import on_every_rank

log = logging.getLogger(__name__)
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
SAMPLE_STRIDE = 16  # engine_weights_changed is measured on every 16th element of each parameter


def loss_options(grpo: GRPOConfig) -> dict:
    """The `grpo_loss` options a run's GRPOConfig sets (same names as TRL's)."""
    return dict(loss_type=grpo.loss_type, epsilon=grpo.epsilon, epsilon_high=grpo.epsilon_high,
                delta=grpo.delta, beta=grpo.beta, importance_sampling_level=grpo.importance_sampling_level,
                use_bias_correction_kl=grpo.use_bias_correction_kl,
                sapo_temperature_pos=grpo.sapo_temperature_pos,
                sapo_temperature_neg=grpo.sapo_temperature_neg,
                vllm_importance_sampling_correction=grpo.vllm_importance_sampling_correction,
                vllm_importance_sampling_mode=grpo.vllm_importance_sampling_mode,
                vllm_importance_sampling_clip_min=grpo.vllm_importance_sampling_clip_min,
                vllm_importance_sampling_clip_max=grpo.vllm_importance_sampling_clip_max)


class Learner:
    def __init__(self, cfg: Config, rank: int = 0):
        self.cfg, self.rank = cfg, rank
        self.peers: list = []
        """Rank 0's handles of the other learner ranks (learner/sharding.py)."""
        self.sharded = cfg.learner.num_ranks > 1
        if cfg.run_dir:
            logs.actor_file(cfg.run_dir, "learner" if rank == 0 else f"learner-rank-{rank}")
        # Resolved here, not by the driver: this may be another node (presets build, hub ids
        # download, on the node that needs them).
        self.model_path = model_path = str(models.resolve(cfg.model.name, cfg.model.cache_dir))
        self.device = "cpu" if cfg.cluster.device == "cpu" else "cuda"
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads(cfg, "learner", len(os.sched_getaffinity(0))))
        torch.manual_seed(cfg.seed + rank)
        # Mixed precision: the weights and AdamW's state stay float32 (an update of 1e-6 would
        # round away in bfloat16 for most weights: DESIGN.md section 6); forward and backward
        # run in the compute dtype, which is also the engines' dtype and what they are sent.
        self.compute_dtype = models.torch_dtype(cfg.model.dtype, cfg.cluster.device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(self.device)
        self.model.train()
        self.ref_model = None
        if cfg.grpo.beta > 0:  # the reference costs a model's memory: load it only when used
            self.ref_model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=self.compute_dtype).to(self.device)
            self.ref_model.eval().requires_grad_(False)
        self.pad_id = models.load_tokenizer(model_path).pad_token_id
        self.optimizer = self.scheduler = None
        if not self.sharded:  # sharded: once the ranks have met (`join_ranks`)
            self._make_optimizer()
        # float16 gradients underflow without loss scaling; bfloat16 and float32 need none.
        self.scaler = torch.amp.GradScaler(self.device, enabled=self.compute_dtype == torch.float16)
        self.version = 0
        self.spans = Spans("learner")
        self._channel: WeightChannel | None = None
        self._socket = None  # the broadcast group's port, bound before the group forms

    def _make_optimizer(self) -> None:
        # fused AdamW takes plain tensors; over FSDP's shards (DTensors) the foreach one.
        fused = dict(foreach=True) if self.sharded else dict(fused=True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.learning_rate,
                                           weight_decay=self.cfg.learner.weight_decay, **fused)
        grpo, learner = self.cfg.grpo, self.cfg.learner
        self.scheduler = get_scheduler(SCHEDULES[learner.lr_schedule], self.optimizer,
                                       num_warmup_steps=learner.warmup_steps * grpo.num_iterations,
                                       num_training_steps=self.cfg.steps * grpo.num_iterations)

    # --- the ranks (learner.num_ranks > 1) ---------------------------------------------------

    def open_ranks(self, host: str) -> int:
        """Rank 0: a free port on `host` (this node's address) for the ranks to meet at."""
        with listen_socket(host) as sock:  # released at once; the group binds it next
            return sock.getsockname()[1]

    def join_ranks(self, host: str, port: int, peers: list) -> None:
        """Meet the other ranks, shard the model over them, and make the optimizer (over the
        shards); rank 0 is given the others' handles."""
        sharding.init_group(host, port, self.rank, self.cfg.learner.num_ranks, self.device,
                            self.cfg.cluster.call_timeout_s)
        sharding.shard(self.model, self.compute_dtype, self.device)
        if self.ref_model is not None:
            sharding.shard(self.ref_model, self.compute_dtype, self.device)
        self._make_optimizer()
        self.peers = peers

    # --- the GRPO update -----------------------------------------------------------------------

    def take_spans(self) -> list[Span]:
        return self.spans.take()

    @on_every_rank
    def train(self, groups: list[RolloutGroup]) -> dict:
        """One GRPO step on a batch of groups: `num_iterations` optimizer steps over it."""
        self.spans.step = self.version + 1
        with self.spans.span("train"):
            return self._train(groups)

    def _train(self, groups: list[RolloutGroup]) -> dict:
        start = time.perf_counter()
        grpo, ranks = self.cfg.grpo, self.cfg.learner.num_ranks
        # Groups reach the buffer as they finish, in an order that varies from run to run, and
        # float sums depend on order: in a fixed one, a rerun or a resumed run makes the same
        # update bit for bit.
        groups = sorted(groups, key=lambda g: (g.policy_version, g.worker, g.prompt.index))
        # This rank's share of the sequences; the normalisers are the whole batch's.
        lengths = [len(p) + len(c) for p, c, _ in flat_sequences(groups)]
        rows = sharding.deal(lengths, ranks)[self.rank] if self.sharded else None
        on_host = micro_batches(groups, self.cfg.learner.micro_batch_size, grpo.scale_rewards,
                                self.pad_id, mask_truncated=grpo.mask_truncated_completions, rows=rows)
        num_sequences = len(lengths)
        num_tokens = trained_tokens(groups, grpo.mask_truncated_completions)
        # Each micro-batch's share of the batch's tokens, counted on the host.
        shares = (torch.stack([mb.completion_mask.sum() for mb in on_host]) / max(num_tokens, 1)).tolist()
        batches = [mb.to(self.device) for mb in on_host]
        old_logps: list[torch.Tensor | None] = [None] * len(batches)
        ref_logps = [self._ref_logprobs(mb) for mb in batches]
        # Token-weighted means over every pass and micro-batch (the loss: per pass, averaged),
        # summed on the device and read once after the step: reading them per micro-batch would
        # make the host wait for the device every time.
        totals = {key: torch.zeros((), dtype=torch.float64, device=self.device) for key in
                  ("loss", "clip_fraction", "kl", "is_weight", "is_masked", "entropy",
                   "mismatch_kl", "mismatch_max")}
        grad_norms = []
        before = self._engine_sample()

        for iteration in range(grpo.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for i, mb in enumerate(batches):
                first_pass = iteration == 0
                # Entropy is only logged, and its pass over the vocabulary costs as much as the
                # log-probs': measured once, on the first pass.
                logp, entropy = self._logprobs(self.model, mb, entropy=first_pass)
                out = grpo_loss(
                    logp, old_logps[i], mb.behaviour_logp, ref_logps[i], mb.advantages,
                    mb.completion_mask, **loss_options(grpo), num_sequences=num_sequences,
                    num_tokens=num_tokens, max_completion_length=self.cfg.rollout.max_tokens,
                    num_micro_batches=len(batches) * ranks,
                )
                self.scaler.scale(out.loss).backward()
                share = shares[i]
                totals["loss"] += out.loss.detach() / grpo.num_iterations
                for key, value in (("clip_fraction", out.clip_fraction), ("kl", out.kl),
                                   ("is_weight", out.is_weight), ("is_masked", out.is_masked_fraction)):
                    totals[key] += torch.as_tensor(value).detach() * share / grpo.num_iterations
                if first_pass:
                    # The first pass runs on the weights that scored the batch: they are the
                    # "old" policy of every later pass, so no extra forward is needed.
                    old_logps[i] = logp.detach()
                    totals["entropy"] += masked_mean(entropy, mb.completion_mask) * share
                    # How far the engine's sampling log-probs are from the learner's, on the
                    # tokens trained on: vLLM's numerics, and the policy lag.
                    mismatch = sampling_mismatch(logp.detach(), mb.behaviour_logp, mb.completion_mask)
                    totals["mismatch_kl"] += mismatch.kl * share
                    totals["mismatch_max"] = torch.maximum(totals["mismatch_max"], mismatch.max_abs_diff)
            max_norm = self.cfg.learner.max_grad_norm or float("inf")
            self.scaler.unscale_(self.optimizer)
            grad_norms.append(sharding.full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        self.version += 1
        changed = self._changed_count(before)
        # The step's one wait for the device.
        n = len(totals)
        read = torch.stack([*totals.values(), grad_norms[0].to(torch.float64), *changed.values()]).tolist()
        totals, grad_norm, changed = dict(zip(totals, read[:n])), read[n], dict(zip(changed, read[n + 1:]))
        if self.sharded:  # each rank measured its own sequences and its own shards
            maxima = {"mismatch_max": totals.pop("mismatch_max")}
            totals, maxima = sharding.reduce_sums({**totals, **changed}, maxima)
            changed = {key: totals.pop(key) for key in ("changed", "parameters")}
            totals.update(maxima)

        seconds = time.perf_counter() - start
        rewards = torch.tensor([r for grp in groups for r in grp.rewards])  # NaN: unscored
        scored = rewards[~rewards.isnan()]
        lengths = torch.tensor([len(ids) for grp in groups for ids in grp.completion_ids], dtype=torch.float)
        lags = [self.version - 1 - grp.policy_version for grp in groups]  # by the oldest token
        token_lags = torch.tensor([self.version - 1 - v for grp in groups for versions in grp.token_versions
                                   for v in versions], dtype=torch.float)
        metrics = {
            "step": self.version,
            **totals,
            "reward": scored.mean().item() if scored.numel() else math.nan,
            "reward_std": scored.std().item() if scored.numel() > 1 else 0.0,
            "unscored_frac": 1 - scored.numel() / rewards.numel(),
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "completion_len": lengths.mean().item(),
            "truncated_frac": sum(r == "length" for grp in groups for r in grp.finish_reasons) / len(lengths),
            "zero_std_groups": sum(grp.zero_std for grp in groups) / len(groups),
            "policy_lag": sum(lags) / len(lags),
            "policy_lag_max": max(lags),
            "lag_hist": {str(lag): lags.count(lag) for lag in sorted(set(lags))},
            "token_lag_mean": token_lags.mean().item(),
            "mixed_version_frac": sum(len(set(versions)) > 1 for grp in groups
                                      for versions in grp.token_versions) / len(lengths),
            "train_tokens": num_tokens,
            "train_s": seconds,
            "train_tokens_per_s": num_tokens * grpo.num_iterations / seconds,
            "engine_weights_changed": changed["changed"] / changed["parameters"],
        }
        for name in groups[0].reward_parts:
            parts = torch.tensor([r for grp in groups for r in grp.reward_parts[name]])
            metrics[f"reward/{name}"] = parts.nanmean().item()
        return metrics

    def _engine_sample(self) -> list[torch.Tensor]:
        """Every SAMPLE_STRIDE-th element of this rank's parameters (its shards) as the engines
        hold them, in the compute dtype: a whole copy would cost half the model's memory again
        on a GPU, every step."""
        return [_local(p).detach().reshape(-1)[::SAMPLE_STRIDE].to(self.compute_dtype, copy=True)
                for p in self.model.parameters()]

    def _changed_count(self, before: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """How many of the sampled parameters an update changed as the engines see them (on the
        device, unread): a learning rate too small for their dtype shows as none, while the loss
        looks normal."""
        after = self._engine_sample()
        changed = torch.stack([(a != b).sum() for a, b in zip(after, before)]).sum()
        return {"changed": changed.to(torch.float64),
                "parameters": torch.tensor(float(sum(b.numel() for b in before)), dtype=torch.float64,
                                           device=changed.device)}

    @on_every_rank
    @torch.no_grad()
    def score(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """The learner's log-prob of every token of each sequence from its `start` on, each
        given the tokens before it, at temperature 1 (as `RolloutWorker.score`)."""
        seqs = [(ids[:start], ids[start:], []) for ids, start in zip(sequences, starts)]
        mb = collate(seqs, torch.zeros(len(seqs)), self.pad_id).to(self.device)
        logp, _ = self._logprobs(self.model, mb, temperature=1.0)
        sharding.reshard(self.model)
        return [row[: len(ids) - start].tolist() for row, ids, start in zip(logp, sequences, starts)]

    def _logprobs(self, model, mb: MicroBatch, entropy: bool = False,
                  temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs of the completion tokens ([B, C]) under `model` at `temperature` (default:
        the sampling temperature), and with `entropy` each position's entropy (no gradient)."""
        length, completion_len = mb.input_ids.shape[1], mb.completion_ids.shape[1]
        # Position t predicts token t + 1: keep exactly the positions before each completion
        # token (slicing the logits afterwards costs a vocabulary-sized copy in backward).
        keep = torch.arange(length - completion_len - 1, length - 1, device=mb.input_ids.device)
        with torch.autocast(self.device, dtype=self.compute_dtype,
                            enabled=self.compute_dtype != torch.float32):
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                           position_ids=mb.position_ids, logits_to_keep=keep).logits.float()
        temperature = self.cfg.rollout.temperature if temperature is None else temperature
        if temperature != 1.0:
            logits = logits / temperature
        # cross_entropy's fused backward is about twice as fast on a CPU as log_softmax + gather
        # (TRL's selective_log_softmax) over a 50k vocabulary.
        logp = -F.cross_entropy(logits.flatten(0, 1), mb.completion_ids.flatten(),
                                reduction="none").view_as(mb.completion_ids)
        if not entropy:
            return logp, None
        with torch.no_grad():
            return logp, entropy_from_logits(logits)

    @torch.no_grad()
    def _ref_logprobs(self, mb: MicroBatch) -> torch.Tensor | None:
        if self.ref_model is None:
            return None
        logp = self._logprobs(self.ref_model, mb)[0]
        sharding.reshard(self.ref_model)
        return logp

    # --- sending weights -----------------------------------------------------------------------

    def _named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights as the engines take them, one at a time: whole (a sharded one gathered
        from every rank, so every rank must go through them all), in the dtype they are sent in."""
        for name, t in self.model.state_dict().items():
            yield name, sharding.full(t).to(self._sent_dtype(t))

    def _sent_dtype(self, t: torch.Tensor) -> torch.dtype:
        """Floating-point weights go in the compute dtype (half the bytes of float32 in bfloat16)."""
        return self.compute_dtype if t.is_floating_point() else t.dtype

    def weight_specs(self) -> list[TensorSpec]:
        return specs_of((name, torch.empty(t.shape, dtype=self._sent_dtype(t), device="meta"))
                        for name, t in self.model.state_dict().items())

    def open_shared_weights(self, path: str) -> None:
        """Send weights through a file in shared memory at `path` (engines on this node)."""
        self.close_weight_sync()  # first: closing a channel at the same path removes its file
        for orphan in remove_unheld(SHARED_WEIGHTS.format("*")):
            log.info("removed %s, left by a learner that is gone", orphan)
        self._channel = SharedMemoryChannel(path, self.weight_specs(), owner=True)

    def open_weight_group(self, host: str, port: int = 0) -> int:
        """Bind the broadcast group's rendezvous port (0: any free one) on `host`, this node's
        address, and return it; `connect_weight_group` then forms the group."""
        self.close_weight_sync()
        self._socket = listen_socket(host, port)
        return self._socket.getsockname()[1]

    def connect_weight_group(self, world_size: int, buckets: list[list[int]], timeout_s: float,
                             secret: str) -> None:
        """Rank 0 of the weight group; returns once every engine has joined."""
        host, port = self._socket.getsockname()[:2]
        sock, self._socket = self._socket, None  # the group's store owns it now
        self._channel = BroadcastChannel(host, port, 0, world_size, self.weight_specs(), buckets,
                                         device=self.device, timeout_s=timeout_s, secret=secret,
                                         sock=sock)

    @on_every_rank
    def send_weights(self) -> float:
        """Send the current weights as policy `self.version`; returns the seconds it took. The
        other ranks only help gather the shards."""
        start = time.perf_counter()
        if self.rank != 0:
            for _ in self._named_weights():
                pass
            return time.perf_counter() - start
        weights = self._named_weights()
        try:
            with torch.no_grad(), self.spans.span("send weights"):
                self._channel.send(weights, self.version)
        except BaseException:
            # A member is gone: leave the group at once, so the engines still in the broadcast
            # fail now rather than at cluster.weight_sync_timeout_s; the driver forms it again.
            self.close_weight_sync()
            if self.sharded:  # the other ranks gather every tensor with this one: finish with them
                with torch.no_grad():
                    for _ in weights:
                        pass
            raise
        return time.perf_counter() - start

    def close_weight_sync(self) -> None:
        """Leave the weight transport (removing the shared-memory file, if any, and aborting a
        broadcast group's communicator)."""
        if self._channel is not None:
            self._channel.close()
        if self._socket is not None:
            self._socket.close()
        self._channel = self._socket = None

    # --- checkpoints and export ----------------------------------------------------------------

    @on_every_rank
    def save_checkpoint(self, run_dir: str, state: RunState) -> str:
        """Model, optimizer, scheduler and RNG, plus the driver's state, as one atomic checkpoint:
        the model in safetensors (one rank) or with torch.distributed.checkpoint (its shards)."""
        final = checkpoint.path_for(run_dir, self.version)
        with self.spans.span("checkpoint"):
            if self.sharded:
                self._save_sharded(final, state)
            else:
                with checkpoint.atomic_dir(final) as tmp:
                    self.model.save_pretrained(tmp / "model")
                    self._save_rest(tmp, state, [self._rng()])
        if self.rank == 0:
            checkpoint.prune(run_dir, self.cfg.learner.keep_checkpoints)
        return str(final)

    def _save_sharded(self, final: Path, state: RunState) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        tmp = checkpoint.staging(final) if self.rank == 0 else checkpoint.staging_path(final)
        dist.barrier()  # rank 0 has made the directory
        model, optimizer = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model, "optimizer": optimizer}, checkpoint_id=str(tmp / "sharded"))
        rngs = [None] * self.cfg.learner.num_ranks
        dist.all_gather_object(rngs, self._rng())
        if self.rank == 0:
            self._save_rest(tmp, state, rngs)
            checkpoint.commit(tmp, final)
        dist.barrier()  # nobody goes on before the checkpoint is whole

    def _rng(self) -> dict:
        return {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device == "cuda" else []}

    def _save_rest(self, directory: Path, state: RunState, rngs: list[dict]) -> None:
        """What every layout has: scheduler, loss scaler, version, each rank's RNG, and the
        driver's state (and, with one rank, the optimizer)."""
        torch.save({"optimizer": None if self.sharded else self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                    "version": self.version, "rngs": rngs}, directory / "learner.pt")
        checkpoint.write_state(directory / "driver.json", state)

    @on_every_rank
    def load_checkpoint(self, run_dir: str) -> RunState:
        """Restore the newest checkpoint in `run_dir` (saved by as many ranks as this learner
        has); returns the driver's state saved with it."""
        from safetensors import SafetensorError

        directory = checkpoint.latest(run_dir)
        try:
            if self.sharded:
                self._load_sharded(directory)
            else:
                # Through from_pretrained: saved files use the checkpoint names (embed_out), the
                # module uses its own (lm_head), and transformers maps one to the other.
                saved = AutoModelForCausalLM.from_pretrained(directory / "model", dtype=torch.float32)
                self.model.load_state_dict(saved.state_dict())
            state = torch.load(directory / "learner.pt", weights_only=True)  # never unpickle code
            if not self.sharded:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            rng = state["rngs"][self.rank]
        except (OSError, RuntimeError, KeyError, ValueError, IndexError, TypeError, SafetensorError,
                pickle.UnpicklingError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {directory} is damaged, or of another "
                                             f"learner.num_ranks: {one_line(str(e), 300)}") from None
        self.version = state["version"]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        return checkpoint.read_state(directory / "driver.json")

    def _load_sharded(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer)
        loaded = {"model": model, "optimizer": optimizer}
        dcp.load(loaded, checkpoint_id=str(directory / "sharded"))
        set_state_dict(self.model, self.optimizer, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optimizer"])

    @on_every_rank
    def export(self, directory: str, summary: RunSummary) -> str:
        """The final model as a Hugging Face directory (weights, tokenizer with its chat
        template, generation config) with a model card; loads with `transformers.pipeline`."""
        directory = Path(directory)
        with checkpoint.full_disk_said(directory):
            return self._export(directory, summary)

    def _export(self, directory: Path, summary: RunSummary) -> str:
        from learner import model_card

        if self.sharded:  # gathered on rank 0, one tensor at a time, into its host memory
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            whole = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
            if self.rank != 0:
                return ""
            self.model.save_pretrained(directory, state_dict=whole)
        else:
            self.model.save_pretrained(directory)
        models.load_tokenizer(self.model_path).save_pretrained(directory)
        card = model_card.render(self.cfg, directory, summary)
        (directory / "README.md").write_text(card)
        return str(directory)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (its FSDP shard), detached."""
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach()
