"""The server keeps each client's last upload: the memory PromptAMP and pFedMoAP build on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from flora.methods.base import FederatedPromptModule, StateDict, Upload


class KeepsLastUploads(FederatedPromptModule):
    """A method whose server keeps every client's last upload.

    :attr:`last_uploads` maps a client id to a CPU copy of the state it last uploaded. It
    is filled by :meth:`aggregate` before FedAvg and checkpointed with the server state
    under :attr:`last_uploads_key`; :meth:`on_uploads_changed` runs after every change.
    """

    #: the key of :attr:`last_uploads` in :meth:`server_state_dict`
    last_uploads_key: ClassVar[str] = "last_uploads"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.last_uploads: dict[int, StateDict] = {}

    def on_uploads_changed(self) -> None:
        """Drop whatever was derived from :attr:`last_uploads` (nothing by default)."""

    def aggregate(self, uploads: Sequence[Upload], current: StateDict) -> StateDict:
        for client_id, _, state in uploads:
            self.last_uploads[int(client_id)] = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        self.on_uploads_changed()
        return super().aggregate(uploads, current)

    def server_state_dict(self) -> dict[str, Any]:
        return {self.last_uploads_key: {str(c): s for c, s in self.last_uploads.items()}}

    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        self.last_uploads = {int(c): dict(s) for c, s in state.get(self.last_uploads_key, {}).items()}
        self.on_uploads_changed()
