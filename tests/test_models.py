"""Models beyond a bare ``nn.Sequential``: every accepted form trains exactly as its bare twin, and
every refused form says what is supported and what to do.

Oracle: the same layers, with the same initial weights, written as a bare ``nn.Sequential`` of
``nn.Linear`` and activations. Each accepted form — a module holding a Sequential, a module whose
forward chains its attributes, a ``torch.compile`` wrapper, nested Sequentials, ``nn.Dropout``,
``nn.Flatten()``, an ``nn.CrossEntropyLoss()`` object — is trained 3 steps by PC, BP, TP and DTP on
every available backend (triton under its interpreter, or on CUDA) in float64, and its parameters must
equal the twin's bitwise.
"""
import warnings

import pytest
import torch
from torch import nn

import pcfast
from pcfast.network import parse_mlp, resolve_loss
from pcfast.testing import device_for, make_batch, make_batches, make_model

DIMS = (5, 7, 6, 3)
BATCH = 4
STEPS = 3
OPTIMIZERS = {
    "pc": lambda model, **kw: pcfast.optim.PC(model, lr=0.1, inference_steps=3, inference_lr=0.2, **kw),
    "bp": lambda model, **kw: pcfast.optim.BP(model, lr=0.1, **kw),
    "tp": lambda model, **kw: pcfast.optim.TP(model, lr=0.1, feedback_lr=0.05, **kw),
    "dtp": lambda model, **kw: pcfast.optim.DTP(model, lr=0.1, feedback_lr=0.05, **kw),
}


def layers(seed=0, device="cpu"):
    """Fresh ``Linear(5,7), Tanh, Linear(7,6), ReLU, Linear(6,3)`` in float64, the same for a seed."""
    return list(make_model(DIMS, activation=["tanh", "relu"], dtype=torch.float64, device=device, seed=seed))


class HoldsSequential(nn.Module):
    def __init__(self, modules):
        super().__init__()
        self.net = nn.Sequential(*modules)

    def forward(self, x):
        return self.net(x)


class ChainsAttributes(nn.Module):
    def __init__(self, modules):
        super().__init__()
        self.fc1, self.act1, self.fc2, self.act2, self.fc3 = modules

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


def _dropout(modules):
    model = nn.Sequential(modules[0], modules[1], nn.Dropout(0.5), *modules[2:4], nn.Dropout(0.25), modules[4])
    return model.train()  # training mode: model(x) drops units, the optimizers do not


FORMS = {
    "holds_sequential": lambda m: HoldsSequential(m),
    "chains_attributes": lambda m: ChainsAttributes(m),
    "compiled": lambda m: torch.compile(nn.Sequential(*m), backend="eager"),
    "compiled_holds_sequential": lambda m: torch.compile(HoldsSequential(m), backend="eager"),
    "nested_sequential": lambda m: nn.Sequential(nn.Sequential(m[0], m[1]), nn.Sequential(m[2], nn.Sequential(m[3], m[4]))),
    "dropout": _dropout,
    "flatten": lambda m: nn.Sequential(nn.Flatten(), *m),
}


def batches(loss, device="cpu"):
    """The ``STEPS`` training batches (float64 inputs; normal targets for mse, labels for ce)."""
    return make_batches(DIMS, BATCH, STEPS, loss, device=device)


def inputs(seed=1):
    return make_batch(DIMS, BATCH, seed=seed).x


def train(model, algo, backend, loss):
    opt = OPTIMIZERS[algo](model, loss=loss, backend=backend)
    device = next(model.parameters()).device
    for x, y in batches("ce" if loss == "ce" or isinstance(loss, nn.CrossEntropyLoss) else "mse", device):
        opt.zero_grad()
        opt.step(x, y)
    return opt


