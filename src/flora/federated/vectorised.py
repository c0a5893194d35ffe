"""Several clients trained together: their learned tensors stacked along a client axis.

A round's clients on one rank share the frozen backbone and differ only in their learned
tensors, so ``trainer.client_batch: N`` trains up to N of them at once: each trainable
tensor becomes one ``(N, ...)`` tensor, the method computes every client's loss in one
pass (:meth:`~flora.methods.FederatedPromptModule.stacked_losses`: for a CoOp context, one
text-tower call over all clients' prompts), and one optimiser steps all of them. Every
client keeps what it has when trained alone:

* its own data order (its own loader, seeded as in the sequential path), its own number of
  steps and its own loss: a client whose batches have run out (a smaller client, or one at
  ``max_steps_per_round``) takes no step; its slices of the tensors and of the optimiser
  state are restored after the shared step, so weight decay and momentum leave it alone;
* its own optimiser state: the SGD momentum of each client is a slice of the stacked one,
  stored back per client in exactly the form the sequential path stores.

The result equals sequential training up to floating-point reordering (tested to 1e-5 in
fp32). A method opts in by setting ``vectorised = True`` in its own class body (a subclass
that changes the loss must not inherit it) and implementing ``stacked_losses``; the
trainer falls back to one client at a time, with the reason, where that does not hold
(:func:`why_sequential`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from flora.federated.sampling import derive_seed
from flora.federated.store import ClientState, to_cpu_copy

if TYPE_CHECKING:
    from flora.federated.client import ClientResult, ClientRunner
    from flora.methods.base import StateDict


def why_sequential(runner: ClientRunner) -> str | None:
    """Why ``runner``'s clients cannot be trained together (None when they can)."""
    module = runner.module
    if not vars(type(module)).get("vectorised", False):
        return f"{type(module).__name__} does not declare vectorised training"
    from flora.methods.base import FederatedPromptModule

    if type(module).before_local_training is not FederatedPromptModule.before_local_training:
        return f"{type(module).__name__} prepares each client before its training (before_local_training)"
    if not runner.use_features:
        return "the feature cache is off (clients are trained together on cached image features only)"
    if runner.profile:
        return "trainer.profile times one client at a time"
    optimizer = module.configure_optimizers()
    if type(optimizer) is not torch.optim.SGD:
        return f"its optimiser is {type(optimizer).__name__}, not SGD (per-client step counts)"
    if any(g.get("dampening", 0) != 0 for g in optimizer.param_groups):
        return "SGD with dampening (a fresh momentum buffer is not a zero one)"
    return None


def _epochs(loader: Any, epochs: int, max_steps: int | None) -> Iterator[Any]:
    steps = 0
    for _ in range(epochs):
        for batch in loader:
            yield batch
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return


