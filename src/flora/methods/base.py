"""The base class of every method: one client's model as a LightningModule.

A method declares which of its parameters are *global* (uploaded to the server and
aggregated), *local* (kept by the client across rounds) or frozen (everything else,
including the CLIP backbone). The federated trainer only talks to this interface, so a
method never needs to know how it is federated, and the same module trains with a
plain ``lightning.Trainer`` on one client's DataLoader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from enum import Enum
from typing import Any, ClassVar, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from flora.clip import ClassPrompts, CLIPBackbone
from flora.errors import FloraConfigError
from flora.methods.meta import MethodMeta
from flora.methods.options import check_option, check_template

StateDict = dict[str, Tensor]


class Upload(NamedTuple):
    """What one client sends the server after its local training."""

    client_id: int
    num_samples: int  #: the client's training-set size (FedAvg's weight)
    state: StateDict  #: a CPU copy of what it sends (:meth:`FederatedPromptModule.upload_state`)


class Role(str, Enum):
    GLOBAL = "global"
    LOCAL = "local"
    FROZEN = "frozen"


class FederatedPromptModule(L.LightningModule, metaclass=MethodMeta):
    """One client's prompt learner on a frozen CLIP backbone.

    A method subclasses this (or :class:`~flora.methods.CoOpModule`): ``def __init__(self,
    *, mu: float = 0.5, **kwargs)`` checks its own options, calls ``super().__init__(**kwargs)``
    and builds its learnable parts, named in ``global_params`` / ``local_params``; it
    implements :meth:`text_features` (and :meth:`image_side` if it changes the image side).
    Loss, evaluation, initialisation, state exchange and FedAvg have defaults here. The
    task given as ``class_names`` is set once the whole constructor has run.

    Args:
        class_names: class names of the task in label order. May be left out and set
            later with :meth:`set_task` (the federated trainer and a datamodule exposing
            ``class_names`` both do this).
        clip_model: open_clip architecture or a flora-shipped config (``flora-tiny``).
        clip_pretrained: pretrained tag, checkpoint path, ``shipped`` or ``None`` (random).
        template: hand-written template of the anchor / zero-shot text features.
        lr, momentum, weight_decay: SGD settings of the local optimiser (a method may
            declare another default ``lr`` in its own signature, as FLORA does).
    """

    global_params: ClassVar[tuple[str, ...]] = ()
    local_params: ClassVar[tuple[str, ...]] = ()
    #: clients can be trained together (``trainer.client_batch``): the class implements
    #: :meth:`stacked_losses`; read from the class's own body, never inherited
    vectorised: ClassVar[bool] = False
    #: which image features the method consumes: ``"global"`` (pooled), ``"patch"`` or ``"image"`` (raw)
    feature_kind: ClassVar[str] = "global"
    #: evaluation reuses class-side features across clients whose parameters and buffers are
    #: equal (:meth:`cached_for_eval`); a method whose class-side features read other
    #: per-client state (a plain attribute) sets this False
    share_eval_text: ClassVar[bool] = True
    #: local epochs each client fine-tunes a throw-away copy of its model for before being evaluated
    #: (PromptFL+FT); 0 evaluates the model as it is
    eval_finetune_epochs: int = 0
    #: the option(s) that set :attr:`n_ctx`, as the user writes them after ``model.``
    n_ctx_option: ClassVar[str] = "n_ctx"
    #: a round's phases, each trained by every sampled client and aggregated before the next
    round_phases: ClassVar[tuple[str, ...]] = ("train",)
    phase: str = "train"
    #: the method's name in tables and in ``flora.methods.REGISTRY``
    display_name: ClassVar[str] = ""
    #: whether each client ends with a model of its own (compared with PromptFL on Local accuracy)
    personalised: ClassVar[bool] = False
    _n_ctx: int = 0  # a method with a learned context sets it before super().__init__ (see n_ctx)

    def __init__(
        self,
        *,
        class_names: Sequence[str] | None = None,
        clip_model: str = "flora-tiny",
        clip_pretrained: str | None = "shipped",
        template: str = "a photo of a {}.",
        lr: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        # checked before the backbone is loaded: a bad option fails at once, naming itself
        check_option("lr", lr, low=0, low_open=True)
        check_option("momentum", momentum, low=0, high=1, high_open=True)
        check_option("weight_decay", weight_decay, low=0)
        check_template(template)
        self.validate_options()
        super().__init__()
        self.save_hyperparameters(ignore=["class_names"])
        self.backbone = CLIPBackbone(clip_model, clip_pretrained)
        # [SOS] context class-name . [EOS]: the context leaves room for at least a one-token name
        limit = self.backbone.context_length - 4
        if self.n_ctx > limit:
            raise FloraConfigError(
                f"model.{self.n_ctx_option} must be <= {limit} for clip_model {clip_model!r} (its text "
                f"context holds {self.backbone.context_length} tokens, 4 of them for the start and end "
                f"tokens, the class name and the full stop), got {self.n_ctx}"
            )
        self.template = template
        self.class_names: list[str] = []
        self.class_prompts: ClassPrompts | None = None
        self.register_buffer("anchor", torch.empty(0), persistent=False)
        self._eval_text: Tensor | None = None
        self._eval_text_shared: dict[tuple[Any, ...], tuple[Any, list[Tensor], Tensor]] = {}
        # prompt tokens and z0 of the tasks set so far: evaluation switches base -> novel -> base
        self._tasks: dict[tuple[Any, ...], tuple[ClassPrompts, Tensor]] = {}
        self._global_only = False
        self._zero_shot = False
        self.val_acc: MeanMetric | None = None  # accuracy in percent, like every flora report
        self._class_names_given = None if class_names is None else list(class_names)  # MethodMeta sets it

    def validate_options(self) -> None:
        """Checks across classes' options (FLORA's rank vs n_ctx), stored before ``super().__init__``."""

    @classmethod
    def budget_options(cls, n_ctx: int, rank: int, lr: float) -> dict[str, Any]:
        """The options that give this method ``flora bench``'s shared ``n_ctx``, ``rank`` and ``lr`` (default: ``lr``)."""
        return {"lr": lr}

    # -------------------------------------------------------------- the task
    @property
    def n_ctx(self) -> int:
        """Number of learned context tokens (0 for methods without a context)."""
        return self._n_ctx

    def set_task(self, class_names: Sequence[str]) -> None:
        """Set the classes of the task (label order): its prompt tokens and ``z0``.

        Both are computed once per task and kept (until the module moves to another device
        or dtype): setting a task again, as every base-to-novel evaluation does, reuses them.
        """
        class_names = list(class_names)
        if not class_names:
            raise ValueError("a task needs at least one class name")
        if class_names == self.class_names and self.class_prompts is not None:
            return
        device = self.anchor.device
        key = (tuple(class_names), self.template)
        known = self._tasks.get(key)
        if known is None:
            try:
                prompts = self.backbone.build_class_prompts(class_names, self.n_ctx)
            except ValueError as err:  # a class name too long for the text context
                raise FloraConfigError(str(err)) from None
            anchor = self.backbone.anchor_features(class_names, self.template).to(device)
            if len(self._tasks) >= 4:  # an evaluation uses two tasks (base and novel)
                self._tasks.clear()
            known = self._tasks[key] = (prompts.to(device), anchor)
        self.class_names = class_names
        self.class_prompts, self.anchor = known
        self.val_acc = MeanMetric().to(device)
        self._eval_text = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str) -> None:
        if self.class_prompts is None:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            names = getattr(dm, "class_names", None)
            if not names:
                raise ValueError(
                    f"{type(self).__name__} has no class names: pass class_names=... or use a datamodule "
                    "that exposes .class_names"
                )
            self.set_task(names)

    def _require_task(self) -> ClassPrompts:
        if self.class_prompts is None:
            raise RuntimeError(f"{type(self).__name__}.set_task(class_names) must be called first")
        return self.class_prompts

    # ------------------------------------------------------------- parameters
    def parameter_roles(self) -> dict[str, Role]:
        """Role of every parameter outside the frozen backbone."""
        roles: dict[str, Role] = {}
        for name, param in self._named_parameters_outside_backbone():
            is_global = any(name == p or name.startswith(p + ".") for p in self.global_params)
            is_local = any(name == p or name.startswith(p + ".") for p in self.local_params)
            if is_global and is_local:
                raise TypeError(
                    f"{type(self).__name__}: parameter {name!r} is declared both global and local"
                )
            if is_global or is_local:
                roles[name] = Role.GLOBAL if is_global else Role.LOCAL
            elif param.requires_grad:
                raise TypeError(
                    f"{type(self).__name__}: trainable parameter {name!r} has no role; add it to "
                    "global_params or local_params (or set requires_grad=False)"
                )
            else:
                roles[name] = Role.FROZEN
        return roles

    def _named_parameters_outside_backbone(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``named_parameters()`` without walking the frozen backbone's hundreds of modules.

        Every client turn looks parameters up by role several times; the walk over the
        backbone was most of that work.
        """
        return self._named_outside("_parameters", nn.Module.named_parameters, ("backbone",))

    def _named_buffers_outside_backbone(self) -> Iterator[tuple[str, Tensor]]:
        """The buffers outside the backbone and the task's prompts (which :meth:`set_task` replaces)."""
        return self._named_outside("_buffers", nn.Module.named_buffers, ("backbone", "class_prompts"))

    def _named_outside(
        self, own: str, walk: Callable[..., Iterator[tuple[str, Tensor]]], skip: tuple[str, ...]
    ) -> Iterator[tuple[str, Tensor]]:
        seen: set[int] = set()
        for name, tensor in getattr(self, own).items():
            if tensor is not None:
                seen.add(id(tensor))
                yield name, tensor
        for child_name, child in self._modules.items():
            if child is None or child_name in skip:
                continue
            for name, tensor in walk(child, prefix=child_name):
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    yield name, tensor

    def _params_with_role(self, role: Role) -> dict[str, nn.Parameter]:
        return self._params_with_roles(role)

    def _params_with_roles(self, *wanted: Role) -> dict[str, nn.Parameter]:
        """The parameters of the ``wanted`` roles, role by role in that order."""
        roles = self.parameter_roles()
        params = dict(self._named_parameters_outside_backbone())
        if not params.keys() >= roles.keys():  # a method that gives backbone parameters a role
            params = dict(self.named_parameters())
        return {n: params[n] for role in wanted for n, r in roles.items() if r is role}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._params_with_roles(Role.GLOBAL, Role.LOCAL).values())

    @property
    def is_trainable(self) -> bool:
        return len(self.trainable_parameters()) > 0

    def global_state(self) -> StateDict:
        """A CPU copy of the global (uploaded) tensors."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self._params_with_role(Role.GLOBAL).items()}

    def upload_state(self) -> StateDict:
        """What a client sends the server after its local training (default: its global tensors)."""
        return self.global_state()

    def local_state(self) -> StateDict:
        """A CPU copy of the client-local tensors."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self._params_with_role(Role.LOCAL).items()}

    @torch.no_grad()
    def load_role_state(self, state: StateDict, role: Role) -> None:
        """Copy ``state`` into the parameters of ``role`` (all of them must be present)."""
        params = self._params_with_role(role)
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or extra:
            raise KeyError(
                f"{type(self).__name__} {role.value} state mismatch: missing {missing}, unexpected {extra}"
            )
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"{type(self).__name__}: {name} has shape {tuple(params[name].shape)}, state has {tuple(value.shape)}"
                )
            params[name].copy_(value)
        self._eval_text = None

    def load_global_state(self, state: StateDict) -> None:
        self.load_role_state(state, Role.GLOBAL)

    def load_local_state(self, state: StateDict) -> None:
        self.load_role_state(state, Role.LOCAL)

    def reset_global_parameters(self, generator: torch.Generator) -> None:
        """Initialise the global tensors (the server's round-0 model) from ``generator``.

        Default: ``reset_parameters(generator)`` of each part in ``global_params``, in that
        order; a method whose parts have no such method overrides this.
        """
        for name in self.global_params:
            self.get_submodule(name).reset_parameters(generator)

    def reset_local_parameters(self, generator: torch.Generator) -> None:
        """Initialise a new client's local tensors from ``generator`` (default: as the global ones)."""
        for name in self.local_params:
            self.get_submodule(name).reset_parameters(generator)

    @property
    def has_global_model(self) -> bool:
        """Whether the method has a global model that can be evaluated alone."""
        return any(r is Role.GLOBAL for r in self.parameter_roles().values())

    @property
    def is_global_only(self) -> bool:
        """True inside :meth:`global_only`: forward passes must ignore every local part."""
        return self._global_only

    @property
    def is_zero_shot(self) -> bool:
        """True inside :meth:`zero_shot`: the module evaluates as zero-shot CLIP."""
        return self._zero_shot

    def global_only(self) -> AbstractContextManager[None]:
        """Evaluate with the global part alone (e.g. FLORA's ``sigma`` without ``B A``)."""
        return self._evaluating_as("_global_only")

    def zero_shot(self) -> AbstractContextManager[None]:
        """Evaluate as zero-shot CLIP: the anchor template's text features, the plain image feature."""
        return self._evaluating_as("_zero_shot")

    @contextmanager
    def _evaluating_as(self, flag: str) -> Iterator[None]:
        previous = getattr(self, flag)
        setattr(self, flag, True)
        self._eval_text = None
        try:
            yield
        finally:
            setattr(self, flag, previous)
            self._eval_text = None

    # ---------------------------------------------------------- server side
    def aggregate(self, uploads: Sequence[Upload], current: StateDict) -> StateDict:
        """Server update: sample-weighted FedAvg of the clients' :class:`Upload` records.

        Uploads are summed in client-id order, so the result does not depend on which
        device trained which client.
        """
        if not uploads or not current:
            return current
        uploads = sorted(uploads, key=lambda u: u[0])
        total = float(sum(n for _, n, _ in uploads))
        if total <= 0:
            raise ValueError("FedAvg needs at least one sample among the uploading clients")
        out: StateDict = {}
        for name in current:
            acc = torch.zeros_like(current[name], dtype=torch.float64)
            for _, n, state in uploads:
                acc += state[name].to(torch.float64) * (n / total)
            out[name] = acc.to(current[name].dtype)
        return out

    def server_state_dict(self) -> dict[str, Any]:
        """Extra server-side state of the method (checkpointed). Empty by default."""
        return {}

    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`server_state_dict`."""

    def download_state(self, client_id: int, global_state: StateDict) -> StateDict:
        """What the server sends client ``client_id`` this round (the global state by default)."""
        return global_state

    def before_local_training(self, batches: Iterable[Sequence[Tensor]]) -> None:
        """Called with the client's training batches (on the device) before its local epochs.

        The default does nothing; a method with a non-parametric client memory (pFedPrompt)
        builds it here. Runs under ``torch.no_grad()``.
        """

    def evaluation_state(self, client_id: int, global_state: StateDict) -> StateDict:
        """The global-role tensors client ``client_id`` is evaluated with (default: its download)."""
        return self.download_state(client_id, global_state)

    # -------------------------------------------------------------- forward
    def text_features(self) -> Tensor:
        """Normalised text features of every class, ``(n_cls, d)``. Default: ``z0`` (zero-shot)."""
        self._require_task()
        return self.anchor

    def image_features(self, x: Tensor) -> Tensor:
        """Image features from raw images ``(B, 3, H, W)`` or already-encoded features.

        Cached ``global`` features arrive as ``(B, d)``, ``patch`` features as ``(B, 1 + M, d)``
        (the pooled token first), so a method sees the same thing whether or not the
        feature cache is on.
        """
        if x.dim() == 4:
            if self.feature_kind == "patch":
                pooled, tokens = self.backbone.encode_image_tokens(x)
                return torch.cat([pooled.unsqueeze(1), tokens], dim=1)
            return self.backbone.encode_image(x)
        return x

    def image_side(self, feats: Tensor) -> Tensor:
        """Map image features to normalised embeddings ``(B, d)``. Default: normalise the pooled feature."""
        if feats.dim() == 3:
            feats = feats[:, 0]
        return F.normalize(feats.float(), dim=-1)

    def logits_from(self, img: Tensor, text: Tensor) -> Tensor:
        return self.backbone.logit_scale * img @ text.to(img.dtype).t()

    def cached_for_eval(self, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()`` (the class-side features of a forward), computed once per evaluation.

        While training or with gradients on it is called every time. Otherwise its first
        result is kept until the weights, the task, the train/eval mode, the device or
        dtype, or the evaluation mode (:meth:`global_only`, :meth:`zero_shot`) change.
        """
        if self.training or torch.is_grad_enabled():
            return compute()
        if self._eval_text is None:
            self._eval_text = self._shared_eval_text(compute)
        return self._eval_text

    def _shared_eval_text(self, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, or its result for the last client whose inputs to it were equal.

        An evaluation loads one client after another; their class-side features often do
        not differ (the global model evaluated alone: one global prompt for every client;
        PromptFL: nothing local at all). What they read is the method's parameters of the
        roles in use (global alone inside :meth:`global_only`), its buffers outside the
        backbone, the task and the evaluation mode: with all of them equal the features are
        the same, and are reused. Compared by value, so a client whose state differs in any
        bit computes its own.
        """
        if not self.share_eval_text:
            return compute().detach()
        device = self.anchor.device
        autocast = device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
        slot = (
            getattr(compute, "__func__", compute),
            self._global_only,
            self._zero_shot,
            id(self.class_prompts),
            autocast and torch.get_autocast_dtype(device.type),
        )
        roles = (Role.GLOBAL,) if self._global_only else (Role.GLOBAL, Role.LOCAL)
        inputs: list[Tensor] = list(self._params_with_roles(*roles).values())
        inputs += [b for _, b in self._named_buffers_outside_backbone()]
        hit = self._eval_text_shared.get(slot)
        if (
            hit is not None
            and hit[0] is self.class_prompts
            and len(hit[1]) == len(inputs)
            and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(hit[1], inputs))
            and _all_equal(hit[1], inputs)
        ):
            return hit[2]
        feats = compute().detach()
        if len(self._eval_text_shared) >= 8:  # tasks and modes of one evaluation: a handful
            self._eval_text_shared.clear()
        self._eval_text_shared[slot] = (self.class_prompts, [t.detach().clone() for t in inputs], feats)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, n_cls)`` for images or cached features."""
        if self._zero_shot:
            return self.logits_from(
                FederatedPromptModule.image_side(self, self.image_features(x)), self.anchor
            )
        img = self.image_side(self.image_features(x))
        return self.logits_from(img, self.cached_for_eval(self.text_features))

    def train(self, mode: bool = True) -> FederatedPromptModule:
        self._eval_text = None
        return super().train(mode)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FederatedPromptModule:
        # every device/dtype move (.to, .cuda, .half, ...) goes through here: drop the cached
        # evaluation text features, which live outside the module's buffers
        self._eval_text = None
        self._eval_text_shared = {}
        self._tasks = {}  # the kept tasks' tokens and z0 are on the old device/dtype
        return super()._apply(fn, recurse)

    # --------------------------------------------------------- lightning API
    def compute_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss and its named parts. Default: cross-entropy."""
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"ce": loss.detach()}

    def stacked_losses(self, params: dict[str, Tensor], batches: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """Training losses ``(K,)`` of K clients at once (:mod:`flora.federated.vectorised`).

        ``params`` maps each trainable parameter's name to the K clients' values stacked
        ``(K, ...)``; ``batches[k]`` is client k's batch. Client k's loss must equal
        :meth:`compute_loss` with its values loaded. Methods with ``vectorised = True``
        implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not train clients together")

    def client_constants(self) -> dict[str, Tensor]:
        """Tensors a client's loss reads that are not trained but differ between clients (default: none).

        E.g. the prompt a client received this round, for a proximal term. Clients trained
        together (:mod:`flora.federated.vectorised`) take them after each client's state is
        loaded and pass them to :meth:`stacked_losses` stacked ``(K, ...)``, under these
        names, beside the trainable tensors.
        """
        return {}

    def stacked_cross_entropy(self, text: Tensor, batches: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """Cross-entropy ``(K,)`` of K clients: client k's class features ``text[k]`` against its batch."""
        losses = [
            F.cross_entropy(self.logits_from(self.image_side(self.image_features(x)), text[k]), y)
            for k, (x, y) in enumerate(batches)
        ]
        return torch.stack(losses)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        loss, parts = self.compute_loss(x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite training loss ({float(loss.detach())}) at batch {batch_idx}; "
                "lower the learning rate or use 32-true precision"
            )
        if self._trainer is not None:
            self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._score(batch, "val_acc", prog_bar=True)

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._score(batch, "test_acc", prog_bar=False)

    def _score(self, batch: Sequence[Tensor], name: str, prog_bar: bool) -> None:
        """``val_acc`` / ``test_acc`` under a plain ``lightning.Trainer``: accuracy in percent, as ``flora fit`` reports."""
        self.val_acc.update((self(batch[0]).argmax(-1) == batch[1]).float() * 100.0)
        if self._trainer is not None:
            self.log(name, self.val_acc, prog_bar=prog_bar)

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        params = self.trainable_parameters()
        if not params:
            return None
        hp = self.hparams
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    # ----------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning checkpoints keep the learned tensors only: the frozen backbone is rebuilt from its config."""
        sd = checkpoint.get("state_dict", {})
        for key in [k for k in sd if k.startswith("backbone.")]:
            del sd[key]
        checkpoint["flora_class_names"] = list(self.class_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        names = checkpoint.get("flora_class_names")
        if names:
            self.set_task(names)
        sd = checkpoint.get("state_dict", {})
        for key, value in self.state_dict().items():
            if key.startswith("backbone."):
                sd.setdefault(key, value)


def _all_equal(first: Sequence[Tensor], second: Sequence[Tensor]) -> bool:
    """Whether the tensors are equal pairwise, compared on their device with one host sync for all."""
    if not first:
        return True
    return bool(torch.stack([torch.eq(a, b).all() for a, b in zip(first, second, strict=True)]).all())
