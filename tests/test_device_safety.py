"""Every method initialises and trains with its tensors on a non-CPU device.

The federated trainer seeds every initialisation with a *CPU* ``torch.Generator``
(``reset_global_parameters`` / ``reset_local_parameters``) while the module sits on the
accelerator. Drawing from that generator straight into a CUDA tensor fails on CUDA only
(``Expected a 'cuda' device type for generator but found 'cpu'``), so a CPU-only test run
would never see it. Two checks close that gap:

- always: the module is moved to PyTorch's ``meta`` device (tensors with shapes but no
  data) and runs its initialisation, one server round, one training step and one
  evaluation forward under :class:`GeneratorDeviceGuard`, which fails every op that
  draws from a generator into a tensor on another device. The meta device also refuses
  to mix its tensors with CPU tensors, which catches a tensor created on the CPU inside
  a forward pass. Meta tensors hold no values, so data-dependent Python branches
  (``if torch.isfinite(loss)``, ``.item()``) are answered "true" by the guard: this run
  checks devices and shapes, the other tests check values.
- with a CUDA device: the same on ``cuda`` for real, plus the initial tensors must equal
  those the same generators give on the CPU (initialisation never depends on the device).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import flora.methods as methods
from flora.methods import REGISTRY, CoOpModule, FederatedPromptModule, KeepsLastUploads, Role

NAMES = ["red circle", "blue square", "green triangle"]
_BASES = (FederatedPromptModule, CoOpModule, KeepsLastUploads)  # exported building blocks, not methods


def _method_classes() -> list[type[FederatedPromptModule]]:
    """Every method class ``flora.methods`` exports (found by iterating the module)."""
    found = {
        obj
        for obj in vars(methods).values()
        if isinstance(obj, type) and issubclass(obj, FederatedPromptModule) and obj not in _BASES
    }
    return sorted(found, key=lambda c: c.__name__)


METHODS = _method_classes()


class GeneratorDeviceGuard(TorchDispatchMode):
    """Fails any op that draws from a ``torch.Generator`` into (or from) a tensor on another device.

    With ``fake_meta_scalars`` it also answers a data-dependent scalar read of a ``meta``
    tensor (``bool(t)``, ``t.item()``) with 1/True instead of raising.
    """

    def __init__(self, fake_meta_scalars: bool = False) -> None:
        super().__init__()
        self.fake_meta_scalars = fake_meta_scalars
        self.draws: list[str] = []

    @staticmethod
    def _check(func: Any, generators: list[torch.Generator], devices: list[torch.device]) -> None:
        for gen in generators:
            for device in devices:
                if torch.device(device).type != gen.device.type:
                    raise AssertionError(
                        f"{func}: draws from a {gen.device.type} generator into a tensor on {device}; "
                        "draw on the generator's device and copy the values over"
                    )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if (
            self.fake_meta_scalars
            and func is torch.ops.aten._local_scalar_dense.default
            and args[0].device.type == "meta"
        ):
            return True if args[0].dtype == torch.bool else 1
        leaves = pytree.tree_leaves((args, kwargs))
        generators = [g for g in leaves if isinstance(g, torch.Generator)]
        if not generators:
            return func(*args, **kwargs)
        self.draws.append(str(func))
        # checked before the op runs (on CUDA it would raise its own, less telling error) ...
        inputs = [t.device for t in leaves if isinstance(t, Tensor)]
        if kwargs.get("device") is not None:  # a factory op writes to its device argument
            inputs.append(kwargs["device"])
        self._check(func, generators, inputs)
        out = func(*args, **kwargs)
        # ... and after it, on what it wrote
        self._check(func, generators, [t.device for t in pytree.tree_leaves(out) if isinstance(t, Tensor)])
        return out


@contextmanager
def _params_keep_identity() -> Iterator[None]:
    """Make ``.to(device)`` swap tensors in place, as a CPU -> CUDA move effectively does.

    A CPU -> meta move would otherwise replace every parameter by a new object, leaving
    the backbone's direct references to its text-tower tensors on the CPU.
    """
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def _build(cls: type[FederatedPromptModule]) -> FederatedPromptModule:
    """The method on the shipped tiny CLIP with small options."""
    params = inspect.signature(cls).parameters
    small = {"n_ctx": 4, "rank": 2, "n_global": 2, "n_local": 2, "num_experts": 2}
    return cls(class_names=NAMES, clip_model="flora-tiny", **{k: v for k, v in small.items() if k in params})


def _role_shapes(m: FederatedPromptModule, role: Role) -> dict[str, torch.Size]:
    params = dict(m.named_parameters())
    return {n: params[n].shape for n, r in m.parameter_roles().items() if r is role}


def _server_round(m: FederatedPromptModule) -> None:
    """Two clients upload, the server aggregates, client 0 loads its download (experts, cloud prompt...)."""
    shapes = _role_shapes(m, Role.GLOBAL)
    if not shapes:
        return
    gen = torch.Generator().manual_seed(3)
    current = {n: torch.randn(s, generator=gen) * 0.02 for n, s in shapes.items()}
    other = {n: v + 0.01 * torch.randn(v.shape, generator=gen) for n, v in current.items()}
    new_global = m.aggregate([(0, 3, current), (1, 2, other)], current)
    m.load_global_state(m.download_state(0, new_global))


def _exercise(m: FederatedPromptModule, device: torch.device, guard: GeneratorDeviceGuard) -> Tensor:
    """What the trainer does with a client, on ``device``; returns the evaluation logits."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g).to(device)
    y = torch.tensor([0, 1, 2, 0], device=device)
    with guard:
        m.reset_global_parameters(torch.Generator().manual_seed(1))
        m.reset_local_parameters(torch.Generator().manual_seed(2))
    _server_round(m)
    m.train()
    with guard:
        with torch.no_grad():
            m.before_local_training([(x, y)])
        optimizer = m.configure_optimizers()
        loss = m.training_step((x, y), 0)
        assert loss.device == device and loss.dim() == 0
        if loss.requires_grad:
            loss.backward()
            assert optimizer is not None
            optimizer.step()
            optimizer.zero_grad()
        m.eval()
        with torch.no_grad():
            logits = m(x)
            if m.has_global_model:
                with m.global_only():
                    assert m(x).shape == (4, len(NAMES))
    assert logits.shape == (4, len(NAMES)) and logits.device == device
    for name, p in m.named_parameters():
        assert p.device == device, f"{name} is on {p.device}"
    return logits


