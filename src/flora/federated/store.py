"""Where clients' private state lives between their turns: memory or disk, never the accelerator."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from flora.fileio import atomic_write


def to_cpu_copy(obj: Any) -> Any:
    """Recursively copy every tensor in ``obj`` to CPU memory (never a view of the input)."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class ClientState:
    """A client's private state: its local tensors and its optimiser state."""

    local: dict[str, Tensor] = field(default_factory=dict)
    optim: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"local": self.local, "optim": self.optim}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClientState:
        # other keys (a checkpoint of an earlier version also counted the rounds trained) are ignored
        return cls(local=d.get("local", {}), optim=d.get("optim"))


class ClientStore:
    """Interface of a client-state store. ``put`` and ``get`` always copy."""

    #: the ranks on one machine share the store's files (one writes, every one reads)
    shared = False

    def get(self, client_id: int, *, optim: bool = True) -> ClientState | None:
        """A copy of the client's state (None if it has none); ``optim=False`` leaves out its
        optimiser state (``optim`` is None): evaluation reads the local tensors only."""
        raise NotImplementedError

    def put(self, client_id: int, state: ClientState) -> None:
        raise NotImplementedError

    def client_ids(self) -> list[int]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        out = {}
        for cid in self.client_ids():
            state = self.get(cid)
            assert state is not None
            out[str(cid)] = state.to_dict()
        return out

    def load_state_dict(self, state: dict[str, Any], write: bool = True) -> None:
        """Make the store hold exactly the clients of ``state`` (e.g. a checkpoint's).

        Clients not in ``state`` are forgotten. ``write=False`` is for processes that share
        a disk store's folder with a writing process: they only take note of the ids.
        """
        self.clear(write)
        for cid, d in state.items():
            if write:
                self.put(int(cid), ClientState.from_dict(d))
            else:
                self._note(int(cid))

    def clear(self, write: bool = True) -> None:
        """Forget every client (``write=False``: leave shared files to the writing process)."""
        raise NotImplementedError

    def _note(self, client_id: int) -> None:
        raise NotImplementedError


class MemoryClientStore(ClientStore):
    """Client states in host memory."""

    def __init__(self) -> None:
        self._states: dict[int, ClientState] = {}

    def get(self, client_id: int, *, optim: bool = True) -> ClientState | None:
        state = self._states.get(client_id)
        if state is None:
            return None
        return ClientState(local=to_cpu_copy(state.local), optim=to_cpu_copy(state.optim) if optim else None)

    def put(self, client_id: int, state: ClientState) -> None:
        self._states[client_id] = ClientState(**to_cpu_copy(state.to_dict()))

    def client_ids(self) -> list[int]:
        return sorted(self._states)

    def clear(self, write: bool = True) -> None:
        self._states = {}

    def load_state_dict(self, state: dict[str, Any], write: bool = True) -> None:
        super().load_state_dict(state, write=True)  # memory is never shared between processes


class DiskClientStore(ClientStore):
    """Client states on disk (one safetensors file of local tensors + one optimiser file per client).

    For federations with thousands of clients. Files are written atomically. Processes that
    share the folder (the ranks on one machine) hold the same states: one of them is the
    ``writer``; the others' ``put`` only takes note of the client, and they read what the
    writer wrote (after a barrier: see the trainer).
    """

    shared = True

    def __init__(self, directory: str | os.PathLike, writer: bool = True) -> None:
        self.directory = Path(directory)
        self.writer = writer
        self.directory.mkdir(parents=True, exist_ok=True)
        self._ids: set[int] = {
            int(p.name.split("-")[1].split(".")[0]) for p in self.directory.glob("client-*.safetensors")
        }

    def _paths(self, client_id: int) -> tuple[Path, Path]:
        stem = self.directory / f"client-{client_id:06d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".optim.pt")

    def get(self, client_id: int, *, optim: bool = True) -> ClientState | None:
        if client_id not in self._ids:
            return None
        tensors, optim_path = self._paths(client_id)
        local = load_file(tensors)
        if not optim:  # the optimiser file is most of the read
            return ClientState(local=local)
        meta = torch.load(optim_path, map_location="cpu", weights_only=True)
        return ClientState(local=local, optim=meta["optim"])

    def put(self, client_id: int, state: ClientState) -> None:
        if not self.writer:  # another process on this machine writes the same state
            self._ids.add(client_id)
            return
        # the tensors file last: a client counts as stored once it is there
        tensors, optim = self._paths(client_id)
        local = {k: v.detach().cpu().contiguous() for k, v in state.local.items()}
        meta = {"optim": to_cpu_copy(state.optim)}
        atomic_write(optim, lambda tmp: torch.save(meta, tmp))
        atomic_write(tensors, lambda tmp: save_file(local, str(tmp)))
        self._ids.add(client_id)

    def client_ids(self) -> list[int]:
        return sorted(self._ids)

    def clear(self, write: bool = True) -> None:
        if write:
            for path in self.directory.glob("client-*"):
                path.unlink()
        self._ids = set()

    def _note(self, client_id: int) -> None:
        self._ids.add(client_id)


def make_store(kind: str, directory: str | os.PathLike, writer: bool = True) -> ClientStore:
    """A ``memory`` or ``disk`` store; ``writer``: this process writes a disk store's files (one per machine)."""
    if kind == "memory":
        return MemoryClientStore()
    if kind == "disk":
        return DiskClientStore(directory, writer=writer)
    raise ValueError(f"state_store must be 'memory' or 'disk', got {kind!r}")
