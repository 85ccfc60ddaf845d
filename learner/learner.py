"""The learner: the trainable policy, its optimizer and the GRPO update. A plain class;
`deploy/launch.py` makes it a Ray actor. Its checkpoints are learner/checkpoint.py's and the
sending of its weights learner/weight_sender.py's; on a sharded learner, the calls that touch the
model run on every rank (learner/sharding.py)."""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

# transformers' model classes and TRL are imported where they are used: the driver imports this
# module to make the Learner an actor, and they would keep it 1.9 s longer from placing actors.

from common import logs, lora, models
from common.config import Config, cpu_threads
from common.spans import Span, Spans
from common.types import RolloutGroup, RunState, RunSummary
from common.weight_sync import TensorSpec, listen_socket
from learner import checkpoint, sharding
from learner.batch import (
    MicroBatch,
    batch_stats,
    collate,
    flat_sequences,
    micro_batches,
    padded_share,
    trained_tokens,
)
from learner.grpo import Normalisers, grpo_loss
from learner.sharding import on_every_rank
from learner.token_logprobs import token_logprobs
from learner.update_metrics import UpdateMetrics
from learner.weight_sender import WeightSender

SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@contextlib.contextmanager
def hidden_states_out(causal_lm: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`causal_lm` returns its last hidden states where it returns logits; yields its output
    layer, set aside, not removed, so its weight stays where the optimizer and FSDP (which
    gathers it in the root's forward) know it."""
    head = causal_lm.get_output_embeddings()
    causal_lm.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        causal_lm.set_output_embeddings(head)


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
            # A sharp policy's gradients hold values near float32's smallest (a probability of
            # 1e-30 times an advantage), and AdamW squares them into subnormals, which x86 CPUs
            # compute in microcode, ~100x slower. Flushed to 0 instead (the MXCSR's FTZ and DAZ
            # bits: torch.set_flush_denormal), a 70m-shape step on a policy of entropy 0.65
            # spent 0.06 s instead of 0.28 s in AdamW, the gradient's norm and its clipping.
            torch.set_flush_denormal(True)
        torch.manual_seed(cfg.seed + rank)
        # Mixed precision: the weights and AdamW's state stay float32 (an update of 1e-6 would
        # round away in bfloat16 for most weights); forward and backward run in the compute
        # dtype, which is also the engines' dtype and what they are sent.
        self.compute_dtype = models.torch_dtype(cfg.model.dtype, cfg.cluster.device)
        self.spans = Spans("learner")
        self.spans.since_process_start("start process")  # Ray's worker process and our imports
        self.lora = lora.enabled(cfg.learner)
        with self.spans.span("load model"):
            from transformers import AutoModelForCausalLM

            self.model = self._policy(AutoModelForCausalLM.from_pretrained(
                model_path, dtype=torch.float32).to(self.device))
            self.model.train()
            self.ref_model = None
            # The reference costs a model's memory: loaded only when used, and with LoRA never
            # (it is the policy with its adapter off).
            if cfg.grpo.beta > 0 and not self.lora:
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
        self.sender = WeightSender(self.model, self.compute_dtype, self.device, rank, self.sharded,
                                   self.spans, adapter_only=self.lora)

    def _make_optimizer(self) -> None:
        # fused AdamW takes plain tensors; over FSDP's shards (DTensors) the foreach one.
        fused = dict(foreach=True) if self.sharded else dict(fused=True)
        self.optimizer = torch.optim.AdamW(self.trainable(), lr=self.cfg.learner.learning_rate,
                                           weight_decay=self.cfg.learner.weight_decay, **fused)
        from transformers import get_scheduler

        grpo, learner = self.cfg.grpo, self.cfg.learner
        self.scheduler = get_scheduler(SCHEDULES[learner.lr_schedule], self.optimizer,
                                       num_warmup_steps=learner.warmup_steps * grpo.num_iterations,
                                       num_training_steps=self.cfg.steps * grpo.num_iterations)

    def _policy(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` as the policy trains it: whole, or frozen under a LoRA adapter (peft)."""
        if not self.lora:
            return model
        from peft import LoraConfig, get_peft_model

        # A is drawn at random (B starts at 0): the same draw on every rank, since each keeps
        # its own part of it as its shard.
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.seed)
            return get_peft_model(model, LoraConfig(**lora.peft_config(self.cfg.learner),
                                                    task_type="CAUSAL_LM"))

    def trainable(self) -> list[torch.nn.Parameter]:
        """The parameters that train: every one, or with LoRA the adapter's."""
        return [p for p in self.model.parameters() if p.requires_grad]

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

    def train(self, groups: list[RolloutGroup]) -> dict:
        """One GRPO step on a batch of groups: `num_iterations` optimizer steps over it."""
        with on_every_rank([peer.train.remote(groups) for peer in self.peers]):
            self.spans.step = self.version + 1
            with self.spans.span("train"):
                return self._train(groups)

    def _train(self, groups: list[RolloutGroup]) -> dict:
        start = time.perf_counter()
        grpo = self.cfg.grpo
        # Groups reach the buffer as they finish, in an order that varies from run to run, and
        # float sums depend on order: in a fixed one, a rerun or a resumed run makes the same
        # update bit for bit.
        groups = sorted(groups, key=lambda g: (g.policy_version, g.worker, g.prompt.index))
        batches, shares, totals, pad_frac = self._micro_batches(groups)
        ref_logps = [self._ref_logprobs(mb) for mb in batches]
        old_logps: list[torch.Tensor | None] = [None] * len(batches)
        measured = UpdateMetrics(self.device, grpo.num_iterations)
        before = self.sender.sample()

        # ALGO LOGIC: num_iterations optimizer steps over the batch
        for iteration in range(grpo.num_iterations):
            first_pass = iteration == 0
            self.optimizer.zero_grad(set_to_none=True)
            for i, mb in enumerate(batches):
                # Entropy is only logged, and its pass over the vocabulary costs as much as the
                # log-probs': measured once, on the first pass.
                logp, entropy = self.logprobs(mb, entropy=first_pass)
                out = grpo_loss(logp, old_logps[i], mb.behaviour_logp, ref_logps[i],
                                mb.advantages, mb.completion_mask, grpo, totals)
                self.scaler.scale(out.loss).backward()
                measured.add(out, shares[i])
                if first_pass:
                    # The first pass runs on the weights that scored the batch: they are the
                    # "old" policy of every later pass, so no extra forward is needed.
                    old_logps[i] = logp.detach()
                    measured.add_first_pass(old_logps[i], entropy, mb, shares[i])
            max_norm = self.cfg.learner.max_grad_norm or float("inf")
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.trainable(), max_norm)
            measured.grad_norms.append(sharding.full(norm))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        self.version += 1

        update = measured.read(self.sender.changed_since(before), self.sharded)
        seconds = time.perf_counter() - start
        return {"step": self.version, **update, "lr": self.scheduler.get_last_lr()[0],
                "train_tokens": totals.num_tokens, "train_s": seconds, "pad_frac": pad_frac,
                "train_tokens_per_s": totals.num_tokens * grpo.num_iterations / seconds,
                **batch_stats(groups, trained_version=self.version - 1)}

    def _micro_batches(self, groups: list[RolloutGroup]
                       ) -> tuple[list[MicroBatch], list[float], Normalisers, float]:
        """This rank's micro-batches on the device, each one's share of the batch's tokens, the
        loss's normalisers, which are the whole batch's (each rank trains on its share of the
        sequences), and the share of their positions that is padding."""
        grpo, ranks = self.cfg.grpo, self.cfg.learner.num_ranks
        lengths = [len(p) + len(c) for p, c, *_ in flat_sequences(groups)]
        rows = sharding.deal(lengths, ranks)[self.rank] if self.sharded else None
        # Sequences of like lengths together pad less; bnpo alone depends on which sequences
        # share a micro-batch (its normaliser is the micro-batch's tokens), so it keeps TRL's.
        on_host = micro_batches(groups, self.cfg.learner.micro_batch_size, grpo.scale_rewards,
                                self.pad_id, mask_truncated=grpo.mask_truncated_completions,
                                rows=rows, by_length=grpo.loss_type != "bnpo")
        # dr_grpo's constant: a completion's limit, an episode's when an environment answers.
        longest = self.cfg.env.max_episode_tokens if self.cfg.env.name else self.cfg.rollout.max_tokens
        totals = Normalisers(num_sequences=len(lengths),
                             num_tokens=trained_tokens(groups, grpo.mask_truncated_completions),
                             max_completion_length=longest, num_micro_batches=len(on_host) * ranks)
        # Counted on the host, before the micro-batches move to the device.
        tokens = torch.stack([mb.completion_mask.sum() for mb in on_host])
        shares = (tokens / max(totals.num_tokens, 1)).tolist()
        return [mb.to(self.device) for mb in on_host], shares, totals, padded_share(on_host)

    def probe_logprobs(self, sequences: list[list[int]], starts: list[int],
                       dtype: str | None = None) -> list[list[float]]:
        """The learner's log-prob of every token of each sequence from its `start` on, each
        given the tokens before it, at temperature 1 (as `RolloutWorker.probe_logprobs`). With
        `dtype`, from its weights cast to `dtype` and computed in it throughout, without autocast:
        what an engine holding exactly these weights in `dtype` computes. Without, as it trains
        (autocast). A sharded learner's ranks compute in the compute dtype either way."""
        peers = [peer.probe_logprobs.remote(sequences, starts) for peer in self.peers]
        with on_every_rank(peers), torch.no_grad(), evaluating(self.model):
            seqs = [(ids[:start], ids[start:], []) for ids, start in zip(sequences, starts)]
            mb = collate(seqs, torch.zeros(len(seqs)), self.pad_id).to(self.device)
            if dtype is None or self.sharded:
                logp, _ = self.logprobs(mb, temperature=1.0)
            else:
                # An engine's residual stream, norms and logits are all in its dtype; autocast
                # keeps them in float32, which on a sharpened policy moves a bfloat16 log-prob
                # by whole units. A cast copy (half the float32 weights' memory, for the call).
                cast = {name: p.to(getattr(torch, dtype)) for name, p in self.model.named_parameters()}

                def engine(**inputs):
                    return torch.func.functional_call(self.model, cast, kwargs=inputs)

                logp, _ = self.logprobs(mb, engine, temperature=1.0, autocast=False)
            sharding.reshard(self.model)
            return [row[: len(ids) - start].tolist()
                    for row, ids, start in zip(logp, sequences, starts)]

    def logprobs(self, mb: MicroBatch, model: torch.nn.Module | None = None, entropy: bool = False,
                 temperature: float | None = None, autocast: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs of the completion tokens ([B, C]) under `model` (default: the policy) at
        `temperature` (default: the sampling temperature), and with `entropy` each position's
        entropy (no gradient). On a sharded learner, a forward with no backward after it leaves
        the model gathered: `sharding.reshard` it."""
        model = self.model if model is None else model
        length, completion_len = mb.input_ids.shape[1], mb.completion_ids.shape[1]
        # Position t predicts token t + 1: keep exactly the positions before each completion
        # token (slicing the logits afterwards costs a vocabulary-sized copy in backward).
        keep = torch.arange(length - completion_len - 1, length - 1, device=mb.input_ids.device)
        temperature = self.cfg.rollout.temperature if temperature is None else temperature
        inputs = dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                      position_ids=mb.position_ids)
        mixed = autocast and self.compute_dtype != torch.float32
        causal_lm = self._fused_head_of(model)
        with torch.autocast(self.device, dtype=self.compute_dtype, enabled=mixed):
            if causal_lm is not None:
                with hidden_states_out(causal_lm) as head:
                    hidden = model(**inputs, logits_to_keep=keep).logits     # [B, C, H]
                # Read after the forward: sharded, it holds the gathered weight only then.
                dtype = self.compute_dtype if mixed else head.weight.dtype
                logp, ent = token_logprobs(hidden.flatten(0, 1).to(dtype), head.weight.to(dtype),
                                           mb.completion_ids.flatten(), temperature, entropy)
                shape = mb.completion_ids.shape
                return logp.view(shape), None if ent is None else ent.view(shape)
            logits = model(**inputs, logits_to_keep=keep).logits.float()
        if temperature != 1.0:
            logits = logits / temperature
        # cross_entropy's fused backward is about twice as fast on a CPU as log_softmax + gather
        # (TRL's selective_log_softmax) over a 50k vocabulary.
        logp = -F.cross_entropy(logits.flatten(0, 1), mb.completion_ids.flatten(),
                                reduction="none").view_as(mb.completion_ids)
        if not entropy:
            return logp, None
        from trl.trainer.utils import entropy_from_logits

        with torch.no_grad():
            return logp, entropy_from_logits(logits)

    def _fused_head_of(self, model) -> torch.nn.Module | None:
        """The causal LM inside `model` whose output layer `token_logprobs` can stand in for;
        None where the logits are computed whole instead: on a GPU, where the float32 pass runs
        at HBM speed and a chunk loop's kernel launches are what would cost (not measured
        there: the GPU path stays as checked); for a function rather than a model; and for an
        output layer that is not a plain bias-free linear (a LoRA-wrapped one, say)."""
        if self.device != "cpu" or not isinstance(model, torch.nn.Module):
            return None
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = causal_lm.get_output_embeddings()
        return causal_lm if type(head) is torch.nn.Linear and head.bias is None else None

    @torch.no_grad()
    def _ref_logprobs(self, mb: MicroBatch) -> torch.Tensor | None:
        if self.cfg.grpo.beta == 0:
            return None
        reference = self.model if self.lora else self.ref_model
        with self.model.disable_adapter() if self.lora else contextlib.nullcontext():
            logp = self.logprobs(mb, reference)[0]
        sharding.reshard(reference)
        return logp

    # --- sending weights (learner/weight_sender.py) ---------------------------------------------

    def weight_specs(self) -> list[TensorSpec]:
        return self.sender.specs()

    def open_shared_weights(self, path: str) -> None:
        """Send weights through a file in shared memory at `path` (engines on this node)."""
        self.sender.open_shared(path)

    def open_weight_group(self, host: str, port: int = 0) -> int:
        """Bind the broadcast group's rendezvous port (0: any free one) on `host`, this node's
        address, and return it; `connect_weight_group` then forms the group."""
        return self.sender.open_group(host, port)

    def connect_weight_group(self, world_size: int, buckets: list[list[int]], timeout_s: float,
                             secret: str) -> None:
        """Rank 0 of the weight group; returns once every engine has joined."""
        self.sender.connect_group(world_size, buckets, timeout_s, secret)

    def send_weights(self) -> float:
        """Send the current weights as policy `self.version`; returns the seconds it took. The
        other ranks only help gather the shards."""
        with on_every_rank([peer.send_weights.remote() for peer in self.peers]):
            return self.sender.send(self.version)

    def close_weight_sync(self) -> None:
        """Leave the weight transport (removing the shared-memory file, if any, and aborting a
        broadcast group's communicator)."""
        self.sender.close()

    # --- checkpoints (learner/checkpoint.py) and export -----------------------------------------

    def save_checkpoint(self, run_dir: str, state: RunState) -> str:
        """Model, optimizer, scheduler and RNG, and the driver's state, as one atomic checkpoint."""
        with on_every_rank([peer.save_checkpoint.remote(run_dir, state) for peer in self.peers]):
            with self.spans.span("checkpoint"):
                final = checkpoint.save_learner(self, run_dir, state)
            if self.rank == 0:
                checkpoint.prune(run_dir, self.cfg.learner.keep_checkpoints)
            return str(final)

    def load_checkpoint(self, run_dir: str) -> RunState:
        """Restore the newest checkpoint in `run_dir` (saved by as many ranks as this learner
        has); returns the driver's state saved with it."""
        with on_every_rank([peer.load_checkpoint.remote(run_dir) for peer in self.peers]):
            return checkpoint.load_learner(self, run_dir)

    def export(self, directory: str, summary: RunSummary) -> str:
        """The final model as a Hugging Face directory (weights, tokenizer with its chat
        template, generation config) with a model card; loads with `transformers.pipeline`."""
        with on_every_rank([peer.export.remote(directory, summary) for peer in self.peers]):
            with checkpoint.full_disk_said(Path(directory)):
                return self._export(Path(directory), summary)

    def _export(self, directory: Path, summary: RunSummary) -> str:
        from learner import model_card

        if self.sharded:  # gathered on rank 0, one tensor at a time, into its host memory
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            whole = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
            if self.rank != 0:
                return ""
            if self.lora:  # the gathered adapter and model, as one peft model on the host
                from transformers import AutoModelForCausalLM

                host = self._policy(AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32))
                host.load_state_dict(whole)
                _save_lora(host, directory)
            else:
                self.model.save_pretrained(directory, state_dict=whole)
        elif self.lora:
            _save_lora(copy.deepcopy(self.model), directory)  # a copy: the learner's goes on training
        else:
            self.model.save_pretrained(directory)
        models.load_tokenizer(self.model_path).save_pretrained(directory)
        card = model_card.render(self.cfg, directory, summary)
        (directory / "README.md").write_text(card)
        return str(directory)


def _save_lora(model: torch.nn.Module, directory: Path) -> None:
    """A peft model as the adapter alone, in peft's format, and the model with it merged
    (W + BA x lora_alpha / r), which loads as any Hugging Face model; `model` is merged away."""
    model.save_pretrained(directory / lora.ADAPTER_DIR)
    model.merge_and_unload().save_pretrained(directory)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode for the block (no dropout: an engine has none), then back in train."""
    model.eval()
    try:
        yield
    finally:
        model.train()
