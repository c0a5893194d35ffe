"""Rounds in phases: every sampled client trains in each phase, and a phase's uploads are aggregated before the next."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flora.data import FederatedDataModule
from flora.federated import FederatedTrainer
from flora.federated.metrics import state_bytes
from flora.methods import PromptFL, StateDict, Upload


class SendThenTrain(PromptFL):
    """PromptFL whose clients first send a message to the round's other clients, then train with it."""

    round_phases = ("send", "train")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.messages: dict[int, torch.Tensor] = {}  # this round's messages, by sender
        self.log: list[tuple[str, tuple[int, ...]]] = []  # per turn: the phase, the senders received

    def upload_state(self) -> StateDict:
        if self.phase == "send":  # a message of its own shape: not the global tensors
            return {"message": self.prompt.ctx.detach().sum(0).cpu()}
        return super().upload_state()

    def aggregate(self, uploads: list[Upload], current: StateDict) -> StateDict:
        if self.phase == "send":
            self.messages = {u.client_id: u.state["message"] for u in uploads}
            return current
        return super().aggregate(uploads, current)

    def download_state(self, client_id: int, global_state: StateDict) -> StateDict:
        if self.phase != "train":
            return global_state
        others = {f"from.{c}": m for c, m in self.messages.items() if c != client_id}
        return {**global_state, **others}

    def evaluation_state(self, client_id: int, global_state: StateDict) -> StateDict:
        return global_state

    def load_global_state(self, state: StateDict) -> None:
        self.received = tuple(sorted(int(k.split(".")[1]) for k in state if k.startswith("from.")))
        super().load_global_state({k: v for k, v in state.items() if not k.startswith("from.")})

    def before_local_training(self, batches: object) -> None:  # once per training turn
        self.log.append((self.phase, self.received))


def test_a_phase_is_aggregated_before_the_next_and_each_client_hears_the_others(
    tmp_path: Path, tiny_root: Path
) -> None:
    module = SendThenTrain(n_ctx=4, lr=0.05)
    trainer = FederatedTrainer(
        rounds=2, clients_per_round=3, output_dir=str(tmp_path), name="p", progress=False, seed=0
    )
    trainer.fit(module, FederatedDataModule(root=str(tiny_root), batch_size=8))
    records = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    turns = iter(module.log)
    for record in records:
        sampled = record["clients"]
        assert len(sampled) == 3
        # phase by phase: every sampled client sends, then every one trains with the others' messages
        assert [next(turns) for _ in sampled] == [("send", ())] * 3
        for cid in sampled:
            assert next(turns) == ("train", tuple(c for c in sorted(sampled) if c != cid))
        # both phases' uploads are counted: three messages and three prompts
        message = state_bytes({"m": torch.zeros(module.prompt.ctx.shape[1])})
        assert record["bytes_up"] == 3 * message + 3 * state_bytes(module.global_state())
    assert next(turns, None) is None
    assert set(trainer.global_state) == {"prompt.ctx"}


def test_a_later_phase_draws_its_own_data_order(tmp_path: Path, tiny_root: Path) -> None:
    """The second phase of a round does not replay the first phase's batches."""

    class FirstLabels(SendThenTrain):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.first: dict[str, torch.Tensor] = {}

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            if batch_idx == 0 and self.phase not in self.first:
                self.first[self.phase] = torch.cat([batch[1].cpu(), batch[0].flatten()[:4].cpu()])
            return super().training_step(batch, batch_idx)

    module = FirstLabels(n_ctx=4, lr=0.05)
    trainer = FederatedTrainer(
        rounds=1, clients_per_round=1, output_dir=str(tmp_path), name="q", progress=False, seed=0
    )
    trainer.fit(module, FederatedDataModule(root=str(tiny_root), batch_size=8))
    assert set(module.first) == {"send", "train"}
    assert not torch.equal(module.first["send"], module.first["train"])