def train_together(
    runner: ClientRunner, client_ids: Sequence[int], round_idx: int, global_state: StateDict
) -> list[ClientResult]:
    """The turns of ``client_ids`` in round ``round_idx``, trained together; one result per client, in order."""
    from flora.federated.client import ClientResult

    fabric, module = runner.fabric, runner.module
    named = dict(module.named_parameters())
    trainable = {id(p) for p in module.trainable_parameters()}
    names = [n for n, p in named.items() if id(p) in trainable]
    phase = module.round_phases.index(module.phase)
    starts, previous, constants = [], [], []
    for cid in client_ids:
        previous.append(runner.load(cid, global_state))
        starts.append({n: named[n].detach().clone() for n in names})
        constants.append({n: t.detach().clone() for n, t in module.client_constants().items()})
    stacked = {n: nn.Parameter(torch.stack([s[n] for s in starts])) for n in names}
    # what differs between clients without being trained, e.g. each client's received prompt
    fixed = {n: torch.stack([c[n] for c in constants]) for n in constants[0]}

    # one optimiser over the stacked tensors with the method's own groups and hyperparameters
    single = module.configure_optimizers()
    by_id = {id(named[n]): n for n in names}
    groups = [
        {
            **{k: v for k, v in g.items() if k != "params"},
            "params": [stacked[by_id[id(p)]] for p in g["params"]],
        }
        for g in single.param_groups
    ]
    order = [by_id[id(p)] for g in single.param_groups for p in g["params"]]  # optimiser state index -> name
    raw = torch.optim.SGD(groups)
    if single.param_groups[0].get("momentum", 0) > 0:
        for i, name in enumerate(order):
            buffers = []
            for prev in previous:
                saved = None
                if runner.optimizer_state == "persist" and prev is not None and prev.optim is not None:
                    saved = prev.optim["state"].get(i, {}).get("momentum_buffer")
                buffers.append(
                    torch.zeros_like(starts[0][name]) if saved is None else saved.to(stacked[name])
                )
            raw.state[stacked[name]]["momentum_buffer"] = torch.stack(buffers)
    optimizer = fabric.setup_optimizers(raw)

    loaders, streams = [], []
    for cid in client_ids:
        seed = derive_seed(runner.seed, 3, round_idx, cid, *([phase] if phase else []))
        loader = runner.loader(cid, "train", train=True, seed=seed)
        loaders.append(loader)
        streams.append(_epochs(loader, runner.local_epochs, runner.max_steps))
    n = len(client_ids)
    # losses stay on the device until the end: one host sync per step (the finiteness check), not 2 per client
    loss_sums = torch.zeros(n, device=fabric.device)
    steps = [0] * n
    seen = [0] * n
    module.train()
    while True:
        active, batches = [], []
        for k, stream in enumerate(streams):
            batch = next(stream, None)
            if batch is not None:
                active.append(k)
                batches.append((batch[0], batch[1]))
        if not active:
            break
        idle = [k for k in range(n) if k not in active]
        with torch.enable_grad(), fabric.autocast():
            inputs = {name: t[active] for name, t in (stacked | fixed).items()}
            per_client = module.stacked_losses(inputs, batches)
        finite = torch.isfinite(per_client.detach())
        if not bool(finite.all()):
            j = int((~finite).nonzero()[0])
            raise FloatingPointError(
                f"round {round_idx + 1}, client {client_ids[active[j]]}: {type(module).__name__}: non-finite "
                f"training loss ({float(per_client[j].detach())}); lower the learning rate or use 32-true precision"
            )
        kept = _slices(stacked, raw, idle)
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(per_client.sum())
        optimizer.step()
        _restore(idle, kept)
        loss_sums[torch.tensor(active, device=loss_sums.device)] += per_client.detach().float()
        for j, k in enumerate(active):
            steps[k] += 1
            seen[k] += int(batches[j][1].shape[0])
    module.eval()

    mean_losses = (loss_sums.cpu() / torch.tensor([max(1, s) for s in steps])).tolist()
    results = []
    with torch.no_grad():
        for k, cid in enumerate(client_ids):
            for name in names:
                named[name].copy_(stacked[name][k])
            optim = None
            if runner.optimizer_state == "persist":
                own = module.configure_optimizers()
                for p in (p for g in own.param_groups for p in g["params"]):
                    buffer = raw.state.get(stacked[by_id[id(p)]], {}).get("momentum_buffer")
                    if buffer is not None:
                        own.state[p]["momentum_buffer"] = buffer[k].clone()
                optim = to_cpu_copy(own.state_dict())
            results.append(
                ClientResult(
                    client_id=cid,
                    num_samples=len(loaders[k].dataset),
                    upload=module.upload_state(),
                    state=ClientState(local=module.local_state(), optim=optim),
                    loss=mean_losses[k],
                    samples_seen=seen[k],
                )
            )
    return results


def _slices(stacked: dict[str, Tensor], optimizer: Any, idle: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Copies of the idle clients' slices of every stacked tensor and momentum buffer."""
    if not idle:
        return []
    out = []
    for t in stacked.values():
        out.append((t, t.detach()[idle].clone()))
        buffer = optimizer.state.get(t, {}).get("momentum_buffer")
        if buffer is not None:
            out.append((buffer, buffer[idle].clone()))
    return out


@torch.no_grad()
def _restore(idle: list[int], kept: list[tuple[Tensor, Tensor]]) -> None:
    """Put the idle clients' slices back: the shared step leaves them as they were."""
    for target, values in kept:
        target.data[idle] = values