def test_methods_are_found() -> None:
    names = {c.__name__ for c in METHODS}
    assert {"PFedMoAP", "PFedPrompt", "FLORA", "FedOTP", "PromptFL", "ZeroShotCLIP"} <= names
    assert set(METHODS) == set(REGISTRY.values())  # every exported method is registered
    assert names <= set(methods.__all__)


def test_guard_catches_a_generator_on_another_device() -> None:
    """The guard itself: the pFedMoAP bug pattern (draw into the parameter's device) must fail."""
    layer = nn.Linear(4, 4).to("meta")
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(AssertionError, match="cpu generator into a tensor on meta"):
        with GeneratorDeviceGuard():
            torch.empty_like(layer.weight).uniform_(-1, 1, generator=gen)
    with pytest.raises(AssertionError, match="cpu generator into a tensor on meta"):
        with GeneratorDeviceGuard():
            torch.randn(3, generator=gen, device="meta")
    guard = GeneratorDeviceGuard()
    with guard:  # the safe pattern: draw on the CPU, then copy
        with torch.no_grad():
            layer.weight.copy_(torch.empty(layer.weight.shape).uniform_(-1, 1, generator=gen).to("meta"))
    assert guard.draws == ["aten.uniform_.default"]


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_initialise_and_train_off_the_cpu_meta(cls: type[FederatedPromptModule]) -> None:
    """Always runs: the method on the meta device, CPU generators, every draw checked."""
    m = _build(cls)
    with _params_keep_identity():
        m.to("meta")
    _exercise(m, torch.device("meta"), GeneratorDeviceGuard(fake_meta_scalars=True))


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the meta-device test always runs)"
)
@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_initialise_and_train_on_cuda(cls: type[FederatedPromptModule]) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    reference = _build(cls)
    reference.reset_global_parameters(torch.Generator().manual_seed(1))
    reference.reset_local_parameters(torch.Generator().manual_seed(2))
    m = _build(cls).to(device)
    with GeneratorDeviceGuard():
        m.reset_global_parameters(torch.Generator().manual_seed(1))
        m.reset_local_parameters(torch.Generator().manual_seed(2))
    # the initialisation is drawn on the CPU: the same values on every device
    for name, value in {**reference.global_state(), **reference.local_state()}.items():
        got = {**m.global_state(), **m.local_state()}[name]
        assert torch.equal(got, value), f"{cls.__name__}.{name} differs between cpu and cuda"
    logits = _exercise(m, device, GeneratorDeviceGuard())
    assert torch.isfinite(logits).all()