def linear_params(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Dropout's notice
        return [p.detach().clone() for lin in parse_mlp(model).linears for p in (lin.weight, lin.bias)]


_TWINS: dict[tuple[str, str, str], tuple[list, list]] = {}


def bare_twin(algo, backend, loss):
    """Parameters of the bare ``nn.Sequential(*layers())`` before and after training (cached: the
    twin is the same for every form)."""
    key = (algo, backend, loss)
    if key not in _TWINS:
        bare = nn.Sequential(*layers(device=device_for(backend)))
        before = linear_params(bare)
        train(bare, algo, backend, loss)
        _TWINS[key] = before, linear_params(bare)
    return _TWINS[key]


def assert_trained_like_bare(model, algo, backend, *, loss="mse", bare_loss=None):
    before, want = bare_twin(algo, backend, bare_loss or loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Dropout's notice; test_dropout_warns checks it
        train(model, algo, backend, loss)
    after = linear_params(model)
    assert len(after) == len(want) == 6
    assert any(not torch.equal(a, b) for a, b in zip(want, before)), "training did not move the twin"
    for i, (got, expected) in enumerate(zip(after, want)):
        assert torch.equal(got, expected), f"parameter {i}: max diff {float((got - expected).abs().max())}"


@pytest.mark.parametrize("algo", list(OPTIMIZERS))
@pytest.mark.parametrize("form", list(FORMS))
def test_accepted_form_trains_like_bare_sequential(form, algo, backend, device):
    model = FORMS[form](layers(device=device))
    assert_trained_like_bare(model, algo, backend)


@pytest.mark.parametrize("algo", list(OPTIMIZERS))
def test_cross_entropy_loss_object_trains_like_loss_ce(algo, backend, device):
    model = nn.Sequential(*layers(device=device))
    assert_trained_like_bare(model, algo, backend, loss=nn.CrossEntropyLoss(), bare_loss="ce")


def test_parsed_chain_is_the_users_live_modules():
    modules = layers()
    for form, build in FORMS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Dropout's notice
            mlp = parse_mlp(build(modules))
        assert [id(m) for m in mlp.linears] == [id(modules[i]) for i in (0, 2, 4)], form
        assert mlp.activations == ("tanh", "relu"), form


@pytest.mark.parametrize("form", list(FORMS))
def test_parametrize_treats_accepted_form_like_bare_sequential(form):
    """pcfast.parametrize re-initialises the user's own layers exactly as the bare twin's."""
    model, bare = FORMS[form](layers()), nn.Sequential(*layers())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Dropout's notice
        par = pcfast.parametrize(model, "mup", algo="pc", base_width=4, generator=torch.Generator().manual_seed(3))
    twin = pcfast.parametrize(bare, "mup", algo="pc", base_width=4, generator=torch.Generator().manual_seed(3))
    assert str(par) == str(twin)
    assert not torch.equal(linear_params(model)[0], layers()[0].weight)  # re-initialised
    assert all(torch.equal(a, b) for a, b in zip(linear_params(model), linear_params(bare)))


def test_compiled_wrapper_shows_what_the_optimizer_trained():
    """The optimizer updates the module inside the wrapper in place; the compiled forward reads it."""
    model = nn.Sequential(*layers())
    compiled = torch.compile(model, backend="eager")
    x = inputs()
    start = compiled(x).clone()
    train(compiled, "pc", "torch", "mse")
    after = compiled(x)
    assert not torch.equal(after, start)
    assert torch.equal(after, model(x))


@pytest.mark.parametrize("form", ["holds_sequential", "chains_attributes", "nested_sequential", "flatten"])
def test_accepted_form_still_computes_the_trained_chain(form):
    """After training, the user's own forward equals the bare twin's forward (the same weights)."""
    model, bare = FORMS[form](layers()), nn.Sequential(*layers())
    train(model, "dtp", "torch", "mse")
    train(bare, "dtp", "torch", "mse")
    x = inputs(seed=5)
    assert torch.equal(model(x), bare(x))


def test_dropout_is_the_identity_and_warns():
    """Dropout is the identity in the local rules: the trained weights are the twin's without
    Dropout (above), the model in eval mode equals the twin, and a warning says so once per parse."""
    model = _dropout(layers())
    with pytest.warns(UserWarning, match=r"model\[2\] \(p=0.5\), model\[5\] \(p=0.25\): nn.Dropout is the identity"):
        pcfast.optim.PC(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # p = 0 is silent
        pcfast.optim.PC(nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.0), nn.Tanh(), nn.Linear(7, 3)))
    x = inputs()
    assert torch.equal(model.eval()(x), nn.Sequential(*layers())(x))


class LoopsModuleList(nn.Module):
    def __init__(self, modules):
        super().__init__()
        self.layers = nn.ModuleList(modules)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("algo", ["pc", "dtp"])
def test_module_list_and_observing_hook_are_accepted(algo):
    """A ModuleList looped in forward is a chain too; a hook that only records passes the probe
    (which calls it once, as documented)."""
    assert_trained_like_bare(LoopsModuleList(layers()), algo, "torch")
    seen = []
    model = nn.Sequential(*layers())
    model[2].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    assert_trained_like_bare(model, algo, "torch")
    seen.clear()
    parse_mlp(model)
    assert seen == [torch.Size([4, 6])]  # one probe batch of 4 per parse


def test_probe_restores_training_mode_and_global_random_state():
    model = HoldsSequential([*layers()[:2], nn.Dropout(0.5), *layers()[2:]])
    model.net[1].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        parse_mlp(model)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------------ refusals


class Residual(HoldsSequential):
    def forward(self, x):
        out = self.net(x)
        return out + x[:, : out.shape[1]]


class FunctionalActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class Scaled(HoldsSequential):
    def __init__(self, modules):
        super().__init__(modules)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.net(x) * self.scale


class ReturnsTuple(HoldsSequential):
    def forward(self, x):
        return self.net(x), x


class NeedsImages(HoldsSequential):
    def forward(self, x):
        return self.net(x.reshape(-1, 1, 28, 28).flatten(1))


def _hooked():
    model = nn.Sequential(*layers())
    model[4].register_forward_hook(lambda module, inputs, output: 2 * output)
    return model


WHAT_TO_DO = "Define the model as nn.Sequential"


@pytest.mark.parametrize("build, message", [
    (lambda: Residual(layers()), rf"model: Residual's forward must compute exactly the chain .*cannot read the forward of model,"
                                 rf".*differ by up to .*{WHAT_TO_DO}"),
    (lambda: FunctionalActivation(), rf"FunctionalActivation's forward .* model.fc1 \(Linear\), model.fc2 \(Linear\).*nn.Tanh\(\), not torch.tanh"),
    (lambda: ReturnsTuple(layers()), rf"ReturnsTuple's forward .*returned tuple.*{WHAT_TO_DO}"),
    (lambda: NeedsImages(layers()), rf"NeedsImages's forward .*raised RuntimeError.*{WHAT_TO_DO}"),
    (_hooked, rf"model: Sequential's forward .*cannot read the forward hooks of model\[4\].*differ by up to.*{WHAT_TO_DO}"),
    (lambda: Scaled(layers()), r"model: Scaled has parameters of its own \(scale\).*train this model with a torch.optim"),
    (lambda: nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)),
     r"model\[1\]: LayerNorm is not supported: .*couples the units of a layer.*Remove it"),
    (lambda: HoldsSequential([nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)]),
     r"model.net\[1\]: BatchNorm1d is not supported: .*samples of a batch.*torch.optim optimizer"),
    (lambda: nn.Sequential(nn.Linear(5, 7), nn.GroupNorm(1, 7), nn.Linear(7, 3)), r"model\[1\]: GroupNorm is not supported"),
    (lambda: nn.Sequential(nn.Linear(5, 7), nn.RMSNorm(7), nn.Linear(7, 3)), r"model\[1\]: RMSNorm is not supported"),
    (lambda: torch.compile(nn.Sequential(nn.Linear(5, 7), nn.Softplus(), nn.Linear(7, 3)), backend="eager"),
     r"model._orig_mod\[1\]: unsupported module Softplus.*pcfast supports nn.Linear and the activations.*replace it"),
    (lambda: nn.Sequential(nn.Sequential(nn.Linear(5, 7), nn.Conv1d(1, 1, 1)), nn.Linear(7, 3)),
     r"model\[0\]\[1\]: unsupported module Conv1d"),
    (lambda: nn.Sequential(nn.Flatten(0), nn.Linear(5, 3)), r"model\[0\]: nn.Flatten\(start_dim=0, end_dim=-1\) is not supported.*x.flatten\(1\)"),
    (lambda: nn.Sequential(nn.Linear(5, 7), nn.Dropout1d(), nn.Linear(7, 3)), r"model\[1\]: unsupported module Dropout1d"),
    (lambda: (lambda lin: nn.Sequential(lin, nn.Tanh(), lin))(nn.Linear(5, 5)), r"model\[2\]: this nn.Linear appears earlier .*shared weights"),
    (lambda: nn.utils.weight_norm(nn.Linear(5, 3)), r"model: its weight is a Tensor, not an nn.Parameter .*remove the"),
    (lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(5, 3))),
     r"model\[0\]: ParametrizedLinear is a subclass of nn.Linear .*remove_parametrizations"),
    (lambda: nn.Sequential(nn.modules.linear.NonDynamicallyQuantizableLinear(5, 3)),
     r"model\[0\]: NonDynamicallyQuantizableLinear is a subclass of nn.Linear .*use nn.Linear"),
    (lambda: nn.Sequential(nn.Tanh(), nn.Linear(5, 3)), r"model\[0\]: an activation before the first Linear"),
    (lambda: nn.Sequential(nn.Sequential(nn.Linear(5, 3), nn.Tanh())), r"model\[0\]\[1\]: the model ends with an activation"),
])
def test_refused_model_names_the_module_and_what_to_do(build, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm's deprecation
        model = build()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=message):
        parse_mlp(model)
    with pytest.raises(TypeError, match=message):
        pcfast.optim.PC(model)
    with pytest.raises(TypeError, match=message):
        pcfast.parametrize(model, "sp")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_weight_norm_reparametrised_linear_is_refused_for_its_weight():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(5, 7)), nn.Tanh(), nn.Linear(7, 3))
    with pytest.raises(TypeError, match=r"model\[0\]: its weight is a Tensor, not an nn.Parameter"):
        parse_mlp(model)


