"""DenseAdamW: the same updates as torch's AdamW on channels_last weights without their copies, and the stock fused
AdamW's behaviour (with one note) where torch's private `AdamW._init_group` is not the one it was written for."""
import inspect
import logging
from pathlib import Path

import pytest
import torch

from pipeline.platform import dense_adamw
from pipeline.platform.dense_adamw import DenseAdamW
from pipeline.train import optim


def _adamw_params():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, bias=True).to(memory_format=torch.channels_last)
    plain = torch.nn.Parameter(torch.randn(4, 8, 3, 3))  # standard layout
    return [conv.weight, conv.bias, plain]


def _train(cls, kw: dict, amsgrad: bool = False, grad_layout: str = "same", tmp_path: Path | None = None):
    """Parameters after four steps on seeded gradients; with `tmp_path`, through a state_dict round trip mid-way."""
    params = _adamw_params()
    opt = cls(params, lr=0.05, weight_decay=0.1, amsgrad=amsgrad, **kw)
    for step in range(4):
        torch.manual_seed(100 + step)
        for p in params:
            g = torch.randn(p.shape)
            p.grad = g if grad_layout == "by_hand_nchw" else torch.empty_like(p).copy_(g)
        opt.step()
        if step == 1 and tmp_path is not None:  # a checkpoint round trip keeps the state's shapes and values
            torch.save(opt.state_dict(), tmp_path / "opt.pt")
            opt = cls(params, lr=0.05, weight_decay=0.1, amsgrad=amsgrad, **kw)
            opt.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    assert opt.state[params[0]]["exp_avg"].shape == params[0].shape
    return [p.detach().clone() for p in params]


# Autograd gives a grad its parameter's layout. A grad assigned by hand in another layout is no case for torch's fused
# kernel, which pairs elements by memory order (DenseAdamW copies such a grad first): there the looped AdamW is the
# reference.
@pytest.mark.parametrize("grad_layout, stock", [("same", {"fused": True}), ("same", {"foreach": False}),
                                                ("by_hand_nchw", {"foreach": False})],
                         ids=["same-fused", "same-looped", "by_hand_nchw-looped"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_dense_adamw_matches_stock_adamw_on_channels_last_weights(grad_layout, stock, amsgrad, tmp_path: Path):
    got = _train(DenseAdamW, {"fused": True}, amsgrad, grad_layout, tmp_path)
    expected = _train(torch.optim.AdamW, stock, amsgrad, grad_layout)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_dense_adamw_copies_no_tensor_in_its_fused_step():
    params = _adamw_params()
    for p in params:
        p.grad = torch.ones_like(p)
    opt = optim.build_optimizer([{"params": params}], "adamw", 1e-3, 0.9, False, (0.9, 0.999), dense_adamw=True)
    assert type(opt) is DenseAdamW and opt.dense
    opt.step()
    with torch.profiler.profile(record_shapes=True) as prof:
        opt.step()
    copies = [(e.name, e.input_shapes) for e in prof.events()
              if e.name in ("aten::clone", "aten::copy_") and e.input_shapes and e.input_shapes[0]]  # not scalars
    assert not copies
    plain = torch.optim.AdamW(params, lr=1e-3, fused=True)  # what it avoids: torch's kernel copies the conv weight
    plain.step()
    with torch.profiler.profile() as prof:
        plain.step()
    assert any(e.name == "aten::clone" for e in prof.events())


def _init_group_taking(*names: str):
    """torch's own _init_group under another signature: step still works, DenseAdamW must not rely on it."""
    original = torch.optim.AdamW._init_group

    def init_group(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    init_group.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    return init_group


LISTS = ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")


def test_this_torch_has_the_interface_dense_adamw_was_written_for():
    assert dense_adamw.interface_mismatch() is None


@pytest.mark.parametrize("names", [
    ("self", "group", "params_with_grad", "grads", *LISTS),
    ("self", "group", "params", "grads", *LISTS),
    ("self", "group", "params_with_grad", "grads", "amsgrad", *LISTS),  # torch 2.3
])
def test_interface_check_accepts_the_known_signatures(names, monkeypatch):
    monkeypatch.setattr(torch.optim.AdamW, "_init_group", _init_group_taking(*names))
    assert dense_adamw.interface_mismatch() is None


@pytest.mark.parametrize("names", [
    ("self", "group", "params_with_grad", "grads", "exp_avg_sqs", "exp_avgs", "max_exp_avg_sqs", "state_steps"),
    ("self", "group", "params_with_grad", "grads", *LISTS, "state_sums"),
    ("self", "group", "params_with_grad", "grads", "amsgrad", "exp_avgs", "exp_avg_sqs", "state_steps"),
])
def test_interface_check_names_another_signature(names, monkeypatch):
    monkeypatch.setattr(torch.optim.AdamW, "_init_group", _init_group_taking(*names))
    assert dense_adamw.interface_mismatch() == f"AdamW._init_group takes ({', '.join(names)})"


def test_interface_check_without_init_group(monkeypatch):
    monkeypatch.delattr(torch.optim.Adam, "_init_group")  # AdamW inherits it from Adam
    assert dense_adamw.interface_mismatch() == "torch.optim.AdamW has no _init_group"


def test_another_interface_steps_as_stock_fused_adamw_with_one_note(monkeypatch, caplog):
    names = ("self", "group", "params_with_grad", "grads", "exp_avg_sqs", "exp_avgs", "max_exp_avg_sqs", "state_steps")
    monkeypatch.setattr(torch.optim.AdamW, "_init_group", _init_group_taking(*names))
    monkeypatch.setattr(dense_adamw, "_noted", set())
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        got = _train(DenseAdamW, {"fused": True})
        second = DenseAdamW(_adamw_params(), fused=True)  # a second optimizer in the process: no second note
    assert not second.dense
    notes = [r for r in caplog.records if r.name == "pipeline.platform.dense_adamw"]
    assert len(notes) == 1 and "\n" not in notes[0].getMessage()
    assert notes[0].getMessage().endswith("using the stock fused AdamW")
    for g, e in zip(got, _train(torch.optim.AdamW, {"fused": True})):
        torch.testing.assert_close(g, e, rtol=0, atol=0)  # the stock kernel on the same tensors: bit-identical