VECTORISED = [c for c in METHODS if vars(c).get("vectorised", False)]
_DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("cls", VECTORISED, ids=lambda c: c.__name__)
def test_clients_trained_together_off_the_cpu(cls: type[FederatedPromptModule], device: str) -> None:
    """``stacked_losses`` (trainer.client_batch) with every tensor on the device: 2 clients, cached features."""
    assert {c.__name__ for c in VECTORISED} >= {"PromptFL", "LocalCoOp", "FedPGP", "FLORA"}
    m = _build(cls)
    with _params_keep_identity():
        m.to(device)
    width = m.anchor.shape[-1]
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.rand(n, width, generator=g).to(device), torch.tensor([0, 1, 2][:n], device=device))
        for n in (3, 2)
    ]
    named = {n: p for n, p in m.named_parameters() if p.requires_grad}
    stacked = {n: nn.Parameter(torch.stack([p.detach(), p.detach()])) for n, p in named.items()}
    # what differs between clients without being trained (PromptProx: the prompt each received)
    m.load_global_state({n: p.detach().clone() for n, p in m._params_with_role(Role.GLOBAL).items()})
    constants = {n: torch.stack([t, t]) for n, t in m.client_constants().items()}
    assert all(t.device.type == device for t in constants.values())
    m.train()
    with GeneratorDeviceGuard(fake_meta_scalars=device == "meta"):
        losses = m.stacked_losses({**stacked, **constants}, batches)
        assert losses.shape == (2,) and losses.device.type == device
        losses.sum().backward()
    for n, t in stacked.items():
        assert t.grad is not None and t.grad.device.type == device, n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["zero-shot", "Local", "PromptFL", "FedOTP", "pFedMoAP", "FLORA"])
def test_federated_fit_on_cuda_under_bf16_mixed(name: str, tmp_path) -> None:
    """A whole federated fit (cached features, training, Base/Novel evaluation) under bf16-mixed."""
    from flora.bench import BenchConfig, make_datamodule, make_method
    from flora.federated import FederatedTrainer

    cfg = BenchConfig(rounds=1, local_epochs=1, num_colors=4, num_shapes=5, clip_pretrained=None)
    trainer = FederatedTrainer(
        rounds=1,
        accelerator="cuda",
        precision="bf16-mixed",
        output_dir=str(tmp_path / "runs"),
        name=name.replace("+", "p"),
        progress=False,
        loggers=[],
    )
    summary = trainer.fit(make_method(name, cfg), make_datamodule("label", 0, cfg, tmp_path))
    assert 0.0 <= summary["final"]["local_acc_mean"] <= 100.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shared_context_text_tower_on_cuda() -> None:
    """The shared start-and-context pass on CUDA: the whole sequences' features in fp32, close under bf16 autocast."""
    from flora.clip import CLIPBackbone

    backbone = CLIPBackbone("flora-tiny", None, init_seed=0).cuda()
    prompts = backbone.build_class_prompts(["red circle", "dark green five pointed star", "cyan"], 4)
    ctx = (torch.randn(3, 4, backbone.token_width, generator=torch.Generator().manual_seed(0)) * 0.1).cuda()
    out = {}
    for share in (True, False):
        backbone.share_prefix = share
        c = ctx.clone().requires_grad_()
        feats = backbone.encode_prompted(c, prompts)
        out[share] = (feats.detach(), torch.autograd.grad(feats.sum(), c)[0])
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-4, rtol=1e-3)
    backbone.share_prefix = True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = backbone.encode_prompted(ctx.clone().requires_grad_(), prompts)
    torch.testing.assert_close(mixed.float(), out[True][0], atol=5e-2, rtol=0)