# ------------------------------------------------------------------------------------------ losses


def test_cross_entropy_loss_object_is_pcfast_ce():
    assert resolve_loss(nn.CrossEntropyLoss()) == "ce"
    assert resolve_loss(nn.CrossEntropyLoss(reduction="mean", ignore_index=-1)) == "ce"
    opt = pcfast.optim.PC(nn.Sequential(*layers()), loss=nn.CrossEntropyLoss())
    assert opt.param_groups[0]["loss"] == "ce"  # a string, so state_dict round-trips
    x, y = batches("ce")[0]
    model = nn.Sequential(*layers())
    stats = pcfast.optim.BP(model, loss=nn.CrossEntropyLoss()).step(x, y)
    with torch.no_grad():
        expected = float(nn.CrossEntropyLoss()(nn.Sequential(*layers())(x), y))
    assert stats["loss"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss, message", [
    (nn.MSELoss(), r"loss: nn.MSELoss\(reduction='mean'\) is \(1/\(B·C\)\) Σ \(y − f\)², whose gradient is 2/C times "
                   r"pcfast's: pcfast's 'mse' is ½‖y − f‖² per sample averaged over the batch.*Pass loss='mse'"),
    (nn.MSELoss(reduction="sum"), r"nn.MSELoss\(reduction='sum'\) is Σ \(y − f\)² over the batch, whose gradient is 2B times.*loss='mse'"),
    (nn.MSELoss(reduction="none"), r"nn.MSELoss\(reduction='none'\) is not: pcfast's 'mse' is ½‖y − f‖²"),
    (nn.CrossEntropyLoss(reduction="sum"), r"reduction='sum' \(pcfast averages over the batch\).*pass loss='ce'"),
    (nn.CrossEntropyLoss(weight=torch.ones(3)), r"class weights .*pass loss='ce'"),
    (nn.CrossEntropyLoss(label_smoothing=0.1), r"label_smoothing=0.1 .*pass loss='ce'"),
    (nn.CrossEntropyLoss(ignore_index=0), r"ignore_index=0 .*pass loss='ce'"),
    ("l1", r"loss: expected one of \('mse', 'ce'\) or nn.CrossEntropyLoss\(\), got 'l1'"),
])
def test_loss_object_with_another_convention_is_refused(loss, message):
    for algo in OPTIMIZERS:
        with pytest.raises(ValueError, match=message):
            OPTIMIZERS[algo](nn.Sequential(*layers()), loss=loss)


@pytest.mark.parametrize("loss", [nn.NLLLoss(), nn.L1Loss(), nn.BCEWithLogitsLoss(), None, 2])
def test_other_loss_types_are_refused_with_type_error(loss):
    for algo in OPTIMIZERS:
        with pytest.raises(TypeError, match=r"loss: expected one of \('mse', 'ce'\) or nn.CrossEntropyLoss\(\), got"):
            OPTIMIZERS[algo](nn.Sequential(*layers()), loss=loss)


def test_mse_loss_message_states_the_factor_it_names():
    """The refusal's factor is right: nn.MSELoss()'s gradient is 2/C times pcfast's 'mse'."""
    f = torch.randn(BATCH, DIMS[-1], dtype=torch.float64, requires_grad=True)
    y = torch.randn(BATCH, DIMS[-1], dtype=torch.float64)
    torch_grad, = torch.autograd.grad(nn.MSELoss()(f, y), f)
    pcfast_grad, = torch.autograd.grad(0.5 * ((y - f) ** 2).sum() / BATCH, f)
    torch.testing.assert_close(torch_grad, 2 / DIMS[-1] * pcfast_grad, rtol=1e-12, atol=0)
    sum_grad, = torch.autograd.grad(nn.MSELoss(reduction="sum")(f, y), f)
    torch.testing.assert_close(sum_grad, 2 * BATCH * pcfast_grad, rtol=1e-12, atol=0)
